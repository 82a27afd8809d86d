"""Write an export so that a crash, a full disk or a second run never leaves a half-written model behind.

Every export is built in a hidden temporary folder next to the destination and renamed into place only
when it is complete. An existing destination is replaced only when the user asked for it (``--overwrite``
or ``export_overwrite: true``), and the free space is checked before anything is written.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ExportError

logger = logging.getLogger(__name__)

# Room kept free beyond the expected size, for file-system overhead and the tokenizer files.
DISK_MARGIN_BYTES = 256 * 2**20


def human_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; used in logs, plans and the dry-run upload listing."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_destination(dest: Path, *, overwrite: bool, also: str = "") -> None:
    """Refuse to touch an existing, non-empty export folder unless ``overwrite`` is set (``also``: extra advice)."""
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"export_dir {str(dest)!r} exists and is a file, not a folder",
                          hint="choose another `export_dir`")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ExportError(
            f"export_dir {str(dest)!r} already holds an export; it was left untouched",
            hint="pass --overwrite (or `export_overwrite: true`) to replace it, or choose another `export_dir`" + also)


def check_free_space(dest: Path, needed_bytes: int) -> int:
    """Raise :class:`ExportError` when the disk holding ``dest`` has less than ``needed_bytes`` (+ margin) free.

    Returns the free bytes so callers can log them.
    """
    probe = dest
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes + DISK_MARGIN_BYTES:
        raise ExportError(
            f"not enough free disk space for the export into {str(dest)!r}: it needs about "
            f"{human_size(needed_bytes + DISK_MARGIN_BYTES)}, and {human_size(free)} is free on that disk",
            hint="free some space, choose an `export_dir` on another disk, or export fewer formats "
                 "(`export_format: gguf` skips the merged safetensors)")
    return free


@contextmanager
def staging_folder(dest: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; on success it replaces ``dest`` atomically.

    On any error the temporary folder is deleted and ``dest`` (if it existed) is left as it was.
    """
    dest = dest.resolve()
    check_destination(dest, overwrite=overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        # Move the previous export aside first, so there is never a moment with neither folder complete.
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("export complete: %s", dest)
