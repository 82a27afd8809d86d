"""Checkpoint folders: find the newest complete one, clean up partial ones, decide whether and where to resume.

A checkpoint is written into ``output_dir/.staging/checkpoint-N`` and renamed to ``output_dir/checkpoint-N``
only once every file is on disk (see :class:`loraforge.train.trainer.LoraforgeTrainer`), so a folder named
``checkpoint-N`` with a ``trainer_state.json`` is always complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)

STAGING = ".staging"
FINAL_STAGING = ".staging-final"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
FINAL_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (by step number)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for child in out.iterdir():
        m = _CKPT.match(child.name)
        if m and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def clean_staging(output_dir: str | Path) -> None:
    """Remove checkpoints left half-written by a run that was killed while saving."""
    for name in (STAGING, FINAL_STAGING):
        staging = Path(output_dir) / name
        if staging.exists():
            logger.warning("removing incomplete data in %s (a previous run stopped while saving)", staging)
            shutil.rmtree(staging, ignore_errors=True)


def last_step(state: dict, args) -> int | None:
    """The step a run with ``args`` ends at, judged from a saved ``trainer_state.json`` (``state``).

    ``max_steps`` when it is set; otherwise the total the run computed from its epochs, as long as
    ``num_train_epochs`` is unchanged; None when that cannot be known before the data is loaded.
    """
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    if state.get("max_steps") and float(state.get("num_train_epochs") or 0) == float(args.num_train_epochs):
        return int(state["max_steps"])
    return None


def read_state(folder: str | Path) -> dict | None:
    """``folder/trainer_state.json`` as a dict, or None when absent or unreadable (a write cut short)."""
    try:
        state = json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _mode(resume: str | bool | None) -> str | None:
    """``last`` (true/last), ``auto``, ``path`` (a checkpoint folder) or None (do not resume)."""
    if resume is True:
        return "last"
    if isinstance(resume, str):
        low = resume.lower()
        return "last" if low in ("true", "last") else "auto" if low == "auto" else "path"
    return None


def _describe(out: Path) -> str:
    """The folder as it is, for messages."""
    if not out.exists():
        return f"{out} does not exist yet"
    if not out.is_dir():
        return f"{out} is a file, not a folder"
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return f"{out} is empty"
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"{out} holds no complete checkpoint (it holds {shown})"


def finished_run(args) -> str | None:
    """With ``resume_from_checkpoint: true/last/auto``: the "nothing to do" message when ``output_dir`` holds a run
    that reached its last step and wrote every output, else None.

    ``trainer_state.json`` in the output folder itself is written last, after the model, metrics, card and
    predictions, so its presence (with the last step reached) means the run completed.
    """
    out = Path(args.output_dir)
    if _mode(args.resume_from_checkpoint) not in ("last", "auto"):
        return None
    state = read_state(out)
    if state is None or not any((out / f).exists() for f in FINAL_FILES):
        return None
    total = last_step(state, args)
    step = int(state.get("global_step") or 0)
    if total is None or step < total:
        return None
    return (f"{out} holds a finished run (step {step} of {total}); nothing to train and nothing was changed. "
            "To train further, raise max_steps (or num_train_epochs) and resume; to start over, set "
            "overwrite_output_dir: true or choose another output_dir")


def resolve_resume(output_dir: str, resume: str | bool | None, overwrite: bool) -> str | None:
    """Decide where training starts. Returns a checkpoint path to resume from, or None to start fresh.

    - ``resume_from_checkpoint: PATH`` resumes from that folder;
    - ``true`` (or ``last``) resumes from the newest complete checkpoint, and is an error when there is none;
    - ``auto`` resumes from the newest complete checkpoint when there is one and starts fresh otherwise (the same
      command line restarts a preempted job);
    - otherwise an ``output_dir`` that already holds checkpoints or a finished model is an error, unless
      ``overwrite_output_dir: true`` asks to start over (old checkpoints are then removed).

    A run that already finished is recognised before this, by :func:`finished_run`.
    """
    out = Path(output_dir)
    clean_staging(out)
    mode = _mode(resume)
    if mode == "path":
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError([f"`resume_from_checkpoint: {resume}` is not a complete checkpoint "
                               "(no trainer_state.json); point it at a checkpoint-N folder"])
        _forget_finished(out)
        return str(path)
    if mode in ("last", "auto"):
        newest = newest_checkpoint(out)
        if newest is not None:
            logger.info("resuming from the newest complete checkpoint: %s", newest)
            _forget_finished(out)
            return str(newest)
        done = read_state(out)
        if done is not None and any((out / f).exists() for f in FINAL_FILES):
            raise ConfigError([f"{out} holds a finished run of {done.get('global_step')} steps and no checkpoint to "
                               "continue it from; set `overwrite_output_dir: true` to train again from the start, "
                               "or choose another output_dir"])
        if mode == "last":
            shown = "true" if resume is True else resume
            raise ConfigError([f"`resume_from_checkpoint: {shown}`, but {_describe(out)}: there is nothing to "
                               "resume. Set `resume_from_checkpoint: auto` to start fresh when there is no "
                               "checkpoint (and resume when there is one), or remove the key"])
        leftovers = [f for f in FINAL_FILES if (out / f).exists()]
        if leftovers:  # written by a run killed while publishing its model (no checkpoint, not finished)
            logger.warning("resume_from_checkpoint: auto: %s holds no checkpoint and an unfinished model (%s); "
                           "starting fresh, it will be replaced", out, ", ".join(leftovers))
        else:
            logger.info("resume_from_checkpoint: auto: %s; starting a fresh run",
                        _describe(out).replace("no complete checkpoint", "no checkpoint yet"))
        _forget_finished(out)
        return None
    existing = list_checkpoints(out)
    finished = [f for f in FINAL_FILES if (out / f).exists()]
    if (existing or finished) and not overwrite:
        what = f"checkpoints ({', '.join(p.name for p in existing[-3:])})" if existing else f"a trained model ({finished[0]})"
        raise ConfigError([
            f"`output_dir: {output_dir}` already holds {what}; set `resume_from_checkpoint: auto` (or true) to "
            "continue that run, `overwrite_output_dir: true` to start over, or choose another output_dir"])
    if existing:
        logger.warning("overwrite_output_dir: removing %d old checkpoint(s) from %s", len(existing), out)
        for path in existing:
            shutil.rmtree(path, ignore_errors=True)
    _forget_finished(out)
    return None


def _forget_finished(out: Path) -> None:
    """A run that trains again is not finished until it writes its outputs again (see :func:`_finished`)."""
    (out / "trainer_state.json").unlink(missing_ok=True)


def publish(staging: str | Path, output_dir: str | Path) -> None:
    """Move every file of a fully written ``staging`` folder into ``output_dir`` (each move is atomic)."""
    staging, out = Path(staging), Path(output_dir)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)
