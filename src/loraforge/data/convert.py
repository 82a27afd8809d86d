"""`loraforge data convert`: JSON Lines (sharegpt / openai / alpaca rows) -> one JSON file that LLaMA-Factory
and loraforge both read, streamed line by line so a file of any size needs little memory."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

from ..errors import DataError
from .conversation import Conversation, Message
from .formats import RowProblem, convert_row, tool_calls_to_json, validate
from .readers import RawRow
from .registry import DEFAULT_TAGS, parse_entry
from .textfile import open_text

TARGETS = ("sharegpt", "openai", "alpaca")
# Role names seen in the wild -> loraforge roles (for input detection only).
ROLE_SYNONYMS = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "model": "assistant", "bot": "assistant", "system": "system", "observation": "observation", "tool": "observation",
    "function_response": "observation", "ipython": "observation", "function_call": "function",
    "function": "function", "tool_call": "function",
}
SHAREGPT_OUT = {"user": "human", "assistant": "gpt", "observation": "observation", "function": "function_call"}
OPENAI_OUT = {"user": "user", "assistant": "assistant", "observation": "tool", "function": "function_call"}
ALPACA_ATTR = parse_entry("input", {"file_name": "-", "formatting": "alpaca", "columns": {
    "prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history",
    "tools": "tools"}})


@dataclass
class ConvertResult:
    """How many rows were written and which input lines were bad (1-based line numbers)."""

    written: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    bad_count: int = 0
    entry: dict[str, Any] = field(default_factory=dict)  # the dataset_info.json entry for the output


def _messages_to_conversation(data: dict[str, Any], key: str) -> Conversation:
    raw = data[key]
    if not isinstance(raw, list) or not raw:
        raise RowProblem(key, "expected a non-empty list of messages")
    system, messages = data.get("system") or None, []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RowProblem(f"{key}[{i}]", "expected an object")
        role_key = "from" if "from" in item else "role"
        content_key = "value" if "value" in item else "content"
        tag = item.get(role_key)
        role = ROLE_SYNONYMS.get(str(tag).lower()) if tag is not None else None
        if role is None:
            raise RowProblem(f"{key}[{i}].{role_key}", f"unknown role {tag!r}")
        if role == "assistant" and item.get("tool_calls"):
            messages.append(Message("function", tool_calls_to_json(item["tool_calls"], f"{key}[{i}].tool_calls")))
            continue
        content = item.get(content_key)
        if isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)
        if not isinstance(content, str):
            raise RowProblem(f"{key}[{i}].{content_key}", "missing or not text")
        if role == "system":
            if i != 0:
                raise RowProblem(f"{key}[{i}]", "a system message is only allowed first")
            system = content
            continue
        reasoning = item.get("reasoning_content") or item.get("reasoning")
        messages.append(Message(role, content, reasoning if isinstance(reasoning, str) else None))
    tools = data.get("tools")
    tools = json.dumps(tools, ensure_ascii=False) if isinstance(tools, (list, dict)) else (tools or None)
    conv = Conversation(messages=messages, system=system, tools=tools)
    validate(conv, require_answer=True, field=key)
    return conv


def parse_line(data: Any) -> Conversation:
    """Detect the row's format (conversations / messages / instruction) and convert it."""
    if not isinstance(data, dict):
        raise RowProblem("(line)", f"expected a JSON object, got {type(data).__name__}")
    for key in ("conversations", "messages"):
        if key in data:
            return _messages_to_conversation(data, key)
    if "instruction" in data:
        return convert_row(RawRow(data, "-", 0), ALPACA_ATTR)
    raise RowProblem("(line)", f"no `conversations`, `messages` or `instruction` key (has: {', '.join(data)})")


def _answer_text(msg: Message) -> str:
    if msg.reasoning:
        return f"<think>\n{msg.reasoning}\n</think>\n\n{msg.content}"
    return msg.content


