"""The train command end to end on tiny-random-qwen3: outputs, methods, resume, NaN guard."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from loraforge.cli import main
from loraforge.config import load_config
from loraforge.errors import TrainingError
from loraforge.train.workflow import run_train

ROWS = [
    {"instruction": f"Convert {n} kilometers to meters.", "input": "", "output": f"{n} km = {n * 1000} m.\n#### {n * 1000}"}
    for n in range(2, 26)
]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    (d / "one.json").write_text(json.dumps(ROWS[:1] * 8, ensure_ascii=False), encoding="utf-8")
    (d / "dataset_info.json").write_text(json.dumps({
        "demo": {"file_name": "train.json"},
        "repeated": {"file_name": "one.json"},
    }), encoding="utf-8")
    return d


def _cfg(data_dir: Path, out: Path, **over) -> dict:
    base = {
        "model_name_or_path": "tiny-random-qwen3", "dataset": "demo", "dataset_dir": str(data_dir),
        "template": "qwen3", "cutoff_len": 64, "output_dir": str(out), "per_device_train_batch_size": 4,
        "learning_rate": 5e-3, "max_steps": 6, "logging_steps": 1, "save_steps": 3, "lora_rank": 8,
        "report_to": "none", "seed": 1, "disable_gradient_checkpointing": False,
    }
    base.update(over)
    return base


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines() if x.strip()]
    return {r["current_steps"]: r["loss"] for r in rows if "loss" in r}


def test_cli_train_writes_every_output(data_dir, tmp_path, tiny_qwen3_path):
    out = tmp_path / "run"
    cfg_file = tmp_path / "c.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(_cfg(data_dir, out, plot_loss=True, max_steps=8)), encoding="utf-8")
    assert main(["train", str(cfg_file), "--lora_alpha", "16", "save_steps=4"]) == 0
    names = {p.name for p in out.iterdir()}
    for required in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "tokenizer.json",
                     "run_config.yaml", "trainer_log.jsonl", "train_results.json", "all_results.json",
                     "training_loss.png", "README.md", "checkpoint-4", "checkpoint-8"):
        assert required in names, f"{required} missing from {sorted(names)}"
    assert ".staging" not in names and ".staging-final" not in names
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert "lm_head" not in adapter["target_modules"]
    results = json.loads((out / "all_results.json").read_text())
    for key in ("epoch", "train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
                "total_flos"):
        assert key in results
    rows = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in rows] == list(range(1, 9))
    for key in ("total_steps", "loss", "lr", "epoch", "grad_norm", "tokens_seen", "tokens_per_second",
                "elapsed_time", "remaining_time"):
        assert key in rows[-1], key
    assert rows[-1]["tokens_seen"] > rows[0]["tokens_seen"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the resolved config reloads, and the saved tokenizer carries the training template
    again = load_config(out / "run_config.yaml", purpose="train", build_training_args=False)
    assert again.finetuning.lora_alpha == 16 and again.data.template == "qwen3"
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    chat_template = tok_cfg.get("chat_template") or (out / "chat_template.jinja").read_text()
    assert "<|im_start|>" in chat_template


@pytest.mark.parametrize("method", [
    {"finetuning_type": "lora", "learning_rate": 1e-2},
    {"finetuning_type": "lora", "quantization_bit": 4, "learning_rate": 1e-2},
    {"finetuning_type": "lora", "quantization_bit": 8, "learning_rate": 1e-2},
    {"finetuning_type": "freeze", "freeze_trainable_layers": 1, "learning_rate": 1e-2},
    {"finetuning_type": "full", "learning_rate": 1e-2},
], ids=["lora", "qlora4", "qlora8", "freeze", "full"])
def test_each_method_lowers_the_loss_on_a_repeated_batch(method, data_dir, tmp_path, tiny_qwen3_path):
    out = tmp_path / "m"
    cfg = load_config(_cfg(data_dir, out, dataset="repeated", max_steps=8, save_steps=100,
                           lr_scheduler_type="constant", **method))
    run_train(cfg)
    losses = _losses(out)
    # a tiny random model starts near ln(151936) = 11.9 nats; a clear drop, not noise
    assert losses[8] < losses[1] - 0.5, losses


class _SignalAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_interrupted_run_resumes_with_the_same_losses(data_dir, tmp_path, tiny_qwen3_path):
    ref = tmp_path / "ref"
    run_train(load_config(_cfg(data_dir, ref)))
    expected = _losses(ref)

    out = tmp_path / "int"
    outcome = run_train(load_config(_cfg(data_dir, out)), extra_callbacks=[_SignalAt(2)])
    assert outcome.interrupted and Path(outcome.checkpoint).is_dir()
    stopped_at = int(Path(outcome.checkpoint).name.split("-")[1])
    assert stopped_at < 6 and not (out / "adapter_model.safetensors").exists()
    # without asking, a second run refuses to touch the checkpoints
    with pytest.raises(Exception, match="resume_from_checkpoint"):
        run_train(load_config(_cfg(data_dir, out, overwrite_output_dir=False)))
    run_train(load_config(_cfg(data_dir, out, resume_from_checkpoint=True)))
    resumed = _losses(out)
    assert sorted(resumed) == sorted(expected)
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), (step, resumed, expected)


class _NaNAt(TrainerCallback):
    """Make the model's output NaN during the given optimizer steps."""

    def __init__(self, steps: set[int]):
        self.steps = steps
        self.handle = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            # at the input embeddings, so it reaches the loss on the standard and the fast path alike
            embed = model.get_input_embeddings()
            self.handle = embed.register_forward_hook(lambda mod, inp, out: out * float("nan"))

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def test_nan_step_is_skipped_and_reported(data_dir, tmp_path, tiny_qwen3_path):
    out = tmp_path / "nan"
    outcome = run_train(load_config(_cfg(data_dir, out, save_steps=100)), extra_callbacks=[_NaNAt({3})])
    assert outcome.metrics["skipped_nonfinite_steps"] == 1
    rows = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_nonfinite"] == 1
    assert all(r["loss"] == r["loss"] for r in rows if r["current_steps"] != 3)  # finite elsewhere
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_consecutive_nan_steps_stop_the_run_naming_the_steps(data_dir, tmp_path, tiny_qwen3_path):
    out = tmp_path / "nan3"
    with pytest.raises(TrainingError, match=r"3 consecutive steps \(steps 2, 3, 4\)"):
        run_train(load_config(_cfg(data_dir, out, save_steps=100)), extra_callbacks=[_NaNAt({2, 3, 4})])


