"""`loraforge export` end to end: dry run, upload listing, overwrite protection, atomic writes, disk check, upload."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from loraforge.cli import main

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer(split: str = QWEN2_SPLIT, vocab_size: int = 512, corpus: list[str] | None = None):
    """A small byte-level BPE with the given split rule and a ChatML template, trained here in a second."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus or ["Hello world, this is a tiny tokenizer for export tests. 你好 🙂 def f(x): return x"]
                            * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer Qwen3 with a 512-token tokenizer: small enough for many CLI runs, no downloads, no fixtures."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    out = tmp_path_factory.mktemp("base") / "tiny"
    config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    tiny_tokenizer().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapter(tiny_base: Path, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter") / "lora"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(str(out))
    return out


def write_config(path: Path, **keys) -> Path:
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in keys.items()) + "\n")
    return path


@pytest.fixture
def config(tiny_base: Path, adapter: Path, tmp_path: Path) -> Path:
    return write_config(tmp_path / "export.yaml", model_name_or_path=str(tiny_base), adapter_name_or_path=str(adapter),
                        export_dir=str(tmp_path / "out"), export_format="both", export_quantization="q8_0",
                        export_hub_model_id="someone/tiny-sft")


def test_dry_run_lists_plan_and_upload_and_writes_nothing(config: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert main(["export", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "upload to huggingface: someone/tiny-sft (private; NO TOKEN: set HF_TOKEN" in out
    for name in ("model.safetensors", "out-q8_0.gguf", "Modelfile", "README.md", "tokenizer.json"):
        assert re.search(rf"~\s*[\d.]+ \w+\s+{re.escape(name)}$", out, re.M), name
    assert "dry run: nothing was written or uploaded" in out
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export.yaml"]


def test_export_then_exact_upload_listing(config: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    assert main(["export", str(config), "export_hub_model_id=null"]) == 0
    out_dir = tmp_path / "out"
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == sorted(["Modelfile", "README.md", "chat_template.jinja", "config.json", "generation_config.json",
                            "model.safetensors", "out-q8_0.gguf", "tokenizer.json", "tokenizer_config.json"])
    capsys.readouterr()
    assert main(["export", str(config), "--upload-only", "--dry-run", "export_hub_private=false"]) == 0
    listing = capsys.readouterr().out
    assert listing.splitlines()[0] == "upload to huggingface: someone/tiny-sft (public; token from HF_TOKEN)"
    assert "hf_secret_value" not in listing
    for name in files:
        size = (out_dir / name).stat().st_size
        assert re.search(rf"\s{size:,} B  {re.escape(name)}$", listing, re.M), name
    total = sum((out_dir / n).stat().st_size for n in files)
    assert f"{total:,} B  total, {len(files)} files" in listing
    modelfile = (out_dir / "Modelfile").read_text()
    assert "FROM ./out-q8_0.gguf" in modelfile and "TEMPLATE" in modelfile and "SYSTEM" in modelfile


def test_existing_export_needs_overwrite(config: Path, tmp_path: Path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("previous export")
    assert main(["export", str(config), "export_format=gguf", "export_hub_model_id=null"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out_dir / "keep.txt").read_text() == "previous export"
    assert main(["export", str(config), "export_format=gguf", "export_hub_model_id=null", "--overwrite"]) == 0
    assert not (out_dir / "keep.txt").exists() and (out_dir / "out-q8_0.gguf").is_file()
    assert not (out_dir / "model.safetensors").exists() and not (out_dir / ".merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_leaves_no_partial_export(config: Path, tmp_path: Path, monkeypatch):
    import loraforge.export.gguf as gguf_pkg

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the GGUF")

    monkeypatch.setattr(gguf_pkg, "convert_to_gguf", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["export", str(config), "export_hub_model_id=null"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.yaml"]


def test_free_disk_space_is_checked_first(config: Path, tmp_path: Path, capsys, monkeypatch):
    import loraforge.export.safety as safety

    monkeypatch.setattr(safety.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    assert main(["export", str(config), "export_hub_model_id=null"]) == 2
    err = capsys.readouterr().err
    assert "not enough free disk space" in err and "976.6 KiB is free" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.yaml"]


def test_upload_creates_private_repo_and_uploads_the_folder(config: Path, tmp_path: Path, capsys, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_token_for_test")
    assert main(["export", str(config), "export_format=gguf"]) == 0
    assert calls[0] == ("init", "hf_token_for_test")
    assert calls[1][:2] == ("create_repo", "someone/tiny-sft") and calls[1][2]["private"] is True
    assert calls[2][1]["repo_id"] == "someone/tiny-sft"
    assert Path(calls[2][1]["folder_path"]) == (tmp_path / "out").resolve()
    assert "uploaded: https://huggingface.co/someone/tiny-sft" in capsys.readouterr().out


def test_upload_without_token_says_which_variable(config: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.gguf").write_bytes(b"GGUF")
    assert main(["export", str(config), "--upload-only"]) == 2
    assert "set HF_TOKEN" in capsys.readouterr().err


def test_modelscope_upload_uses_its_token_and_visibility(config: Path, tmp_path: Path, capsys, monkeypatch):
    import sys
    import types

    calls = []

    class FakeHubApi:
        def login(self, token):
            calls.append(("login", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    fake = types.ModuleType("modelscope.hub.api")
    fake.HubApi = FakeHubApi
    for name in ("modelscope", "modelscope.hub"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "modelscope.hub.api", fake)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-token")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.gguf").write_bytes(b"GGUF")
    assert main(["export", str(config), "--upload-only", "export_hub=modelscope", "export_hub_private=false"]) == 0
    assert calls[0] == ("login", "ms-token")
    assert calls[1] == ("create_repo", "someone/tiny-sft", {"visibility": "public", "exist_ok": True})
    assert Path(calls[2][1]["folder_path"]) == (tmp_path / "out").resolve()
    assert "uploaded: https://modelscope.cn/models/someone/tiny-sft" in capsys.readouterr().out