def render(conv: Conversation, to: str) -> dict[str, Any]:
    """One output row in the ``to`` layout."""
    if to == "alpaca":
        if conv.tools or any(m.role in ("function", "observation") for m in conv.messages):
            raise RowProblem("(line)", "has tool calls, which alpaca rows cannot hold; convert --to sharegpt")
        pairs = [(conv.messages[i].content, _answer_text(conv.messages[i + 1]))
                 for i in range(0, len(conv.messages) - 1, 2)]
        row: dict[str, Any] = {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1]}
        if conv.system:
            row["system"] = conv.system
        if len(pairs) > 1:
            row["history"] = [list(p) for p in pairs[:-1]]
        return row
    names = SHAREGPT_OUT if to == "sharegpt" else OPENAI_OUT
    role_key, content_key = ("from", "value") if to == "sharegpt" else ("role", "content")
    msgs = [{role_key: names[m.role], content_key: _answer_text(m) if m.role == "assistant" else m.content}
            for m in conv.messages]
    if to == "openai" and conv.system:
        msgs.insert(0, {"role": "system", "content": conv.system})
    row = {"conversations" if to == "sharegpt" else "messages": msgs}
    if to == "sharegpt" and conv.system:
        row["system"] = conv.system
    if conv.tools:
        row["tools"] = conv.tools
    return row


def dataset_entry(file_name: str, to: str, *, has_system: bool, has_tools: bool, has_history: bool) -> dict:
    """The dataset_info.json entry that reads a converted file (in LLaMA-Factory and loraforge alike)."""
    if to == "alpaca":
        cols = {"prompt": "instruction", "query": "input", "response": "output"}
        cols.update({"system": "system"} if has_system else {})
        cols.update({"history": "history"} if has_history else {})
        return {"file_name": file_name, "formatting": "alpaca", "columns": cols}
    if to == "sharegpt":
        cols = {"messages": "conversations"}
        cols.update({"system": "system"} if has_system else {})
        cols.update({"tools": "tools"} if has_tools else {})
        return {"file_name": file_name, "formatting": "sharegpt", "columns": cols}
    tags = dict(DEFAULT_TAGS["openai"])
    cols = {"messages": "messages"}
    cols.update({"tools": "tools"} if has_tools else {})
    return {"file_name": file_name, "formatting": "sharegpt", "columns": cols, "tags": tags}


def _lines(fh: TextIO) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or the JSONDecodeError) for each non-empty line."""
    for number, line in enumerate(fh, start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, err


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, *, to: str = "sharegpt", limit: int | None = None,
                 max_shown: int = 10) -> ConvertResult:
    """Stream ``src`` (JSON Lines) into ``dst`` (a JSON array, one row per line, non-ASCII kept as is).

    The output is written to a temporary file and renamed into place, so a failure leaves no half file.
    """
    if to not in TARGETS:
        raise DataError(f"--to {to}: expected one of {', '.join(TARGETS)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise DataError(f"input file {src} does not exist")
    if src.resolve() == dst.resolve():
        raise DataError("the output file must differ from the input file")
    dst.parent.mkdir(parents=True, exist_ok=True)
    result = ConvertResult()
    seen = {"system": False, "tools": False, "history": False}
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with open_text(src) as fin, os.fdopen(fd, "w", encoding="utf-8") as fout:
            fout.write("[")
            for number, data in _lines(fin):
                if limit is not None and result.written >= limit:
                    break
                try:
                    if isinstance(data, json.JSONDecodeError):
                        raise RowProblem("(line)", f"invalid JSON ({data.msg}, column {data.colno})")
                    row = render(parse_line(data), to)
                except RowProblem as err:
                    result.bad_count += 1
                    if len(result.bad) < max_shown:
                        result.bad.append((number, f"`{err.field}`: {err.message}"))
                    continue
                for key in seen:
                    seen[key] = seen[key] or key in row
                fout.write(("\n" if result.written == 0 else ",\n") + json.dumps(row, ensure_ascii=False))
                result.written += 1
            fout.write("\n]\n")
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    result.entry = dataset_entry(dst.name, to, has_system=seen["system"], has_tools=seen["tools"],
                                 has_history=seen["history"])
    return result
