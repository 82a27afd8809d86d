"""Infer a dataset_info.json entry (columns and tags) from the first rows of a data file, for `data register`."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import DataError
from .convert import ROLE_SYNONYMS
from .formats import RowProblem, convert_row
from .readers import RawRow, read_rows
from .registry import DEFAULT_TAGS, parse_entry

SAMPLE_ROWS = 200
ALPACA_CANDIDATES = {
    "prompt": ("instruction", "prompt", "question", "text"),
    "query": ("input", "query", "context"),
    "response": ("output", "response", "answer", "completion"),
    "history": ("history",),
    "system": ("system", "system_prompt"),
    "tools": ("tools",),
    "reasoning": ("reasoning", "reasoning_content", "cot", "chain_of_thought", "thinking", "thought"),
}


def _sample(path: Path, formatting: str) -> list[dict[str, Any]]:
    attr = parse_entry("sample", {"file_name": str(path), "formatting": formatting})
    return [r.data for r in read_rows(attr, path.parent, limit=SAMPLE_ROWS)]


def _alpaca_columns(rows: list[dict[str, Any]]) -> dict[str, str]:
    keys = Counter(k for r in rows for k in r)
    cols = {}
    for col, names in ALPACA_CANDIDATES.items():
        found = next((n for n in names if keys.get(n)), None)
        if found and found not in cols.values():
            cols[col] = found
    if "prompt" not in cols:
        raise DataError(f"cannot find the instruction column among {', '.join(keys)}",
                        hint="register with --formatting sharegpt/openai, or rename the column to `instruction`")
    return cols


def _message_columns(rows: list[dict[str, Any]], formatting: str) -> tuple[dict[str, str], dict[str, str]]:
    keys = Counter(k for r in rows for k in r if isinstance(r[k], list))
    msg_col = next((k for k in ("conversations", "messages") if keys.get(k)), None)
    msg_col = msg_col or (keys.most_common(1)[0][0] if keys else None)
    if msg_col is None:
        raise DataError("no column holds a list of messages", hint="use --formatting alpaca for instruction rows")
    messages = [m for r in rows for m in (r.get(msg_col) or []) if isinstance(m, dict)]
    if not messages:
        raise DataError(f"column `{msg_col}` holds no message objects")
    role_tag = "from" if sum("from" in m for m in messages) >= sum("role" in m for m in messages) else "role"
    content_tag = "value" if role_tag == "from" and any("value" in m for m in messages) else "content"
    tags = dict(DEFAULT_TAGS["sharegpt" if role_tag == "from" else "openai"])
    tags.update(role_tag=role_tag, content_tag=content_tag)
    seen = Counter(str(m.get(role_tag)) for m in messages)
    for value in seen:
        role = ROLE_SYNONYMS.get(value.lower())
        if role is None:
            raise DataError(f"unknown role {value!r} in `{msg_col}[].{role_tag}`",
                            hint="write the entry by hand with the right `tags`")
        tag_key = {"user": "user_tag", "assistant": "assistant_tag", "observation": "observation_tag",
                   "function": "function_tag", "system": "system_tag"}[role]
        tags[tag_key] = value
    cols = {"messages": msg_col}
    all_keys = {k for r in rows for k in r}
    if "system" in all_keys:
        cols["system"] = "system"
    if "tools" in all_keys:
        cols["tools"] = "tools"
    default = DEFAULT_TAGS.get(formatting, {})
    return cols, {k: v for k, v in tags.items() if default.get(k) != v}


def infer_entry(file: str | os.PathLike, formatting: str, dataset_dir: str | os.PathLike) -> tuple[dict, int, list]:
    """The entry for ``file`` plus how many of the sampled rows convert cleanly and the first problems."""
    path = Path(file).expanduser().resolve()
    if not path.exists():
        raise DataError(f"{file} does not exist")
    rows = _sample(path, formatting)
    if not rows:
        raise DataError(f"{file} holds no rows")
    ddir = Path(dataset_dir).expanduser().resolve()
    try:
        file_name = str(path.relative_to(ddir))
    except ValueError:
        file_name = str(path)
    entry: dict[str, Any] = {"file_name": file_name, "formatting": formatting}
    if formatting == "alpaca":
        entry["columns"] = _alpaca_columns(rows)
    else:
        entry["columns"], tags = _message_columns(rows, formatting)
        if tags:
            entry["tags"] = tags
    attr = parse_entry("new", entry)
    ok, problems = 0, []
    for i, row in enumerate(rows):
        try:
            convert_row(RawRow(row, path.name, i), attr)
            ok += 1
        except RowProblem as err:
            problems.append(f"row {i}: `{err.field}`: {err.message}")
    return entry, ok, problems