def test_do_predict_after_training_scores_the_eval_set(data_dir, tmp_path, tiny_qwen3_path):
    out = tmp_path / "pred"
    run_train(load_config(_cfg(data_dir, out, max_steps=2, save_steps=100, val_size=3, do_predict=True,
                               max_new_tokens=6, predict_batch_size=2)))
    rows = [json.loads(x) for x in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"prompt", "predict", "label"} <= set(r) for r in rows)
    assert {r["label"] for r in rows} <= {row["output"] for row in ROWS}
    results = json.loads((out / "all_results.json").read_text())
    assert "train_loss" in results and "predict_bleu-4" in results and "predict_rouge-l" in results


def test_fast_path_trains_the_same_adapter_as_the_standard_path(data_dir, tmp_path, tiny_qwen3_path):
    """`fast_path: auto` (taken for the tiny Qwen3) and `off` write the same adapter files: the same tensor names
    and shapes, and after 3 optimizer steps (fp32, CPU) the same values and losses."""
    from safetensors.torch import load_file

    outs = {}
    for setting in ("auto", "off"):
        out = tmp_path / setting
        outcome = run_train(load_config(_cfg(data_dir, out, max_steps=3, save_steps=100, fast_path=setting)))
        assert outcome.metrics["train_loss"] > 0
        outs[setting] = out
    fast, std = (load_file(str(outs[s] / "adapter_model.safetensors")) for s in ("auto", "off"))
    assert {k: v.shape for k, v in fast.items()} == {k: v.shape for k, v in std.items()}
    for name, tensor in std.items():
        assert (fast[name] - tensor).abs().max() <= 1e-4 * tensor.abs().max(), name
    for step, loss in _losses(outs["off"]).items():
        assert _losses(outs["auto"])[step] == pytest.approx(loss, rel=1e-4)


def test_guard_folds_micro_batch_losses_on_the_device_and_checks_once_per_step():
    """Each micro-batch loss is folded into a device flag (no host sync); one NaN among them skips the step,
    also under fp16 loss scaling, where only the loss counts."""
    from types import SimpleNamespace

    from loraforge.train.callbacks import NonFiniteGuard

    guard = NonFiniteGuard(max_consecutive=3, uses_grad_scaler=True)
    param = torch.nn.Parameter(torch.ones(2))
    model = torch.nn.Module()
    model.p = param
    for step, losses in enumerate(([1.0, 2.0], [1.0, float("nan"), 3.0], [0.5])):
        for value in losses:
            guard.note_loss(torch.tensor(value))
            assert isinstance(guard._loss_ok, torch.Tensor)  # folded, not read back
        param.grad = torch.ones(2)
        guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=step), None, model=model)
        assert (param.grad is None) == (step == 1)
    assert guard.skipped_steps == [2] and guard.consecutive == 0


def test_fp8_key_runs_fp8_matmuls_through_the_whole_flow(data_dir, tmp_path, tiny_qwen3_path, monkeypatch, caplog):
    """`fp8: true` through `run_train` (CPU, fp32 compute): the run summary says so, the FP8 GEMMs run, the
    adapter is written in the usual format, and the losses stay within 1% of the 16-bit run's."""
    import logging

    from loraforge.kernels import fp8 as F8

    calls = []
    real = F8.scaled_mm
    monkeypatch.setattr(F8, "scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    for fp8 in (False, True):
        out = tmp_path / f"fp8_{fp8}"
        with caplog.at_level(logging.INFO):
            run_train(load_config(_cfg(data_dir, out, max_steps=3, save_steps=100, fp8=fp8)))
        outs[fp8] = out
        assert ("FP8 base-weight matmuls" in caplog.text) == fp8
        caplog.clear()
        assert bool(calls) == fp8
    assert (outs[True] / "adapter_model.safetensors").is_file()
    for step, loss in _losses(outs[False]).items():
        assert _losses(outs[True])[step] == pytest.approx(loss, rel=1e-2)
