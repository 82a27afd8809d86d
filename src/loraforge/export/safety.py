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

from ..disk import ensure_free_space, human_size  # noqa: F401 - human_size is imported from here by export/
from ..errors import ExportError

logger = logging.getLogger(__name__)

# Room kept free beyond the expected size, for file-system overhead and the tokenizer files.
DISK_MARGIN_BYTES = 256 * 2**20
SPACE_HINT = ("free some space, choose an `export_dir` on another disk, or export fewer formats "
              "(`export_format: gguf` skips the merged safetensors)")


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
    return ensure_free_space(dest, needed_bytes, what="write the export", error=ExportError, hint=SPACE_HINT,
                             margin=DISK_MARGIN_BYTES)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover_interrupted(dest: Path) -> None:
    """Clean up after an export that was killed: its temporary folder is removed; a previous export moved aside
    just before the kill goes back to ``dest``. Folders of exports still running (their pid is alive) stay."""
    prefix = f".{dest.name}."
    for path in dest.parent.glob(f"{prefix}*-*") if dest.parent.is_dir() else []:
        kind, _, rest = path.name[len(prefix):].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or (pid.isdigit() and _alive(int(pid))):
            continue
        if kind == "old" and not dest.exists():
            os.replace(path, dest)
            logger.warning("restored the previous export %s (an export was killed while replacing it)", dest)
        else:
            logger.warning("removing %s, left by an export that was killed", path)
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staging_folder(dest: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; on success it replaces ``dest`` atomically.

    On any error the temporary folder is deleted and ``dest`` (if it existed) is left as it was. The folder
    names carry this process's id, so a later export can tell a killed export's leftovers from a running one.
    """
    dest = dest.resolve()
    recover_interrupted(dest)
    check_destination(dest, overwrite=overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        # Move the previous export aside first, so there is never a moment with neither folder complete.
        old = dest.parent / f".{dest.name}.old-{tag}"
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
