"""The tokenized-dataset cache. Its key covers everything the tokens depend on, so it never serves stale data.

Key = hash of: every data file's bytes, the dataset_info.json entries used, every data argument (max_samples,
cutoff_len, val_size, ...), the stage and seed, the template (its Jinja rendering and definition) and the
tokenizer (its full serialized vocabulary, merges and special tokens). Editing a data file or changing
`max_samples` therefore gives a new key: the trap where a stale cache is reused cannot happen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import __version__
from .conversation import Conversation, Message
from .report import DataReport

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the cached layout or the encoding logic changes
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def cache_root(data_cache_dir: str | None) -> Path:
    """`data_cache_dir`, else ``$LORAFORGE_HOME/data_cache`` (default ``~/.cache/loraforge/data_cache``)."""
    if data_cache_dir:
        return Path(data_cache_dir).expanduser()
    home = os.environ.get("LORAFORGE_HOME") or str(Path.home() / ".cache" / "loraforge")
    return Path(home) / "data_cache"


def file_digest(path: Path) -> str:
    """BLAKE2 of a file's bytes (remembered per size and mtime within one process)."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_HASHES:
        digest = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        _FILE_HASHES[memo] = digest.hexdigest()
    return _FILE_HASHES[memo]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how the tokenizer splits text."""
    digest = hashlib.blake2b(digest_size=20)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    extra = {"class": type(tokenizer).__name__, "special": {k: str(v) for k, v in
                                                           (tokenizer.special_tokens_map or {}).items()},
             "bos": getattr(tokenizer, "add_bos_token", None), "eos": getattr(tokenizer, "add_eos_token", None),
             "len": len(tokenizer)}
    digest.update(json.dumps(extra, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def template_fingerprint(template) -> str:
    """A hash of the template's definition (its rendering as Jinja, and its fields without memory addresses)."""
    parts = [type(template).__qualname__, str(getattr(template, "name", ""))]
    to_jinja = getattr(template, "to_jinja", None)
    if callable(to_jinja):
        try:
            parts.append(to_jinja())
        except Exception as err:  # noqa: BLE001 - a template that cannot export Jinja is still hashed by its fields
            parts.append(f"no jinja: {type(err).__name__}")
    if dataclasses.is_dataclass(template):
        parts.append(repr(template))
    else:
        parts.append(repr(sorted((k, repr(v)) for k, v in vars(template).items())) if hasattr(template, "__dict__")
                     else repr(template))
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", "\n".join(parts))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=20).hexdigest()


def compute_key(parts: dict[str, Any]) -> str:
    """The cache key of ``parts`` (JSON-serialisable), with the format and loraforge versions mixed in."""
    payload = {"format": FORMAT_VERSION, "loraforge": __version__, **parts}
    text = json.dumps(payload, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _write_conversations(path: Path, convs: list[Conversation]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for c in convs:
            fh.write(json.dumps(dataclasses.asdict(c), ensure_ascii=False) + "\n")


def read_conversations(path: Path) -> list[Conversation]:
    """Read conversations written beside a cached bundle."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            d["messages"] = [Message(**m) for m in d["messages"]]
            out.append(Conversation(**d))
    return out


def save_bundle(folder: Path, train, eval_, eval_conversations: list[Conversation] | None, report: DataReport,
                key_parts: dict[str, Any]) -> None:
    """Write the datasets, report and held-out conversations to ``folder`` atomically (temp folder + rename)."""
    import datasets

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Saving the dataset" bars for a few MB are noise
    try:
        if train is not None:
            train.save_to_disk(str(tmp / "train"))
        if eval_ is not None:
            eval_.save_to_disk(str(tmp / "eval"))
        if eval_conversations is not None:
            _write_conversations(tmp / "eval_conversations.jsonl", eval_conversations)
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), ensure_ascii=False), encoding="utf-8")
        (tmp / "key.json").write_text(json.dumps(key_parts, indent=1, default=str, ensure_ascii=False),
                                      encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "report.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process (rank) saved the same key first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def load_bundle(folder: Path):
    """Read a folder written by :func:`save_bundle`: (train, eval, eval_conversations, report) or None."""
    if not (folder / "report.json").is_file():
        return None
    import datasets

    try:
        train = datasets.load_from_disk(str(folder / "train")) if (folder / "train").is_dir() else None
        eval_ = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
        convs_path = folder / "eval_conversations.jsonl"
        convs = read_conversations(convs_path) if convs_path.is_file() else None
        report = DataReport.from_dict(json.loads((folder / "report.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable data cache %s (%s); rebuilding", folder, err)
        return None
    return train, eval_, convs, report
