"""`dataset_info.json`: the LLaMA-Factory dataset registry, read and written exactly as its users write it.

    {"my_data": {"file_name": "my_data.json", "formatting": "sharegpt",
                 "columns": {"messages": "conversations", "system": "system"},
                 "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .textfile import read_text

logger = logging.getLogger(__name__)

INFO_FILE = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt", "openai")
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools", "reasoning", "images",
               "videos", "audios", "chosen", "rejected", "kto_tag")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
ENTRY_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "formatting",
              "ranking", "subset", "split", "folder", "num_samples", "file_sha1", "columns", "tags")

# Column and tag defaults per formatting (LLaMA-Factory's, plus `openai`: role/content messages with tool roles).
DEFAULT_COLUMNS: dict[str, dict[str, str | None]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None,
               "tools": None, "reasoning": None},
    "sharegpt": {"messages": "conversations", "system": None, "tools": None},
    "openai": {"messages": "messages", "system": None, "tools": "tools"},
}
DEFAULT_TAGS: dict[str, dict[str, str]] = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"},
}


@dataclass
class DatasetAttr:
    """One dataset_info.json entry with LLaMA-Factory's defaults filled in."""

    name: str
    load_from: str  # "file" | "hf_hub" | "ms_hub"
    path: str  # file_name, or the hub id
    formatting: str = "alpaca"
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    subset: str | None = None
    folder: str | None = None
    num_samples: int | None = None
    file_sha1: str | None = None
    entry: dict[str, Any] = field(default_factory=dict)  # the raw entry, for cache keys and messages

    def column(self, key: str) -> str | None:
        """The row field that holds ``key`` (e.g. ``prompt`` -> ``instruction``), or None when not used."""
        return self.columns.get(key)

    def tag(self, key: str) -> str:
        """The tag value for ``key`` (e.g. ``user_tag`` -> ``human``)."""
        return self.tags[key]


def resolve_dataset_dir(dataset_dir: str, config_dir: str | os.PathLike | None = None) -> Path:
    """Find ``dataset_dir``: as given (relative to the working directory), else relative to the config's folder."""
    path = Path(dataset_dir).expanduser()
    if path.is_dir() or path.is_absolute():
        if not path.is_dir():
            raise DataError(f"dataset_dir {str(path)!r} does not exist",
                            hint="set `dataset_dir` to the folder holding dataset_info.json")
        return path
    tried = [str(Path.cwd() / path)]
    if config_dir is not None:
        beside = Path(config_dir) / path
        if beside.is_dir():
            return beside
        tried.append(str(beside))
    raise DataError(
        f"dataset_dir {dataset_dir!r} not found; looked in {' and '.join(tried)} "
        "(a relative dataset_dir is read from the working directory, then from the config file's folder)",
        hint="run from the project folder or give an absolute `dataset_dir`")


def read_dataset_info(dataset_dir: Path) -> dict[str, Any]:
    """The raw ``dataset_info.json`` mapping of ``dataset_dir`` (an empty mapping when the file is absent)."""
    info_path = Path(dataset_dir) / INFO_FILE
    if not info_path.is_file():
        return {}
    try:
        info = json.loads(read_text(info_path))
    except json.JSONDecodeError as err:
        raise DataError(f"{info_path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}",
                        hint="fix the JSON syntax (a trailing comma is a common cause)") from None
    if not isinstance(info, dict):
        raise DataError(f"{info_path} must hold a JSON object mapping dataset names to entries, "
                        f"got {type(info).__name__}")
    return info


