"""`loraforge estimate` through the real CLI entry point, the JSON output, and the API `train` uses."""

from __future__ import annotations

import json

import pytest

from loraforge.cli import main
from loraforge.estimate import detect_gpus, estimate_for_config
from loraforge.estimate.gpus import match_device_name


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["estimate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_flags_verdict_and_suggestions(capsys):
    code, out, _ = run(capsys, "--model", "qwen3-8b", "--method", "qlora-4", "--batch-size", "4",
                       "--seq-len", "2048", "--gpu", "T4")
    assert code == 0 and "FITS on T4" in out and "fast path" in out  # 8.15 GiB measured on the fast path
    code, out, _ = run(capsys, "fast_path=off", "--model", "qwen3-8b", "--method", "qlora-4", "--batch-size", "4",
                       "--seq-len", "2048", "--gpu", "T4")
    assert code == 0
    assert "DOES NOT FIT on T4" in out and "cheapest changes that fit" in out
    for part in ("weights", "adapter", "gradients", "optimizer states", "activations", "logits / loss",
                 "framework", "host RAM"):
        assert part in out
    assert "per_device_train_batch_size=1" in out  # a change that can be pasted as an override
    assert "fp16" in out  # T4 has no bf16, so the default precision follows the GPU


def test_json_output(capsys):
    code, out, _ = run(capsys, "fast_path=off", "--model", "qwen3-0.6b", "--method", "lora", "--lora-rank", "16",
                       "--batch-size", "4", "--seq-len", "2048", "--gradient-checkpointing", "off",
                       "--gpu-mem", "24", "--json")
    assert code == 0
    data = json.loads(out)
    g = data["per_gpu_gib"]
    assert g["total"] == pytest.approx(g["allocated"] + g["framework"], abs=0.002)
    # the calibration table measured this configuration at 30.61 GiB allocated
    assert g["allocated"] == pytest.approx(30.61, rel=0.05)
    assert data["fits"] is False and data["gpu"]["memory_gib"] == 24.0
    assert data["scenario"]["lora_rank"] == 16 and data["trainable_params"] == 10_092_544
    assert data["suggestions"] and all(s["fits"] for s in data["suggestions"])
    # fast_path=off was asked: turning it back on changes nothing in the training, so it comes first
    assert data["suggestions"][0]["change"] == "the fast path (fast_path: auto)"
    assert data["suggestions"][1]["change"] == "gradient checkpointing on"


def test_config_file_with_overrides(capsys, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("model_name_or_path: Qwen/Qwen3-14B\nfinetuning_type: lora\nquantization_bit: 4\n"
                   "per_device_train_batch_size: 2\ngradient_accumulation_steps: 8\ncutoff_len: 2048\n"
                   "fp16: true\ndeepspeed: z3_offload\nnproc_per_node: 4\ndataset: alpaca_en_demo\n"
                   "output_dir: saves/x\n")
    code, out, _ = run(capsys, str(cfg), "lora_rank=16", "--gpu", "T10", "--json")
    assert code == 0
    data = json.loads(out)
    s = data["scenario"]
    assert (s["method"], s["lora_rank"], s["batch_size"], s["grad_accum"], s["seq_len"]) == \
        ("qlora-4", 16, 2, 8, 2048)
    assert (s["num_gpus"], s["zero_stage"], s["offload_optimizer"], s["offload_params"], s["precision"]) == \
        (4, 3, True, True, "fp16")
    assert data["model"]["name"] == "qwen3-14b" and data["fits"] is True
    assert data["per_gpu_gib"]["host"]["parameters (ZeRO offload)"] > 8


def test_flags_win_over_the_config(capsys, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("model_name_or_path: qwen3-4b\nfinetuning_type: full\nper_device_train_batch_size: 8\n")
    code, out, _ = run(capsys, str(cfg), "--method", "qlora-8", "--batch-size", "1", "--json")
    data = json.loads(out)
    assert data["scenario"]["method"] == "qlora-8" and data["scenario"]["batch_size"] == 1


def test_textbook(capsys):
    code, out, _ = run(capsys, "--textbook", "--json")
    data = json.loads(out)
    rows = {r["method"]: r for r in data["textbook"]["rows"]}
    assert (rows["full"]["textbook_1b_gb"], rows["lora"]["textbook_1b_gb"], rows["qlora-4"]["textbook_1b_gb"]) \
        == (8.0, 2.008, 0.558)
    assert data["model"]["name"] == "llama3.2-1b"
    code, out, _ = run(capsys, "--textbook", "--model", "qwen3-0.6b")
    assert code == 0 and "2.008 GB" in out and "0.558 GB" in out and "why qlora-4 differs" in out


def test_local_config_json_and_list(capsys, qwen3_tokenizer_dir):
    code, out, _ = run(capsys, "--model", str(qwen3_tokenizer_dir / "config.json"), "--json")
    assert code == 0 and json.loads(out)["model"]["total_params"] == 596_049_920
    code, out, _ = run(capsys, "--list")
    assert "qwen3-14b" in out and "T10" in out and "H200" in out


def test_errors_name_the_fix(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "--model", "nobody/unknown-13b")
    assert code == 2 and "not in the local Hugging Face cache" in err and "fix:" in err
    code, _, err = run(capsys, "--model", "qwen3-8b", "--gpu", "GTX480")
    assert code == 2 and "unknown GPU" in err and "H100" in err
    code, _, err = run(capsys, "--method", "lora")
    assert code == 2 and "--model" in err


def test_estimate_for_config_used_by_train():
    from loraforge.config import load_config

    raw = {"model_name_or_path": "qwen3-8b", "finetuning_type": "lora", "quantization_bit": 4,
           "per_device_train_batch_size": 4, "cutoff_len": 2048, "bf16": True, "dataset": "x"}
    cfg = load_config({**raw, "fast_path": "off"}, purpose="train", build_training_args=False)
    est = estimate_for_config(cfg, gpu="T4")
    assert est.fits is False and est.suggestions
    lines = est.summary_lines()
    assert all(isinstance(line, str) for line in lines) and any("DOES NOT FIT" in line for line in lines)
    assert any("no bf16 support" in note for note in est.notes)
    big = estimate_for_config(cfg, gpu="H100", num_gpus=2)
    assert big.fits is True and big.suggestions == [] and big.scenario.num_gpus == 2
    if not detect_gpus():  # CPU machine, no GPU named: no verdict
        assert estimate_for_config(cfg).fits is None


def test_gpu_name_matching():
    assert match_device_name("Tesla T4", 14.7).name == "T4"
    assert match_device_name("NVIDIA A100-SXM4-80GB", 79.1).name == "A100-80"
    assert match_device_name("NVIDIA A100-PCIE-40GB", 39.4).name == "A100-40"
    assert match_device_name("NVIDIA H100 80GB HBM3", 79.1).name == "H100"
    assert match_device_name("NVIDIA GeForce RTX 4090", 23.6).name == "4090"
    assert match_device_name("NVIDIA A10G", 22.1).name == "A10"
    assert match_device_name("NVIDIA L4", 22.0) is None
