"""Token-budget batching (`micro_batch_tokens`): the same optimizer steps as `off`, in fewer packed micro-batches.

The regrouping itself is tested tensor by tensor; the training runs (tiny-random-qwen3, fp32, CPU) prove that after
3 optimizer steps the adapter equals the `off` run's within 1e-5 for bs 2 x GA 4, bs 1 x 8 and bs 4 x 1, with the
same logged losses, epochs, tokens seen and step numbers, and that resume is exact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from loraforge.config import load_config
from loraforge.errors import ConfigError
from loraforge.train.token_batching import StepSlot, greedy_groups, is_empty_slot, repack_step, split_to

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# samples of different lengths, so padding differs from packing and several budgets split steps differently
ROWS = [{"instruction": "Say " + " ".join(["word"] * (i % 7 + 1)), "input": "",
         "output": " ".join(["ok"] * (3 * (i % 5) + 1))} for i in range(40)]
STEPS = 3
# AdamW divides each update by sqrt(v) + eps. Right after LoRA B leaves zero some LoRA A gradients are ~1e-9, so
# fp32 summation-order noise in them (~1e-7 of the sum; packing changes the matmul shapes) would become update
# differences of up to lr x noise / eps = 5e-5 with the default eps 1e-8 (two `off` runs that only group the same
# samples differently already differ by 3e-6). eps = 1e-6 keeps that noise below 1e-6; losses and gradient norms
# are compared step by step as well.
TRAIN = {"learning_rate": 5e-3, "adam_epsilon": 1e-6, "max_steps": STEPS, "logging_steps": 1, "lora_rank": 8,
         "seed": 1, "disable_gradient_checkpointing": True, "template": "qwen3", "cutoff_len": 48}


def test_greedy_groups_keep_order_and_budget():
    assert greedy_groups([3, 4, 2, 5, 1], 7) == [(0, 2), (2, 4), (4, 5)]
    assert greedy_groups([9, 2, 2], 4) == [(0, 1), (1, 3)]  # longer than the budget: alone
    assert greedy_groups([1, 1, 1], 100) == [(0, 3)]
    assert greedy_groups([], 8) == []


def test_split_to_reaches_the_count_other_ranks_need():
    assert split_to([(0, 4)], [5, 5, 5, 5], 2) == [(0, 2), (2, 4)]
    assert split_to([(0, 1), (1, 4)], [9, 1, 1, 1], 3) == [(0, 1), (1, 2), (2, 4)]
    assert split_to([(0, 1)], [7], 3) == [(0, 1)]  # one sample cannot be split


def _padded(rows: list[list[int]], pad: int = 0) -> dict:
    width = max(map(len, rows))
    return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (width - len(r)) for r in rows])}


def test_repack_step_builds_the_flattened_packed_format():
    a, b, c, d = [11, 12, 13], [21, 22], [31, 32, 33, 34], [41]
    batches = [_padded([a, b]), _padded([c, d])]
    out = repack_step(batches, budget=6)
    assert len(out) == 2 and all(isinstance(x, StepSlot) for x in out)
    assert [x["input_ids"].tolist() for x in out] == [[a + b], [c + d]]  # same samples, same order
    first = out[0]
    assert first["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert first["labels"].tolist() == [[-100, 12, 13, -100, 22]]  # no target across a sample boundary
    assert first["cu_seq_lens_q"].tolist() == first["cu_seq_lens_k"].tolist() == [0, 3, 5]
    assert first["cu_seq_lens_q"].dtype == torch.int32
    assert first["max_length_q"] == first["max_length_k"] == 3
    assert first["use_cache"] is False and "attention_mask" not in first
    assert out[0].counted["attention_mask"] is batches[0]["attention_mask"]  # tokens seen: counted as `off`


def test_repack_step_puts_empty_slots_first():
    batches = [_padded([[1, 2]]), _padded([[3, 4, 5]]), _padded([[6]])]
    out = repack_step(batches, budget=100)
    assert [is_empty_slot(x) for x in out] == [True, True, False]  # the last backward syncs DDP gradients
    assert out[2]["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert [x.counted["input_ids"].shape for x in out] == [b["input_ids"].shape for b in batches]


def test_repack_step_runs_as_many_micro_batches_as_the_busiest_rank():
    batches = [_padded([[1, 2]]), _padded([[3, 4, 5]]), _padded([[6]])]
    out = repack_step(batches, budget=100, sync_count=lambda local: max(local, 2))
    assert [is_empty_slot(x) for x in out] == [True, False, False]
    assert [x["input_ids"].tolist() for x in out[1:]] == [[[1, 2]], [[3, 4, 5, 6]]]  # split nearest half


def test_repack_step_keeps_the_step_when_it_would_need_more_micro_batches():
    batches = [_padded([[1, 2, 3], [4, 5, 6]])]  # two samples longer than the budget, one micro-batch in `off`
    out = repack_step(batches, budget=2)
    assert len(out) == 1 and out[0]["input_ids"] is batches[0]["input_ids"]


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (False, None), ("off", None), (4096, 4096),
                                                 ("8_192", 8192), (True, "auto")])
def test_micro_batch_tokens_values(value, expected):
    from loraforge.config.finetuning import micro_batch_tokens_setting

    cfg = load_config({"model_name_or_path": "tiny-random-qwen3", "dataset": "x", "micro_batch_tokens": value},
                      purpose="train", build_training_args=False)
    assert micro_batch_tokens_setting(cfg.finetuning.micro_batch_tokens) == expected


@pytest.mark.parametrize("value", [0, -5, "lots", 1.5])
def test_micro_batch_tokens_rejects_nonsense(value):
    with pytest.raises(ConfigError, match="micro_batch_tokens` must be auto, off or a positive number"):
        load_config({"model_name_or_path": "tiny-random-qwen3", "dataset": "x", "micro_batch_tokens": value},
                    purpose="train", build_training_args=False)


def test_auto_budget_follows_the_memory_model(monkeypatch):
    """The GPU path of `auto` on a simulated device: more free memory, larger budget; sdpa pays for its mask."""
    from types import SimpleNamespace

    from loraforge.train import token_budget

    cfg = load_config({"model_name_or_path": "tiny-random-qwen3", "dataset": "x", "bf16": True,
                       "quantization_bit": 4, "per_device_train_batch_size": 2, "cutoff_len": 1024},
                      purpose="train", build_training_args=False)
    args = SimpleNamespace(per_device_train_batch_size=2, use_cpu=False, device="cuda:0")
    free = {"bytes": 20 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)

    def budget(impl: str) -> tuple[int, str]:
        return token_budget.auto_budget(cfg, SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl)), args)

    per_token, _ = token_budget._memory_model(cfg)
    sdpa, why = budget("sdpa")
    flash, _ = budget("flash_attention_2")
    assert sdpa % 256 == 0 and 2048 < sdpa <= flash <= 0.85 * free["bytes"] / per_token
    assert "GiB free for activations" in why and "sdpa mask" in why
    assert budget("eager")[0] == 2 * 1024  # what `off` would hold at most
    free["bytes"] = 200 * 2**30
    assert budget("flash_attention_2")[0] == token_budget.AUTO_CAP
    free["bytes"] = 2**28
    assert budget("sdpa")[0] == 2 * 1024  # never below `off`'s own worst case


# --- training runs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokdata")
    (d / "t.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (d / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.json"}}), encoding="utf-8")
    return d


class ForwardCounter:
    """Counts the model's forward passes and the rows of each (to prove the steps really were regrouped)."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))


