"""`checkpoint_layers: all | auto | <int>`: which decoder layers recompute in backward.

The choice changes memory and speed, never the gradients: a test trains with every layer, some layers and no layer
checkpointed (fast path and standard path) and compares the LoRA gradients. `auto` follows the memory model with a
mocked GPU; the summary line and the estimator follow the key.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loraforge.config.model import checkpoint_layers_setting
from loraforge.errors import ConfigError
from loraforge.models.fast import FastPathPlan, apply_fast_path
from loraforge.train.checkpoint_policy import CheckpointPlan, apply_checkpoint_plan, plan_checkpointing

from fast_models import lora_grads, tiny_model


@pytest.mark.parametrize("value, expected", [("all", "all"), ("AUTO", "auto"), (None, "all"), (12, 12), ("3", 3),
                                             (0, 0)])
def test_setting_accepts(value, expected):
    assert checkpoint_layers_setting(value) == expected


@pytest.mark.parametrize("value", [-1, "some", True, 2.5])
def test_setting_refuses_with_the_accepted_forms(value):
    with pytest.raises(ValueError, match="all, auto or a number of layers"):
        checkpoint_layers_setting(value)


def test_config_refuses_layers_without_checkpointing():
    from loraforge.config import load_config

    base = {"model_name_or_path": "tiny-random-qwen3", "dataset": "x", "template": "qwen3", "output_dir": "/tmp/x"}
    with pytest.raises(ConfigError, match="checkpoint_layers: 3.*disable_gradient_checkpointing"):
        load_config({**base, "checkpoint_layers": 3, "disable_gradient_checkpointing": True}, [], purpose="train",
                     build_training_args=False)
    with pytest.raises(ConfigError, match="checkpoint_layers"):
        load_config({**base, "checkpoint_layers": "half"}, [], purpose="train", build_training_args=False)


def _checkpointed_model(arch: str = "qwen3", *, fast: bool):
    model = tiny_model(arch)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if fast:
        apply_fast_path(model, FastPathPlan(True, "test"))
    return model


def _cfg(setting, disable: bool = False):
    return SimpleNamespace(model=SimpleNamespace(checkpoint_layers=setting, disable_gradient_checkpointing=disable))


def _args(cpu: bool = True):
    return SimpleNamespace(use_cpu=cpu, device="cuda:0", deepspeed=None, fsdp=None)


def test_plan_all_int_and_too_many():
    model = _checkpointed_model(fast=True)
    assert plan_checkpointing(_cfg("all"), model, _args(), 64) == CheckpointPlan(
        2, 0, "gradient checkpointing: all 2 layers recompute in backward")
    plan = plan_checkpointing(_cfg(1), model, _args(), 64)
    assert (plan.checkpointed, plan.kept) == (1, 1) and "1 of 2 layers recompute" in plan.line
    with pytest.raises(ConfigError, match="checkpoint_layers: 3.*2 decoder layers"):
        plan_checkpointing(_cfg(3), model, _args(), 64)
    assert plan_checkpointing(_cfg("all", disable=True), model, _args(), 64).line == "gradient checkpointing: off"


def test_auto_on_a_cpu_checkpoints_every_layer():
    plan = plan_checkpointing(_cfg("auto"), _checkpointed_model(fast=True), _args(), 64)
    assert (plan.checkpointed, plan.kept) == (2, 0) and "no GPU visible" in plan.line


def test_auto_asks_the_memory_model_with_the_measured_free_memory(monkeypatch):
    """Training measures free + cached-unused memory and asks the shared rule for a micro-batch of `tokens`."""
    import loraforge.estimate as estimate
    import loraforge.estimate.model as memory_model
    from loraforge.estimate.architectures import BUILTIN_ARCHITECTURES
    from loraforge.estimate.scenario import Scenario

    gib = 2**30
    asked = []
    monkeypatch.setattr(estimate, "scenario_from_config", lambda cfg: Scenario(
        arch=BUILTIN_ARCHITECTURES["qwen3-8b"], method="qlora-4", batch_size=4, seq_len=2048, fast_path=True))
    monkeypatch.setattr(memory_model, "auto_kept_layers",
                        lambda s, free: asked.append((s.batch_size, s.seq_len, free)) or (1, 1.0 * gib, 3.0 * gib))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    model = _checkpointed_model(fast=True)
    plan = plan_checkpointing(_cfg("auto"), model, _args(cpu=False), 4096)
    assert asked == [(1, 4096, 11 * gib)]  # one row of the token budget; 10 free + (3 - 2) cached unused
    assert (plan.checkpointed, plan.kept) == (1, 1) and "3.0 GiB to spare" in plan.line
    sharded = SimpleNamespace(use_cpu=False, device="cuda:0", deepspeed="z3", fsdp=None)
    assert plan_checkpointing(_cfg("auto"), model, sharded, 4096).kept == 0


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "standard-path"])
def test_auto_rule_keeps_what_fits_and_no_more(fast):
    """The shared rule (training and the estimator): with `kept` layers the run's memory beyond the weights fits
    in 0.85 x free; one layer more would not; from nothing to every layer as free memory grows."""
    from dataclasses import replace

    from loraforge.estimate.architectures import BUILTIN_ARCHITECTURES
    from loraforge.estimate.model import AUTO_MEMORY_SHARE, auto_kept_layers, estimate_memory
    from loraforge.estimate.scenario import Scenario

    s = Scenario(arch=BUILTIN_ARCHITECTURES["qwen3-8b"], method="qlora-4", batch_size=4, seq_len=2048,
                 fast_path=fast, fused_loss=fast)
    gib = 2**30
    counts = []
    for free_gib in (1, 8, 16, 24, 40, 200):
        kept, per_layer, usable = auto_kept_layers(s, free_gib * gib)
        counts.append(kept)
        assert per_layer > 0
        if 0 < kept < 36:
            need = estimate_memory(replace(s, kept_layers=kept))
            assert need.allocated - need.weights - need.adapter <= AUTO_MEMORY_SHARE * free_gib * gib * 1.01
            more = estimate_memory(replace(s, kept_layers=kept + 1))
            assert more.allocated - more.weights - more.adapter > AUTO_MEMORY_SHARE * free_gib * gib * 0.99
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 36 and any(0 < c < 36 for c in counts)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "standard-path"])
def test_kept_layers_change_no_gradient(fast):
    """All, one and none of the two layers checkpointed: the same loss and LoRA gradients; the kept layer skips the
    recompute (its checkpoint function is never called)."""
    reference = _checkpointed_model(fast=fast)
    ids = torch.randint(0, 256, (2, 24))
    results, calls = [], []
    for kept in (0, 1, 2):
        model = copy.deepcopy(reference)
        layers = model.get_base_model().model.layers
        for index, layer in enumerate(layers):
            original = layer._gradient_checkpointing_func

            def counting(*args, _orig=original, _i=index, _kept=kept, **kwargs):
                calls.append((_kept, _i))
                return _orig(*args, **kwargs)

            layer._gradient_checkpointing_func = counting
        assert apply_checkpoint_plan(model, CheckpointPlan(2 - kept, kept, "")) == 2 - kept
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), lora_grads(model)))
    assert sorted(calls) == [(0, 0), (0, 1), (1, 0)]  # the last layer is the one kept
    for loss, grads in results[1:]:
        assert torch.allclose(loss, results[0][0], rtol=1e-6)
        for name, grad in grads.items():
            assert torch.allclose(grad, results[0][1][name], rtol=1e-5, atol=1e-7), name


def test_estimate_follows_checkpoint_layers():
    from loraforge.config import load_config
    from loraforge.estimate import estimate_memory, scenario_from_config

    base = {"model_name_or_path": "qwen3-8b", "quantization_bit": 4, "cutoff_len": 2048, "bf16": True,
            "per_device_train_batch_size": 4}
    peaks = {}
    for setting in ("all", 24, 0):
        s = scenario_from_config(load_config({**base, "checkpoint_layers": setting}, [], purpose="estimate",
                                             build_training_args=False))
        assert s.kept_layers == {"all": 0, 24: 12, 0: 36}[setting]
        peaks[setting] = estimate_memory(s).allocated
    no_ckpt = scenario_from_config(load_config({**base, "disable_gradient_checkpointing": True}, [],
                                               purpose="estimate", build_training_args=False))
    assert peaks["all"] < peaks[24] < peaks[0]
    assert peaks[0] == pytest.approx(estimate_memory(no_ckpt).allocated, rel=0.01)  # 36 kept = no checkpointing


def test_training_run_reports_and_applies_it(tmp_path, tiny_qwen3_path, caplog):
    from loraforge.cli import main

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": f"Add {a} and 3.", "input": "", "output": str(a + 3)} for a in range(16)]
    (data / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}), encoding="utf-8")
    out = tmp_path / "out"
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_name_or_path": "tiny-random-qwen3", "dataset": "d", "dataset_dir": str(data), "template": "qwen3",
        "cutoff_len": 32, "output_dir": str(out), "max_steps": 2, "save_steps": 100, "report_to": "none",
        "per_device_train_batch_size": 2, "disable_gradient_checkpointing": False}), encoding="utf-8")
    import logging

    with caplog.at_level(logging.INFO, logger="loraforge"):
        assert main(["train", str(cfg), "checkpoint_layers=1"]) == 0
    text = caplog.text
    assert "gradient checkpointing: 1 of 4 layers recompute in backward, the last 3 keep their activations" in text
    assert Path(out / "adapter_model.safetensors").is_file()


def test_estimate_shows_what_auto_keeps_on_a_given_gpu():
    from loraforge.config import load_config
    from loraforge.estimate import scenario_from_config
    from loraforge.estimate.gpus import find_gpu
    from loraforge.estimate.result import build_estimate

    cfg = load_config({"model_name_or_path": "qwen3-8b", "quantization_bit": 4, "cutoff_len": 2048, "bf16": True,
                       "per_device_train_batch_size": 4, "checkpoint_layers": "auto"}, [], purpose="estimate",
                      build_training_args=False)
    s = scenario_from_config(cfg)
    assert s.checkpoint_auto and s.kept_layers == 0
    on_4090 = build_estimate(s, find_gpu("4090"))
    kept = on_4090.scenario.kept_layers
    assert 0 < kept < 36 and on_4090.fits  # some layers keep their activations, and it still fits
    assert any(f"the last {kept} of 36 layers keep their activations" in n for n in on_4090.notes)
    assert build_estimate(s, find_gpu("A100-80")).scenario.kept_layers == 36  # 47.7 GiB without checkpointing
    assert build_estimate(s, find_gpu("T4")).scenario.kept_layers < kept
    assert any("estimated as `all`" in n for n in build_estimate(s, None).notes)


def test_auto_plans_for_the_largest_micro_batch_a_step_can_form():
    """`checkpoint_layers: auto` sizes kept layers for the largest micro-batch the run can form: a big token budget
    never holds more than one optimizer step's samples, and a sample longer than the budget runs alone."""
    from types import SimpleNamespace

    from loraforge.train.token_budget import TokenBatchingPlan

    args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1)
    assert TokenBatchingPlan(65536, "").largest_micro_batch(args, 2048) == 8192  # one step: 4 x 2048
    assert TokenBatchingPlan(1000, "").largest_micro_batch(args, 2048) == 2048  # a full-length sample alone
    assert TokenBatchingPlan(6000, "").largest_micro_batch(args, 2048) == 6000
    assert TokenBatchingPlan(None, "").largest_micro_batch(args, 2048) == 8192  # off: 4 padded rows
    args.gradient_accumulation_steps = 8
    assert TokenBatchingPlan(65536, "").largest_micro_batch(args, 2048) == 65536
