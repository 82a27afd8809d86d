"""Merging adapters: merged logits equal base + adapter, stacked adapters add up, QLoRA adapters are merged into a
16-bit reload of the base (never into 4-bit weights), and the saved folder is complete."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.config import load_config
from loraforge.export.merge import merge_adapters, save_merged
from loraforge.export.workflow import plan_export, run_export
from conftest import make_random_lora  # noqa: E402


def make_adapter(base: Path, out: Path, seed: int, rank: int = 4, alpha: int = 8) -> Path:
    """A LoRA adapter with non-zero B (so it changes the model), saved in PEFT format."""
    return make_random_lora(base, out, seed=seed, rank=rank, alpha=alpha)


@pytest.fixture(scope="module")
def adapters(tiny_qwen3_path: Path, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_qwen3_path, root / "a", 1), make_adapter(tiny_qwen3_path, root / "b", 2, rank=8, alpha=4)


def _ids(tiny_qwen3_path: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_qwen3_path))
    return torch.tensor([tok("Merging LoRA adapters: 合并适配器 🙂 def f(x): return x + 1")["input_ids"]])


def test_merged_logits_equal_base_plus_adapter(tiny_qwen3_path: Path, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = _ids(tiny_qwen3_path)
    load = lambda: AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_path), dtype=torch.float32).eval()  # noqa: E731
    with torch.no_grad():
        base_logits = load()(ids).logits
        with_adapter = PeftModel.from_pretrained(load(), str(adapters[0])).eval()(ids).logits
        merged = merge_adapters(load(), [str(adapters[0])])
        merged_logits = merged(ids).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (with_adapter - base_logits).abs().max() > 1e-3          # the adapter does change the model
    assert torch.allclose(merged_logits, with_adapter, atol=1e-5, rtol=1e-4)


def test_two_adapters_add_up(tiny_qwen3_path: Path, adapters):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_path), dtype=torch.float32)
    base_w = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    merged = merge_adapters(model, [str(a) for a in adapters])
    expected = base_w.clone()
    for adapter in adapters:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        w = load_file(str(adapter / "adapter_model.safetensors"))
        key = "base_model.model.model.layers.1.self_attn.q_proj"
        expected += (cfg["lora_alpha"] / cfg["r"]) * w[f"{key}.lora_B.weight"] @ w[f"{key}.lora_A.weight"]
    assert torch.allclose(merged.model.layers[1].self_attn.q_proj.weight, expected, atol=1e-6)


def test_sharded_save_is_complete(tiny_qwen3_path: Path, adapters, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = merge_adapters(AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_path), dtype=torch.float32),
                           [str(adapters[0])])
    tok = AutoTokenizer.from_pretrained(str(tiny_qwen3_path))
    save_merged(model, tok, tmp_path, "10MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((tmp_path / s).is_file() for s in shards)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert 151645 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.chat_template == tok.chat_template and "<|im_start|>" in reloaded.chat_template


def test_qlora_adapter_merges_into_16bit_reload(tiny_qwen3_path: Path, adapters, tmp_path: Path, caplog):
    adapter = adapters[0]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for f in adapter.iterdir():
        (run_dir / f.name).write_bytes(f.read_bytes())
    (run_dir / "run_config.yaml").write_text("model_name_or_path: tiny-random-qwen3\nquantization_bit: 4\n")
    cfg = load_config({"model_name_or_path": "tiny-random-qwen3", "adapter_name_or_path": str(run_dir),
                       "export_dir": str(tmp_path / "out"), "export_dtype": "bfloat16"},
                      purpose="export", build_training_args=False)
    plan = plan_export(cfg)
    assert plan.quant_bits == 4 and any("QLoRA" in line for line in plan.lines())
    with caplog.at_level(logging.INFO, logger="loraforge"):
        run_export(cfg, plan=plan)
    assert any("QLoRA" in r.message and "not into the 4-bit" in r.message for r in caplog.records)
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    base = load_file(str(tiny_qwen3_path / "model.safetensors"))
    w = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.mlp.down_proj"
    expected = base["model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16).float() + \
        2.0 * w[f"{key}.lora_B.weight"] @ w[f"{key}.lora_A.weight"]
    got = weights["model.layers.0.mlp.down_proj.weight"].float()
    assert (got - expected).abs().max() < 0.01  # bf16 rounding of the merged weight
    card = (out / "README.md").read_text()
    assert "QLoRA on a 4-bit base" in card and "model.safetensors" in card


def test_export_device_chooses_where_merging_runs(tiny_qwen3_path: Path, monkeypatch):
    from loraforge.export.merge import load_base_model, merge_device

    assert merge_device("cpu") == "cpu"
    assert merge_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (merge_device("auto"), merge_device("cpu")) == ("cuda", "cpu")
    monkeypatch.undo()
    cfg = load_config({"model_name_or_path": str(tiny_qwen3_path), "export_dir": "x", "export_device": "auto"},
                      purpose="export")
    model = load_base_model(cfg, None, "float32", None)
    assert next(model.parameters()).device.type == merge_device("auto")
