"""Two CPU processes (torchrun + gloo) through the real CLI: same losses as one process, one checkpoint, resume.

`FORCE_TORCHRUN=1 loraforge train cfg.yaml nproc_per_node=2 per_device_train_batch_size=2` must train exactly
like one process with `per_device_train_batch_size=4` (same global batch of 4 samples per step).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

# Every row tokenizes to the same length, so each rank holds the same number of trained tokens and the mean loss
# over 2 x 2 samples equals the mean over 4.
ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}"}
        for a, b in zip(range(50, 66), range(83, 99))]
STEPS = 4
LAUNCH_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES",
               "NODE_RANK", "FORCE_TORCHRUN", "OMP_NUM_THREADS")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _train(cfg: Path, overrides: list[str], **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "loraforge.cli", "train", str(cfg), *overrides],
                          env=_env(**env), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines() if x.strip()]
    return {r["current_steps"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_qwen3_path):
    """One process x batch 4 and two processes x batch 2, four steps each, checkpoints at steps 2 and 4."""
    base = tmp_path_factory.mktemp("gloo")
    data = base / "data"
    data.mkdir()
    (data / "sums.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"sums": {"file_name": "sums.json"}}), encoding="utf-8")
    cfg = base / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_name_or_path": "tiny-random-qwen3", "dataset": "sums", "dataset_dir": str(data), "template": "qwen3",
        "cutoff_len": 48, "finetuning_type": "lora", "lora_rank": 8, "lora_dropout": 0.0, "learning_rate": 5e-3,
        "max_steps": STEPS, "logging_steps": 1, "save_steps": 2, "seed": 3,
        "disable_gradient_checkpointing": True, "plot_loss": True, "data_cache_dir": str(base / "cache"),
    }), encoding="utf-8")
    from loraforge.cli import main  # the one-process reference runs in this process: same CLI, no start-up cost

    assert main(["train", str(cfg), f"output_dir={base / 'one'}", "per_device_train_batch_size=4"]) == 0
    two = _train(cfg, [f"output_dir={base / 'two'}", "per_device_train_batch_size=2", "nproc_per_node=2",
                       "ddp_timeout=900"], FORCE_TORCHRUN="1")
    return {"cfg": cfg, "base": base, "one": base / "one", "two": base / "two", "stderr_two": two.stderr}


def test_two_processes_reach_the_losses_of_one(runs):
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-3), (step, one, two)
    assert two[STEPS] < two[1]  # it learned something


def test_two_processes_learn_the_same_adapter(runs):
    from safetensors.torch import load_file

    a = load_file(str(runs["one"] / "adapter_model.safetensors"))
    b = load_file(str(runs["two"] / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    assert worst <= 1e-3 * scale, (worst, scale)


def test_only_rank_zero_writes_and_logs(runs):
    one, two = runs["one"], runs["two"]
    top_one = {p.name for p in one.iterdir()}
    top_two = {p.name for p in two.iterdir()}
    assert top_two == top_one  # the same files, each written once (no per-rank copies)
    assert {"checkpoint-2", "checkpoint-4", "adapter_model.safetensors", "run_config.yaml", "training_loss.png",
            "README.md", "all_results.json"} <= top_two
    assert ".staging" not in top_two
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        files_one = {p.name for p in (one / ckpt).iterdir()}
        files_two = {p.name for p in (two / ckpt).iterdir()}
        # each rank keeps its own RNG state for an exact resume; everything else exists once
        assert files_two == (files_one - {"rng_state.pth"}) | {"rng_state_0.pth", "rng_state_1.pth"}
    rows = [json.loads(x) for x in (two / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in rows] == list(range(1, STEPS + 1))  # no line written by rank 1
    log = runs["stderr_two"]
    assert log.count("effective batch size: 2 per device x 1 accumulation x 2 process(es) = 4") == 1
    assert "launching 2 process(es) on this node (CPU, gloo backend" in log
    assert log.count("gloo process group: 2 CPU processes, ddp_timeout 900 s") == 1


def test_every_rank_uses_one_data_cache(runs):
    """Rank 0 tokenizes and caches first; rank 1 (and the one-process run, same data keys) reuse that entry."""
    entries = [p for p in (runs["base"] / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1, sorted(p.name for p in (runs["base"] / "cache").iterdir())


def test_resume_across_the_two_process_run(runs):
    """Resume the two-process run from its step-2 checkpoint: steps 3-4 repeat the uninterrupted run's losses."""
    resumed = runs["base"] / "resumed"
    resumed.mkdir()
    shutil.copytree(runs["two"] / "checkpoint-2", resumed / "checkpoint-2")
    _train(runs["cfg"], [f"output_dir={resumed}", "per_device_train_batch_size=2", "nproc_per_node=2",
                         f"resume_from_checkpoint={resumed / 'checkpoint-2'}", "plot_loss=false"],
           FORCE_TORCHRUN="1")
    full, again = _losses(runs["two"]), _losses(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert again[step] == pytest.approx(full[step], rel=1e-4), (step, full, again)
    state = json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS


def test_checkpoints_record_the_global_batch(runs):
    state = json.loads((runs["two"] / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["GlobalBatch"]["args"] == {"per_device": 2, "accumulation": 1, "processes": 2}


def test_two_process_checkpoint_resumes_on_one_process(runs):
    """Same global batch (1 process x 4 instead of 2 x 2): steps 3-4 repeat the two-process run's losses."""
    from loraforge.cli import main

    resumed = runs["base"] / "resumed_one"
    resumed.mkdir()
    shutil.copytree(runs["two"] / "checkpoint-2", resumed / "checkpoint-2")
    assert main(["train", str(runs["cfg"]), f"output_dir={resumed}", "per_device_train_batch_size=4",
                 f"resume_from_checkpoint={resumed / 'checkpoint-2'}", "plot_loss=false"]) == 0
    full, again = _losses(runs["two"]), _losses(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):  # the one- and two-process runs agree to ~1e-3 (reduction order), as above
        assert again[step] == pytest.approx(full[step], rel=2e-3), (step, full, again)


def test_resume_with_another_global_batch_is_refused(runs, capsys):
    """1 process x 2 per device would skip the wrong samples: refused, with the settings that keep the batch."""
    from loraforge.cli import main

    resumed = runs["base"] / "resumed_wrong"
    resumed.mkdir()
    shutil.copytree(runs["two"] / "checkpoint-2", resumed / "checkpoint-2")
    code = main(["train", str(runs["cfg"]), f"output_dir={resumed}", "per_device_train_batch_size=2",
                 f"resume_from_checkpoint={resumed / 'checkpoint-2'}"])
    err = capsys.readouterr().err
    assert code != 0
    assert "global batch of 4 (2 per device x 1 accumulation x 2 processes)" in err
    assert "this run has 2 (2 per device x 1 accumulation x 1 process)" in err
    assert "per_device_train_batch_size=4 or gradient_accumulation_steps=2" in err


def test_ddp_timeout_reaches_the_cpu_process_group(tmp_path):
    """The Trainer does not pass ddp_timeout to a CPU process group; the worker setup does."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from loraforge.train.distributed import init_cpu_process_group
        assert init_cpu_process_group(1234)
        assert not init_cpu_process_group(99)  # an existing group is kept
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        print(f"rank {dist.get_rank()} timeout {backend.options._timeout.total_seconds():.0f}")
        dist.destroy_process_group()
    """), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 timeout 1234" in proc.stdout and "rank 1 timeout 1234" in proc.stdout


def test_fast_path_with_checkpointing_trains_on_two_processes(runs, tmp_path):
    """The fast path's checkpoint recomputes layers inside backward: DDP must not count their LoRA weights unused
    (it failed with "marked ready twice"); two processes reach one process's losses with checkpointing on."""
    common = ["disable_gradient_checkpointing=false", "fast_path=on", "max_steps=2", "save_steps=100"]
    from loraforge.cli import main

    assert main(["train", str(runs["cfg"]), f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=4",
                 *common]) == 0
    _train(runs["cfg"], [f"output_dir={tmp_path / 'two'}", "per_device_train_batch_size=2", "nproc_per_node=2",
                         "ddp_timeout=900", *common], FORCE_TORCHRUN="1")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-3), (step, one, two)