def _train(data_dir: Path, out: Path, **over) -> tuple[dict, list[dict], list[tuple[int, ...]]]:
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from loraforge.train.workflow import run_train

    counter = ForwardCounter()

    class Hook(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.get_base_model().register_forward_pre_hook(counter, with_kwargs=True)

    cfg = {"model_name_or_path": "tiny-random-qwen3", "dataset": "t", "dataset_dir": str(data_dir),
           "output_dir": str(out), "save_steps": 2, "data_cache_dir": str(data_dir / "cache"), **TRAIN}
    cfg.update(over)
    run_train(load_config(cfg, purpose="train"), extra_callbacks=[Hook()])
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines() if x.strip()]
    return load_file(str(out / "adapter_model.safetensors")), log, counter.shapes


def _assert_same_training(off, tok):
    (a, log_a, _), (b, log_b, _) = off, tok
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, worst
    keys = ("current_steps", "total_steps", "epoch", "tokens_seen", "lr")
    assert [{k: r.get(k) for k in keys} for r in log_a] == [{k: r.get(k) for k in keys} for r in log_b]
    assert [r["current_steps"] for r in log_a] == list(range(1, STEPS + 1))
    for ra, rb in zip(log_a, log_b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)


@pytest.fixture(scope="module")
def runs_2x4(data_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("tok2x4")
    shape = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}
    off = _train(data_dir, base / "off", micro_batch_tokens="off", **shape)
    tok = _train(data_dir, base / "tok", micro_batch_tokens=100, **shape)  # several packed micro-batches a step
    return base, shape, off, tok


def test_bs2_ga4_matches_off(runs_2x4):
    _, _, off, tok = runs_2x4
    _assert_same_training(off, tok)
    assert len(off[2]) == 4 * STEPS and all(s[0] == 2 for s in off[2])
    assert STEPS < len(tok[2]) < len(off[2]) and all(s[0] == 1 and s[1] <= 100 for s in tok[2])


