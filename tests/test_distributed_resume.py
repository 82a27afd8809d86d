"""Resume on another number of GPUs: the checkpoint's batch layout, what is accepted, what is refused and why.

The end-to-end check (a two-process checkpoint resumed on one process repeats the two-process losses) is in
test_distributed_gloo.py; these are the rules, on hand-written checkpoint folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraforge.errors import TrainingError
from loraforge.train.resume_world import BatchLayout, GlobalBatch, check_resume, checkpoint_layout


@dataclass
class Args:  # the TrainingArguments fields the check reads
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    world_size: int


def _checkpoint(tmp_path: Path, layout: BatchLayout | None, *, deepspeed: bool = False) -> Path:
    ckpt = tmp_path / "checkpoint-200"
    ckpt.mkdir()
    state = {"global_step": 200, "stateful_callbacks": {}}
    if layout is not None:
        state["stateful_callbacks"]["GlobalBatch"] = GlobalBatch(
            layout.per_device, layout.accumulation, layout.processes).state()
    (ckpt / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    if deepspeed:
        (ckpt / "global_step200").mkdir()
    return ckpt


def test_layout_round_trips_through_trainer_state(tmp_path):
    ckpt = _checkpoint(tmp_path, BatchLayout(2, 4, 2))
    layout = checkpoint_layout(ckpt)
    assert layout == BatchLayout(2, 4, 2) and layout.global_batch == 16
    assert GlobalBatch.for_args(Args(2, 4, 2)).layout == layout


@pytest.mark.parametrize("args", [Args(4, 1, 1), Args(2, 2, 1), Args(1, 2, 2), Args(1, 1, 4)])
def test_same_global_batch_on_another_gpu_count_is_accepted(tmp_path, args):
    assert check_resume(_checkpoint(tmp_path, BatchLayout(2, 1, 2)), args) == BatchLayout(2, 1, 2)


def test_another_global_batch_is_refused_with_the_settings_that_keep_it(tmp_path):
    ckpt = _checkpoint(tmp_path, BatchLayout(2, 1, 2))
    with pytest.raises(TrainingError) as err:
        check_resume(ckpt, Args(2, 1, 1))
    text = str(err.value)
    assert "global batch of 4 (2 per device x 1 accumulation x 2 processes)" in text
    assert "this run has 2 (2 per device x 1 accumulation x 1 process)" in text
    assert "set per_device_train_batch_size=4 or gradient_accumulation_steps=2 to keep it" in text
    with pytest.raises(TrainingError, match="use a number of processes that divides 4"):
        check_resume(ckpt, Args(2, 1, 3))


def test_deepspeed_shards_need_the_same_process_count(tmp_path):
    ckpt = _checkpoint(tmp_path, BatchLayout(2, 1, 2), deepspeed=True)
    assert check_resume(ckpt, Args(2, 1, 2)) == BatchLayout(2, 1, 2)
    with pytest.raises(TrainingError, match=r"ZeRO shards \(global_step200/\) written by 2 processes"):
        check_resume(ckpt, Args(4, 1, 1))


def test_checkpoint_without_a_record_is_let_through_with_a_warning(tmp_path, caplog):
    assert check_resume(_checkpoint(tmp_path, None), Args(2, 1, 1)) is None
    assert "does not record its batch layout" in caplog.text
