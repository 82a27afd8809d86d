"""Free disk space: checked before every save, and a full disk reported in one line instead of a traceback.

Used by checkpoints and the final model (train/) and by exports (export/). Every message names the folder, the
space the save needs and the space that is free, so the user knows how much to clear.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import LoraforgeError

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Libraries written in Rust (tokenizers, safetensors) raise plain exceptions that only carry the OS message.
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28)", "os error 122)")
# torch.save on a full disk raises a RuntimeError without errno ("basic_ios::clear: iostream error", "unexpected
# pos"): a write that fails while the disk has less than this free is taken as a full disk.
NEARLY_FULL_BYTES = 2**20


def human_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; used in logs, plans and messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | Path) -> int:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def folder_bytes(path: str | Path) -> int:
    """Total size of the files under ``path`` (0 when it does not exist)."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) says the disk or the quota is full."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def ensure_free_space(folder: str | Path, needed: int, *, what: str, error: type[LoraforgeError], hint: str,
                      margin: int = 0) -> int:
    """Raise ``error`` when the disk of ``folder`` has less than ``needed + margin`` bytes free; return the free
    bytes. Run before writing, so the common case of a full disk fails before anything is half-written."""
    free = free_bytes(folder)
    if free < needed + margin:
        raise error(f"not enough free disk space to {what} in {folder}: it needs about "
                    f"{human_size(needed + margin)}, and {human_size(free)} is free on that disk", hint=hint)
    return free


@contextmanager
def disk_full_guard(folder: str | Path, needed: int | None, *, what: str, error: type[LoraforgeError], hint: str,
                    cleanup: Sequence[str | Path] = (), removed: bool = True) -> Iterator[None]:
    """Turn a full disk while writing into one ``error`` naming ``folder``, the space needed (when known) and the
    space free.

    The partial files in ``cleanup`` are removed first (they would keep the disk full), so the free space in the
    message is what the user really has; ``removed=False`` when the caller keeps what was written (to resume).
    """
    try:
        yield
    except LoraforgeError:
        raise  # already a message for the user (perhaps from an inner guard)
    except Exception as err:
        if not (is_disk_full(err) or free_bytes(folder) < NEARLY_FULL_BYTES):
            raise
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
        need = f"it needs about {human_size(needed)}, and " if needed is not None else ""
        note = " (the partial files were removed)" if removed else ""
        raise error(f"the disk filled up while trying to {what} in {folder}: {need}{human_size(free_bytes(folder))} "
                    f"is free{note}", hint=hint) from None
