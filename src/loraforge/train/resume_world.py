"""Resuming on another number of GPUs: the global batch must stay the same, and then the data position is exact.

A checkpoint counts optimizer steps (``global_step``). On resume the Hugging Face Trainer skips
``global_step x gradient_accumulation_steps`` batches of its new dataloader; every process draws its share of
one shuffled order (the same seed gives the same order on any number of processes), so step ``k`` trains on
samples ``[k x G, (k + 1) x G)`` of that order, where the global batch is

    G = per_device_train_batch_size x gradient_accumulation_steps x processes.

Resuming with the same ``G`` therefore continues at exactly the next sample, with the optimizer state and
learning-rate schedule of the checkpoint: a 2-GPU checkpoint with 2 per device resumes on 1 GPU with 4 per device
(or 2 per device x 2 accumulation). With another ``G`` the Trainer would skip the wrong number of samples and the
schedule would no longer match the data, so that is refused with the settings that keep ``G``.

DeepSpeed checkpoints are the exception: their ZeRO shards (``global_stepN/``) load only on the number of
processes that wrote them, so such a resume on another count is refused.

Each checkpoint records its batch layout in ``trainer_state.json`` (``stateful_callbacks.GlobalBatch``, written
by :class:`GlobalBatch`), so the check needs no other file. What does not carry over between process counts is
the random stream of each rank (dropout masks): a resume on the same count restores every rank's stream exactly;
on another count the Trainer seeds the streams afresh (it logs that no matching ``rng_state`` file was found).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..errors import TrainingError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLayout:
    """How the samples of one optimizer step are split: per device x accumulation x processes."""

    per_device: int
    accumulation: int
    processes: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.accumulation * self.processes

    def describe(self) -> str:
        return (f"{self.global_batch} ({self.per_device} per device x {self.accumulation} accumulation x "
                f"{self.processes} process{'es' if self.processes != 1 else ''})")

    @classmethod
    def of(cls, args: Any) -> "BatchLayout":
        """The layout of the running job, from its TrainingArguments."""
        return cls(int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps),
                   max(int(args.world_size), 1))


class GlobalBatch(TrainerCallback, ExportableState):
    """Stores the batch layout in every checkpoint's ``trainer_state.json`` (read back by :func:`check_resume`)."""

    def __init__(self, per_device: int = 0, accumulation: int = 0, processes: int = 0):
        self.layout = BatchLayout(per_device, accumulation, processes)

    @classmethod
    def for_args(cls, args: Any) -> "GlobalBatch":
        layout = BatchLayout.of(args)
        return cls(layout.per_device, layout.accumulation, layout.processes)

    def on_train_begin(self, args, state, control, **kwargs):
        # a checkpoint written before this record existed lacks the entry, and the Trainer's next save expects it
        state.stateful_callbacks[type(self).__name__] = self.state()

    def state(self) -> dict:
        return {"args": {"per_device": self.layout.per_device, "accumulation": self.layout.accumulation,
                         "processes": self.layout.processes}, "attributes": {}}


def checkpoint_layout(checkpoint: str | Path) -> BatchLayout | None:
    """The batch layout a checkpoint was written with; None for a checkpoint that did not record it."""
    path = Path(checkpoint) / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    stored = (state.get("stateful_callbacks") or {}).get(GlobalBatch.__name__)
    if isinstance(stored, list):  # several instances are stored as a list
        stored = stored[0] if stored else None
    args = (stored or {}).get("args") or {}
    try:
        layout = BatchLayout(int(args["per_device"]), int(args["accumulation"]), int(args["processes"]))
    except (KeyError, TypeError, ValueError):
        return None
    return layout if layout.global_batch > 0 else None


def _fixes(old: BatchLayout, new: BatchLayout) -> list[str]:
    """Settings of this run that give the checkpoint's global batch with this run's number of processes."""
    g, n = old.global_batch, new.processes
    fixes = []
    if g % (n * new.accumulation) == 0:
        fixes.append(f"per_device_train_batch_size={g // (n * new.accumulation)}")
    if g % (n * new.per_device) == 0:
        fixes.append(f"gradient_accumulation_steps={g // (n * new.per_device)}")
    if not fixes and g % n == 0:
        fixes.append(f"per_device_train_batch_size={g // n} gradient_accumulation_steps=1")
    return fixes


def check_resume(checkpoint: str | Path, args: Any) -> BatchLayout | None:
    """Refuse a resume whose global batch differs from the checkpoint's; return the checkpoint's layout.

    Raises :class:`TrainingError` naming the keys that would keep the global batch. A checkpoint written before
    the layout was recorded is let through with a warning.
    """
    old, new = checkpoint_layout(checkpoint), BatchLayout.of(args)
    if old is None:
        logger.warning("%s does not record its batch layout; make sure per_device_train_batch_size x "
                       "gradient_accumulation_steps x processes equals that run's, or the data position will be "
                       "wrong after resuming", checkpoint)
        return None
    if old.global_batch != new.global_batch:
        fixes = _fixes(old, new)
        fix = (f"set {' or '.join(fixes)} to keep it" if fixes else
               f"use a number of processes that divides {old.global_batch}")
        raise TrainingError(
            f"{checkpoint} was trained with a global batch of {old.describe()}, but this run has "
            f"{new.describe()}. A resume continues the checkpoint's step count, data position and learning-rate "
            f"schedule, which only line up with the same global batch: {fix}")
    shards = sorted(p.name for p in Path(checkpoint).glob("global_step*") if p.is_dir())
    if shards and old.processes != new.processes:
        raise TrainingError(
            f"{checkpoint} holds DeepSpeed ZeRO shards ({shards[-1]}/) written by {old.processes} processes; DeepSpeed "
            f"loads them only on the same number of processes. Resume with nproc_per_node={old.processes} (the same "
            "engine), or start a new run from the adapter: adapter_name_or_path=" + str(checkpoint))
    if old.processes != new.processes:
        logger.info("resuming a %d-process checkpoint on %d process(es) with the same global batch of %d: the data "
                    "position and optimizer state continue exactly; per-rank random streams (dropout) start afresh",
                    old.processes, new.processes, new.global_batch)
    return old
