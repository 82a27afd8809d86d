"""Read the raw rows of one registered dataset: a local file or folder (json, jsonl, csv, parquet, arrow, txt),
or a hub dataset when the machine is online."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError
from .registry import DatasetAttr, verify_sha1
from .textfile import open_text, read_text

EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow",
              ".txt": "txt"}


@dataclass
class RawRow:
    """One row as read from disk, with where it came from (for error messages)."""

    data: dict[str, Any]
    file: str
    index: int  # 0-based row index within ``file`` (the line number - 1 for jsonl/txt)

    @property
    def where(self) -> str:
        return f"{self.file}:row {self.index}"


def data_files(attr: DatasetAttr, dataset_dir: Path) -> list[Path]:
    """The local files of ``attr`` (one file, or a folder's files of one type), checked to exist."""
    path = Path(attr.path).expanduser()
    if not path.is_absolute():
        path = Path(dataset_dir) / path
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        kinds = {EXTENSIONS.get(p.suffix.lower()) for p in files}
        if not files:
            raise DataError(f"dataset {attr.name!r}: folder {path} is empty")
        if None in kinds:
            odd = [p.name for p in files if p.suffix.lower() not in EXTENSIONS][:3]
            raise DataError(f"dataset {attr.name!r}: folder {path} holds files of unsupported type ({', '.join(odd)})",
                            hint=f"keep only {', '.join(EXTENSIONS)} files in it")
        if len(kinds) > 1:
            raise DataError(f"dataset {attr.name!r}: folder {path} mixes file types ({', '.join(sorted(kinds))})",
                            hint="a dataset folder must hold files of one type")
        return files
    if not path.is_file():
        raise DataError(f"dataset {attr.name!r}: file {path} does not exist",
                        hint=f"fix `file_name` in {Path(dataset_dir) / 'dataset_info.json'} (it is relative to "
                             "dataset_dir)")
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError(f"dataset {attr.name!r}: {path.name} has an unsupported type",
                        hint=f"use one of {', '.join(EXTENSIONS)}")
    return [path]


def read_rows(attr: DatasetAttr, dataset_dir: Path, *, limit: int | None = None) -> Iterator[RawRow]:
    """Yield the raw rows of ``attr`` in file order (at most ``limit`` of them)."""
    if attr.load_from != "file":
        yield from _read_hub(attr, limit=limit)
        return
    files = data_files(attr, dataset_dir)
    if attr.file_sha1:
        target = Path(attr.path) if Path(attr.path).is_absolute() else Path(dataset_dir) / attr.path
        verify_sha1(attr, target)
    count = 0
    for path in files:
        for row in _read_file(path, attr.name):
            if limit is not None and count >= limit:
                return
            count += 1
            yield row


def _read_file(path: Path, name: str) -> Iterator[RawRow]:
    kind = EXTENSIONS[path.suffix.lower()]
    label = path.name
    if kind in ("json", "jsonl"):
        yield from _read_json(path, name)
    elif kind == "txt":
        with open_text(path, dataset=name) as fh:
            for i, line in enumerate(fh):
                text = line.rstrip("\n")
                if text.strip():
                    yield RawRow({"text": text}, label, i)
    elif kind == "csv":
        with open_text(path, dataset=name, newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh)):
                yield RawRow(dict(row), label, i)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if kind == "parquet":
                table = pq.read_table(path)
            else:
                table = _read_arrow(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"dataset {name!r}: cannot read {path}: {err}") from None
        index = 0
        for batch in table.to_batches(max_chunksize=10_000):
            for row in batch.to_pylist():
                yield RawRow(row, label, index)
                index += 1


def _read_arrow(path: Path):
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()  # what `datasets` writes
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()


