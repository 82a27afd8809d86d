"""Multi-GPU launch: relaunch `loraforge train` under torchrun when several GPUs should be used."""

from __future__ import annotations


def maybe_relaunch(config: str, overrides: list[str]) -> int | None:
    """Return the exit code of a torchrun relaunch, or None to train in this process."""
    return None