@pytest.mark.parametrize(("bs", "ga"), [(1, 8), (4, 1)])
def test_other_batch_shapes_match_off(data_dir, tmp_path, bs, ga):
    shape = {"per_device_train_batch_size": bs, "gradient_accumulation_steps": ga}
    off = _train(data_dir, tmp_path / "off", micro_batch_tokens="off", **shape)
    tok = _train(data_dir, tmp_path / "auto", **shape)  # auto on CPU: 4096 tokens, one micro-batch a step
    _assert_same_training(off, tok)
    assert len(off[2]) == ga * STEPS and len(tok[2]) == STEPS


def test_resume_is_exact(runs_2x4, data_dir):
    base, shape, _, tok = runs_2x4
    resumed = base / "resumed"
    resumed.mkdir()
    shutil.copytree(base / "tok" / "checkpoint-2", resumed / "checkpoint-2")
    weights, log, _ = _train(data_dir, resumed, micro_batch_tokens=100, resume_from_checkpoint=True, **shape)
    assert [r["current_steps"] for r in log] == [3]
    full = {r["current_steps"]: r for r in tok[1]}
    assert log[0]["loss"] == pytest.approx(full[3]["loss"], rel=1e-6)
    assert (log[0]["epoch"], log[0]["tokens_seen"]) == (full[3]["epoch"], full[3]["tokens_seen"])
    assert max(float((weights[k] - tok[0][k]).abs().max()) for k in weights) <= 1e-6


def test_run_summary_says_why_it_is_off(data_dir, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="loraforge")
    _train(data_dir, tmp_path / "neat", neat_packing=True, per_device_train_batch_size=2, max_steps=1)
    assert "token batching: off, `packing`/`neat_packing` already fill each sequence" in caplog.text


# --- two processes (torchrun + gloo): each rank regroups its own share ---------------------------------------

WORKER = """
import json, logging, sys
import torch
from loraforge.config import load_config
from loraforge.train.distributed import configure_worker_logging, init_cpu_process_group, rank_info
from loraforge.train.workflow import run_train

torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO)
configure_worker_logging(rank_info())
init_cpu_process_group(600)
for cfg in json.loads(open(sys.argv[1]).read()):
    run_train(load_config(cfg, purpose="train"))
"""
# name: (batch size, accumulation, modes). 1 x 8 makes the same optimizer steps as 2 x 4 (16 samples over two
# ranks), so its token-batched run is compared with the 2 x 4 `off` run (one launch less on a busy 2-core CI).
DDP_RUNS = {"2x4": (2, 4, ("off", 100)), "1x8": (1, 8, ("auto",)), "4x1": (4, 1, ("off", "auto"))}
DDP_PAIRS = [("2x4-off", "2x4-100"), ("2x4-off", "1x8-auto"), ("4x1-off", "4x1-auto")]


@pytest.mark.slow
def test_two_processes_match_off(data_dir, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    configs = []
    for name, (bs, ga, modes) in DDP_RUNS.items():
        for mode in modes:
            configs.append({
                "model_name_or_path": "tiny-random-qwen3", "dataset": "t", "dataset_dir": str(data_dir),
                "output_dir": str(tmp_path / f"{name}-{mode}"), "save_strategy": "no",
                "data_cache_dir": str(data_dir / "cache"), "per_device_train_batch_size": bs,
                "gradient_accumulation_steps": ga, "micro_batch_tokens": mode, **TRAIN})
    (tmp_path / "configs.json").write_text(json.dumps(configs), encoding="utf-8")
    (tmp_path / "worker.py").write_text(WORKER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), str(tmp_path / "configs.json")],
                          env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for pair in DDP_PAIRS:
        runs = []
        for name in pair:
            out = tmp_path / name
            log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines() if x.strip()]
            runs.append((load_file(str(out / "adapter_model.safetensors")), log, []))
        _assert_same_training(*runs)
    assert "token batching: the 8 samples of each optimizer step on each process run packed in micro-batches of " \
        "<= 100 tokens (micro_batch_tokens)" in proc.stderr
    assert "token batching: the 4 samples of each optimizer step on each process run packed in micro-batches of " \
        "<= 4096 tokens (auto: no GPU visible, a fixed 4096)" in proc.stderr


def test_qlora_4bit_trains_packed(data_dir, tmp_path):
    """bitsandbytes 4-bit layers run on the CPU too: the packed run follows the padded one."""
    shape = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 2,
             "quantization_bit": 4, "save_strategy": "no"}
    off = _train(data_dir, tmp_path / "off", micro_batch_tokens="off", **shape)
    tok = _train(data_dir, tmp_path / "tok", **shape)
    assert len(off[2]) == 4 and len(tok[2]) == 2
    assert [r["loss"] for r in tok[1]] == pytest.approx([r["loss"] for r in off[1]], rel=1e-5)
    assert [r["tokens_seen"] for r in tok[1]] == [r["tokens_seen"] for r in off[1]]