def _read_json(path: Path, name: str) -> Iterator[RawRow]:
    """A JSON array (or an object holding one list), or JSON Lines whatever the extension says."""
    label = path.name
    with open_text(path, dataset=name) as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):
        try:
            data = json.loads(read_text(path, dataset=name))
        except json.JSONDecodeError as err:
            raise DataError(f"dataset {name!r}: {path} is not valid JSON: {err.msg} at line {err.lineno}, "
                            f"column {err.colno}", hint="fix the file, or write one JSON object per line") from None
        for i, row in enumerate(data):
            yield RawRow(row if isinstance(row, dict) else {"__not_an_object__": row}, label, i)
        return
    # One object per line (JSON Lines), also when the file is named .json; or one object holding a list.
    with open_text(path, dataset=name) as fh:
        lines = iter(fh)
        first = None
        for first_no, first in enumerate(lines):
            if first.strip():
                break
        if first is None or not first.strip():
            return
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            obj = None
        if obj is None:  # the first line alone is not JSON: a pretty-printed single object
            yield from _read_single_object(path, name)
            return
        yield _jsonl_row(obj, label, first_no)
        for i, line in enumerate(lines, start=first_no + 1):
            if not line.strip():
                continue
            try:
                yield _jsonl_row(json.loads(line), label, i)
            except json.JSONDecodeError as err:
                yield RawRow({"__bad_json__": f"invalid JSON ({err.msg}, column {err.colno})"}, label, i)


def _jsonl_row(obj: Any, label: str, index: int) -> RawRow:
    return RawRow(obj if isinstance(obj, dict) else {"__not_an_object__": obj}, label, index)


def _read_single_object(path: Path, name: str) -> Iterator[RawRow]:
    try:
        data = json.loads(read_text(path, dataset=name))
    except json.JSONDecodeError as err:
        raise DataError(f"dataset {name!r}: {path} is neither a JSON array nor JSON Lines ({err.msg} at line "
                        f"{err.lineno})", hint="write a list of objects, or one object per line") from None
    lists = [v for v in data.values() if isinstance(v, list)] if isinstance(data, dict) else []
    if len(lists) != 1:
        raise DataError(f"dataset {name!r}: {path} holds one JSON object, not a list of rows",
                        hint="write a JSON array of rows (or JSON Lines)")
    for i, row in enumerate(lists[0]):
        yield RawRow(row if isinstance(row, dict) else {"__not_an_object__": row}, path.name, i)


def _read_hub(attr: DatasetAttr, *, limit: int | None) -> Iterator[RawRow]:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes")
    key = "ms_hub_url" if attr.load_from == "ms_hub" else "hf_hub_url"
    hint = (f"download it (e.g. `huggingface-cli download --repo-type dataset {attr.path} --local-dir "
            f"data/{attr.name}`) and register the local copy with `file_name`")
    if attr.load_from == "ms_hub":
        try:
            from modelscope import MsDataset  # type: ignore[import-not-found]
        except ImportError:
            raise DataError(f"dataset {attr.name!r} comes from ModelScope ({key}: {attr.path}) but `modelscope` is "
                            "not installed", hint="pip install 'loraforge[modelscope]', or " + hint) from None
        if offline:
            raise DataError(f"dataset {attr.name!r} is on ModelScope ({attr.path}) and the hub is offline", hint=hint)
        ds = MsDataset.load(attr.path, subset_name=attr.subset, split=attr.split).to_hf_dataset()
    else:
        if offline:
            raise DataError(f"dataset {attr.name!r} is on the Hugging Face hub ({key}: {attr.path}) and the hub is "
                            "offline (HF_HUB_OFFLINE=1)", hint=hint)
        import datasets

        try:
            ds = datasets.load_dataset(attr.path, name=attr.subset, data_dir=attr.folder, split=attr.split)
        except Exception as err:  # noqa: BLE001 - network, auth and missing-split errors all end here
            raise DataError(f"dataset {attr.name!r}: cannot load {attr.path} from the hub: {err}", hint=hint) from None
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            return
        yield RawRow(dict(row), attr.path, i)