def get_dataset_attr(name: str, dataset_dir: Path) -> DatasetAttr:
    """Parse the entry ``name`` of ``dataset_dir/dataset_info.json`` with every default filled in."""
    info = read_dataset_info(dataset_dir)
    info_path = Path(dataset_dir) / INFO_FILE
    if name not in info:
        if not info:
            raise DataError(f"dataset {name!r}: {info_path} does not exist or is empty",
                            hint=f"register it with `loraforge data register {name} FILE --formatting alpaca "
                                 f"--dataset_dir {dataset_dir}`")
        import difflib

        close = difflib.get_close_matches(name, list(info), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"registered: {', '.join(sorted(info)[:20])}"
        raise DataError(f"dataset {name!r} is not registered in {info_path}", hint=hint)
    return parse_entry(name, info[name], info_path)


def parse_entry(name: str, entry: Any, info_path: Path | str = INFO_FILE) -> DatasetAttr:
    """Validate one raw entry; every problem names the dataset and the key."""
    where = f"{info_path}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be an object, got {type(entry).__name__}")
    unknown = [k for k in entry if k not in ENTRY_KEYS]
    if unknown:
        logger.warning("%s: ignoring unknown key(s) %s", where, ", ".join(unknown))
    if entry.get("ranking"):
        raise DataError(f"{where} has `ranking: true` (preference pairs), which loraforge does not support yet",
                        hint="use an SFT dataset (alpaca, sharegpt or openai rows) or remove `ranking`")
    for key in ("om_hub_url", "script_url", "cloud_file_name"):
        if entry.get(key) and not (entry.get("file_name") or entry.get("hf_hub_url") or entry.get("ms_hub_url")):
            raise DataError(f"{where} is loaded through `{key}`, which loraforge does not support",
                            hint="download the data and point `file_name` at the local file")
    if entry.get("file_name"):
        load_from, path = "file", str(entry["file_name"])
    elif entry.get("hf_hub_url") or entry.get("ms_hub_url"):
        use_ms = bool(entry.get("ms_hub_url")) and (os.environ.get("USE_MODELSCOPE_HUB", "0").lower() in ("1", "true")
                                                   or not entry.get("hf_hub_url"))
        load_from = "ms_hub" if use_ms else "hf_hub"
        path = str(entry["ms_hub_url"] if use_ms else entry["hf_hub_url"])
    else:
        raise DataError(f"{where} has no `file_name` (nor `hf_hub_url` / `ms_hub_url`)",
                        hint="add \"file_name\": \"your_file.json\" (relative to dataset_dir)")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: `formatting: {formatting}` is not one of {', '.join(FORMATTINGS)}")
    columns = dict(DEFAULT_COLUMNS[formatting])
    given_columns = entry.get("columns") or {}
    if not isinstance(given_columns, dict):
        raise DataError(f"{where}: `columns` must be an object such as {{\"prompt\": \"instruction\"}}")
    bad = [k for k in given_columns if k not in COLUMN_KEYS]
    if bad:
        raise DataError(f"{where}: unknown column key(s) {', '.join(bad)}; known: {', '.join(COLUMN_KEYS[:8])}")
    if formatting == "alpaca" and "messages" in given_columns:
        raise DataError(f"{where}: `columns.messages` needs `formatting: sharegpt` or `openai`, not alpaca")
    for key in ("chosen", "rejected", "kto_tag"):
        if given_columns.get(key):
            raise DataError(f"{where}: column `{key}` is for preference training, which loraforge does not support")
    for key in ("images", "videos", "audios"):
        if given_columns.get(key):
            logger.warning("%s: column `%s` is ignored (no multimodal models yet)", where, key)
    columns.update({k: v for k, v in given_columns.items() if k in DEFAULT_COLUMNS[formatting] or k == "reasoning"})
    tags = dict(DEFAULT_TAGS.get(formatting, {}))
    given_tags = entry.get("tags") or {}
    if not isinstance(given_tags, dict) or any(k not in TAG_KEYS for k in given_tags):
        raise DataError(f"{where}: `tags` must be an object with keys among {', '.join(TAG_KEYS)}")
    if formatting == "alpaca" and given_tags:
        logger.warning("%s: `tags` are ignored with `formatting: alpaca`", where)
    tags.update({k: str(v) for k, v in given_tags.items()})
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples <= 0):
        raise DataError(f"{where}: `num_samples` must be a positive integer, got {num_samples!r}")
    return DatasetAttr(
        name=name, load_from=load_from, path=path, formatting=formatting, columns=columns, tags=tags,
        split=str(entry.get("split", "train")), subset=entry.get("subset"), folder=entry.get("folder"),
        num_samples=num_samples, file_sha1=(entry.get("file_sha1") or None), entry=dict(entry))


def sha1_of(path: Path) -> str:
    """The SHA-1 of a file's bytes (LLaMA-Factory's `file_sha1`); of a folder: of its sorted files' bytes."""
    digest = hashlib.sha1()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def verify_sha1(attr: DatasetAttr, path: Path) -> None:
    """Raise when ``file_sha1`` is set and does not match the file (empty values are ignored)."""
    if not attr.file_sha1:
        return
    actual = sha1_of(path)
    if actual.lower() != attr.file_sha1.lower():
        raise DataError(
            f"dataset {attr.name!r}: {path} has SHA-1 {actual}, but dataset_info.json says {attr.file_sha1}",
            hint="the file changed since it was registered: update `file_sha1` (or set it to \"\") if the change "
                 "is intended")


def write_dataset_info_entry(dataset_dir: Path, name: str, entry: dict[str, Any]) -> tuple[Path, bool]:
    """Add or replace ``name`` in ``dataset_dir/dataset_info.json`` atomically; returns (path, replaced)."""
    dataset_dir = Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    info = read_dataset_info(dataset_dir)
    replaced = name in info
    parse_entry(name, entry, dataset_dir / INFO_FILE)  # refuse to write an entry that cannot be read back
    info[name] = entry
    target = dataset_dir / INFO_FILE
    fd, tmp = tempfile.mkstemp(prefix=".dataset_info.", suffix=".tmp", dir=dataset_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(info, fh, ensure_ascii=False, indent=2)
            fh.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target, replaced
