"""`loraforge eval --compare`: base vs an adapter (not merged) vs the same adapter merged, on one eval set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from loraforge.config import load_config  # noqa: E402
from loraforge.errors import ConfigError  # noqa: E402
from loraforge.evaluate.compare import Variant, parse_variants, run_compare  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


ROWS = [
    {"instruction": "Name a fruit.", "input": "", "output": "An apple."},
    {"instruction": "2+2=?", "input": "", "output": "#### 4"},
    {"instruction": "你好", "input": "", "output": "你好！有什么可以帮你？"},
    {"instruction": "Describe the sea in three words.", "input": "", "output": "Blue, deep, vast."},
]


def build_adapter_and_merged(base: Path, out: Path) -> tuple[Path, Path]:
    """A LoRA adapter with non-zero random weights (so it changes the answers) and its merged model folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    adapter, merged = out / "adapter", out / "merged"
    peft_model.save_pretrained(str(adapter))
    peft_model.merge_and_unload().save_pretrained(str(merged))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(merged))
    return adapter, merged


@pytest.fixture(scope="module")
def variants_dir(tiny_qwen3_path, tmp_path_factory):
    return build_adapter_and_merged(tiny_qwen3_path, tmp_path_factory.mktemp("variants"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compare_data")
    (folder / "ev.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"ev": {"file_name": "ev.json"}}))
    return folder


def _cfg(tiny_qwen3_path, data_dir, out, **extra):
    return load_config({"model_name_or_path": str(tiny_qwen3_path), "template": "qwen3", "eval_dataset": "ev",
                        "dataset_dir": str(data_dir), "output_dir": str(out), "max_new_tokens": 8,
                        "data_cache_dir": str(out / "cache"), "enable_thinking": False, **extra}, purpose="eval")


def test_parse_variants(tiny_qwen3_path, data_dir, variants_dir, tmp_path):
    adapter, merged = variants_dir
    cfg = _cfg(tiny_qwen3_path, data_dir, tmp_path)
    got = parse_variants(f"base, lora={adapter}, {merged}, q4=base:4bit", cfg)
    assert got == [Variant("base", "base"), Variant("lora", "adapter", str(adapter)),
                   Variant("merged", "model", str(merged)), Variant("q4", "base", None, 4)]
    assert parse_variants(None, _cfg(tiny_qwen3_path, data_dir, tmp_path, adapter_name_or_path=str(adapter))) == [
        Variant("base", "base"), Variant("adapter", "adapter", str(adapter))]
    with pytest.raises(ConfigError, match="needs variants"):
        parse_variants(None, cfg)
    with pytest.raises(ConfigError, match="neither `base`"):
        parse_variants(f"base,{tmp_path / 'missing'}", cfg)
    with pytest.raises(ConfigError, match="appear twice"):
        parse_variants("base,base", cfg)


def test_compare_base_adapter_merged(tiny_qwen3_path, data_dir, variants_dir, tmp_path):
    adapter, merged = variants_dir
    out = tmp_path / "out"
    cfg = _cfg(tiny_qwen3_path, data_dir, out)
    rows = run_compare(cfg, parse_variants(f"base,lora={adapter},merged={merged}", cfg))
    assert [r["variant"] for r in rows] == ["base", "lora", "merged"]
    preds = {}
    for r in rows:
        lines = (out / "compare" / r["variant"] / "generated_predictions.jsonl").read_text().splitlines()
        preds[r["variant"]] = [json.loads(line)["predict"] for line in lines]
        assert len(preds[r["variant"]]) == len(ROWS) and r["samples"] == len(ROWS)
        saved = json.loads((out / "compare" / r["variant"] / "predict_results.json").read_text())
        assert r["scores"]["bleu-4"] == saved["predict_bleu-4"]
    # the adapter changes the answers; merging it gives the same model
    assert preds["lora"] != preds["base"]
    assert preds["lora"] == preds["merged"]
    # memory: the loader folds an adapter into the weights for inference, so all three hold the base's bytes
    mem = {r["variant"]: r["memory"] for r in rows}
    tiny_bytes = 151936 * 64 * 4  # the tied embedding alone, fp32
    for m in mem.values():
        assert m["weights_mb"] == pytest.approx(mem["base"]["weights_mb"]) and m["weights_mb"] > tiny_bytes / 2**20
    assert all(m["rss_mb"] > 0 and m["cuda_allocated_mb"] is None for m in mem.values())

    table = (out / "compare" / "comparison.md").read_text()
    assert table.count("\n| ") == 4 and "| lora |" in table and "bleu-4" in table
    data = json.loads((out / "compare" / "comparison.json").read_text())
    assert data["samples"] == len(ROWS) and [v["variant"] for v in data["variants"]] == ["base", "lora", "merged"]
    png = (out / "compare" / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_eval_compare(tiny_qwen3_path, data_dir, variants_dir, tmp_path, capsys):
    from loraforge.cli import main

    adapter, _ = variants_dir
    out = tmp_path / "cli"
    config = tmp_path / "eval.yaml"
    config.write_text(f"model_name_or_path: {tiny_qwen3_path}\ntemplate: qwen3\neval_dataset: ev\n"
                      f"dataset_dir: {data_dir}\noutput_dir: {out}\ndata_cache_dir: {tmp_path / 'cache'}\n"
                      f"max_new_tokens: 4\ncompare: [base, {adapter}]\n")
    assert main(["eval", str(config), "--compare"]) == 0
    printed = capsys.readouterr().out
    assert "| base |" in printed and "| adapter |" in printed
    assert (out / "compare" / "comparison.png").is_file()
