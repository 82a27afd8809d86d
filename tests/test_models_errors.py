"""Loading failures are one-line ModelLoadErrors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.config import load_config
from loraforge.errors import ModelLoadError
from loraforge.models.hub import looks_like_local_path, resolve_model_path
from loraforge.models.loader import load_model, load_tokenizer


def model_args(**keys):
    values = {"model_name_or_path": "tiny-random-qwen3"}
    values.update(keys)
    return load_config(values, [], purpose="chat").model


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 400, text
    return text


def test_missing_local_folder(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(model_args(model_name_or_path=str(missing)))
    text = one_line(info)
    assert str(missing) in text and "does not exist" in text and "built-in" in text


def test_unreachable_hub_offline(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = model_args(model_name_or_path="some-org/some-model-that-is-not-cached", cache_dir=str(tmp_path))
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path(args)
    text = one_line(info)
    assert "some-org/some-model-that-is-not-cached" in text and "HF_HUB_OFFLINE" in text
    assert "--local-dir" in text


def test_misspelt_builtin_name_is_suggested(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path(model_args(model_name_or_path="tiny-random-qwen", cache_dir=str(tmp_path)))
    assert "did you mean the built-in `tiny-random-qwen3`" in one_line(info)


def test_modelscope_without_package(monkeypatch):
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    import builtins

    real_import = builtins.__import__

    def no_modelscope(name, *args, **kwargs):
        if name.startswith("modelscope"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_modelscope)
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path(model_args(model_name_or_path="qwen/Qwen3-0.6B"))
    assert "modelscope" in one_line(info)


def test_adapter_folder_given_as_model(tmp_path: Path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen3-0.6B"}))
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path(model_args(model_name_or_path=str(tmp_path)))
    text = one_line(info)
    assert "is a LoRA adapter" in text and "model_name_or_path: Qwen/Qwen3-0.6B" in text


def test_missing_adapter_folder(tmp_path: Path, tiny_qwen3_path: Path):
    cfg = load_config({"model_name_or_path": "tiny-random-qwen3", "adapter_name_or_path": str(tmp_path / "gone")},
                      [], purpose="chat")
    with pytest.raises(ModelLoadError) as info:
        load_model(cfg, None, is_trainable=False)
    assert "adapter_name_or_path" in one_line(info) and "gone" in str(info.value)


def test_unknown_lora_target_names_the_real_ones(tmp_path: Path, tiny_qwen3_path: Path):
    cfg = load_config({"model_name_or_path": "tiny-random-qwen3", "dataset": "x", "output_dir": str(tmp_path),
                       "lora_target": "q_proj,qkv_proj"}, [], purpose="train")
    with pytest.raises(ModelLoadError) as info:
        load_model(cfg, None, is_trainable=True)
    text = one_line(info)
    assert "qkv_proj" in text and "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in text


def test_unknown_freeze_module(tmp_path: Path, tiny_qwen3_path: Path):
    cfg = load_config({"model_name_or_path": "tiny-random-qwen3", "dataset": "x", "output_dir": str(tmp_path),
                       "finetuning_type": "freeze", "freeze_trainable_modules": "feed_forward"}, [], purpose="train")
    with pytest.raises(ModelLoadError) as info:
        load_model(cfg, None, is_trainable=True)
    assert "feed_forward" in one_line(info) and "self_attn" in str(info.value)


def test_fa2_without_gpu_or_package(tmp_path: Path, tiny_qwen3_path: Path):
    cfg = load_config({"model_name_or_path": "tiny-random-qwen3", "flash_attn": "fa2"}, [], purpose="chat")
    with pytest.raises(ModelLoadError) as info:
        load_model(cfg, None, is_trainable=False)
    assert "flash_attn: fa2" in one_line(info)


@pytest.mark.parametrize("name,local", [("./model", True), ("/abs/model", True), ("~/m", True), ("a/b/c", True),
                                        ("Qwen/Qwen3-0.6B", False), ("gpt2", False)])
def test_path_or_hub_id(name: str, local: bool):
    assert looks_like_local_path(name) is local


def test_cached_hub_model_resolves_offline(tmp_path: Path, monkeypatch):
    """A hub id already in cache_dir is found without network, at the requested revision."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--some-org--cached-model"
    for ref, commit in (("main", "a" * 40), ("v1", "b" * 40)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps({"ref": ref}))
        (snapshot / "model.safetensors").write_bytes(b"")
    found = resolve_model_path(model_args(model_name_or_path="some-org/cached-model", cache_dir=str(tmp_path)))
    assert Path(found) == repo / "snapshots" / ("a" * 40)
    found = resolve_model_path(model_args(model_name_or_path="some-org/cached-model", cache_dir=str(tmp_path),
                                          model_revision="v1"))
    assert json.loads((Path(found) / "config.json").read_text()) == {"ref": "v1"}
