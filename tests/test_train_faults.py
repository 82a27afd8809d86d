"""Faults lose nothing: a run killed at any moment and restarted with the same command ends exactly like an
uninterrupted one; resuming a finished run changes nothing; `resume_from_checkpoint: auto` starts or resumes."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import threading
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from faultkit import die, hidden_leftovers, in_child, sums_setup, train_config
from loraforge.cli import main
from loraforge.config import load_config
from loraforge.errors import ConfigError
from loraforge.train import workflow
from loraforge.train.checkpoint import resolve_resume
from loraforge.train.trainer import LoraforgeTrainer
from loraforge.train.workflow import run_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    return sums_setup(tmp_path_factory.mktemp("faults"))


def _cfg(setup, out: Path, **over) -> dict:
    return train_config(*setup, out, **over)


def _log_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> Path:
    """One uninterrupted run: the standard every interrupted run must meet."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_train(load_config(_cfg(setup, out, resume_from_checkpoint=None)))
    return out


class _Fault(TrainerCallback):
    """Send ``sig`` (``times`` times) to this process at ``event`` of step ``step``."""

    def __init__(self, event: str, step: int, sig: int = signal.SIGKILL, times: int = 1):
        self.event, self.step, self.sig, self.times = event, step, sig, times

    def _fire(self, event: str, state) -> None:
        if event == self.event and state.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)

    def on_step_end(self, args, state, control, **kwargs):
        self._fire("step_end", state)

    def on_log(self, args, state, control, **kwargs):
        self._fire("log", state)

    def on_save(self, args, state, control, **kwargs):
        self._fire("save", state)

    def on_train_end(self, args, state, control, **kwargs):
        self._fire("train_end", state)


def _kill_inside_checkpoint_save(step: int):
    """Die after the checkpoint's weights are written and before its optimizer state is."""
    original = LoraforgeTrainer._save_optimizer_and_scheduler

    def patched(self, output_dir):
        if self.state.global_step == step:
            die()
        return original(self, output_dir)

    LoraforgeTrainer._save_optimizer_and_scheduler = patched


def _kill_inside_publish():
    """Die after moving the first file of the final model into output_dir."""
    def patched(staging, output_dir):
        first = sorted(p for p in Path(staging).iterdir() if p.is_file())[0]
        os.replace(first, Path(output_dir) / first.name)
        die()

    workflow.publish = patched


def test_killed_at_every_kind_of_moment_then_resumed_equals_the_uninterrupted_run(setup, tmp_path, reference):
    out = tmp_path / "run"
    cfg = _cfg(setup, out)
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg), encoding="utf-8")

    def train(callbacks=(), patch=None):
        def child():
            if patch:
                patch()
            run_train(load_config(cfg), extra_callbacks=list(callbacks))
        return in_child(child)

    kill = -signal.SIGKILL
    # mid-training before any checkpoint: auto then starts fresh
    assert train([_Fault("step_end", 1)]) == kill and not (out / "checkpoint-2").exists()
    # inside the first checkpoint's save: the half-written checkpoint is never used
    assert train(patch=lambda: _kill_inside_checkpoint_save(2)) == kill and (out / ".staging").is_dir()
    # right after logging step 3 (checkpoint-2 is complete): step 3 is trained and logged again
    assert train([_Fault("log", 3)]) == kill and (out / "checkpoint-2").is_dir() and not (out / ".staging").exists()
    # SIGTERM twice: the second stops at once (exit 130), no new checkpoint
    assert in_child(lambda: _sigterm_twice(cfg_file)) == 130 and not (out / "checkpoint-4").exists()
    # just after checkpoint-4 is complete
    assert train([_Fault("save", 4)]) == kill and (out / "checkpoint-4").is_dir()
    # after the last checkpoint (step 6), before the final model is written
    assert train([_Fault("train_end", 6)]) == kill and (out / "checkpoint-6").is_dir()
    assert not (out / "adapter_model.safetensors").exists()
    # while the final model is moved into place (half of its files there)
    assert train(patch=_kill_inside_publish) == kill
    assert not (out / "trainer_state.json").exists()
    # and at random moments of finishing from checkpoint-6 (a kill may also land after the end: then it is done)
    rng = random.Random(11)
    for _ in range(2):
        delay = rng.uniform(0.05, 1.0)
        assert train(patch=lambda delay=delay: threading.Timer(delay, die).start()) in (kill, 0)

    run_train(load_config(cfg))  # the same command once more: it finishes from checkpoint-6, training nothing

    assert (out / "adapter_model.safetensors").read_bytes() == (reference / "adapter_model.safetensors").read_bytes()
    rows, expected = _log_rows(out), _log_rows(reference)
    assert [r["current_steps"] for r in rows] == list(range(1, 7))  # every step once: no gap, no duplicate
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]
    assert hidden_leftovers(out) == []
    assert json.loads((out / "all_results.json").read_text())["train_loss"] == pytest.approx(
        json.loads((reference / "all_results.json").read_text())["train_loss"], rel=1e-5)


def _sigterm_twice(cfg_file: Path) -> int:
    """`loraforge train`'s exit code when SIGTERM arrives twice during step 4."""
    original = workflow.run_train
    workflow.run_train = lambda cfg: original(cfg, extra_callbacks=[_Fault("step_end", 4, signal.SIGTERM, times=2)])
    return main(["train", str(cfg_file)])


def test_resuming_a_finished_run_changes_nothing_and_exits_0(setup, tmp_path, reference, caplog):
    out = tmp_path / "done"
    shutil.copytree(reference, out)

    def files():
        return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}

    before = files()
    for resume in ("true", "auto"):
        cfg_file = tmp_path / f"{resume}.yaml"
        cfg_file.write_text(yaml.safe_dump(_cfg(setup, out, resume_from_checkpoint=resume)), encoding="utf-8")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loraforge"):
            assert main(["train", str(cfg_file)]) == 0
        assert f"{out} holds a finished run (step 6 of 6)" in caplog.text
        assert files() == before  # no checkpoint-7, results not overwritten, nothing touched


def test_auto_starts_fresh_and_true_describes_the_folder(tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    assert resolve_resume(str(missing), "auto", False) is None
    with pytest.raises(ConfigError, match=r"missing does not exist yet: there is nothing to resume.*`resume_from_checkpoint: auto`"):
        resolve_resume(str(missing), True, False)
    with pytest.raises(ConfigError, match=r"empty is empty"):
        resolve_resume(str(empty), "last", False)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"holds no complete checkpoint \(it holds notes.txt\)"):
        resolve_resume(str(empty), True, False)
    cfg = load_config({"model_name_or_path": "tiny-random-qwen3", "dataset": "x", "output_dir": str(missing),
                       "resume_from_checkpoint": "auto", "report_to": "none"}, purpose="train")
    assert cfg.training.resume_from_checkpoint == "auto"
