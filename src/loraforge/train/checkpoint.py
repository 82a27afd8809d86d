"""Checkpoint folders: find the newest complete one, clean up partial ones, decide whether to resume.

A checkpoint is written into ``output_dir/.staging/checkpoint-N`` and renamed to ``output_dir/checkpoint-N``
only once every file is on disk (see :class:`loraforge.train.trainer.LoraforgeTrainer`), so a folder named
``checkpoint-N`` with a ``trainer_state.json`` is always complete.
"""

from __future__ import annotations

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


def resolve_resume(output_dir: str, resume: str | bool | None, overwrite: bool) -> str | None:
    """Decide where training starts. Returns a checkpoint path to resume from, or None to start fresh.

    - ``resume_from_checkpoint: PATH`` resumes from that folder;
    - ``resume_from_checkpoint: true`` (or ``last``) resumes from the newest complete checkpoint;
    - otherwise an ``output_dir`` that already holds checkpoints or a finished model is an error, unless
      ``overwrite_output_dir: true`` asks to start over (old checkpoints are then removed).
    """
    out = Path(output_dir)
    clean_staging(out)
    if isinstance(resume, str) and resume.lower() not in ("true", "last"):
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError([f"`resume_from_checkpoint: {resume}` is not a complete checkpoint "
                               "(no trainer_state.json); point it at a checkpoint-N folder"])
        return str(path)
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "last")):
        newest = newest_checkpoint(out)
        if newest is None:
            raise ConfigError([f"`resume_from_checkpoint: true` but {out} holds no complete checkpoint; "
                               "remove it to start a fresh run"])
        logger.info("resuming from the newest complete checkpoint: %s", newest)
        return str(newest)
    existing = list_checkpoints(out)
    finished = [f for f in FINAL_FILES if (out / f).exists()]
    if (existing or finished) and not overwrite:
        what = f"checkpoints ({', '.join(p.name for p in existing[-3:])})" if existing else f"a trained model ({finished[0]})"
        raise ConfigError([
            f"`output_dir: {output_dir}` already holds {what}; set `resume_from_checkpoint: true` to continue "
            "that run, `overwrite_output_dir: true` to start over, or choose another output_dir"])
    if existing and overwrite:
        logger.warning("overwrite_output_dir: removing %d old checkpoint(s) from %s", len(existing), out)
        for path in existing:
            shutil.rmtree(path, ignore_errors=True)
    return None


def publish(staging: str | Path, output_dir: str | Path) -> None:
    """Move every file of a fully written ``staging`` folder into ``output_dir`` (each move is atomic)."""
    staging, out = Path(staging), Path(output_dir)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)
