"""alpaca, sharegpt and openai rows -> :class:`Conversation`, validated.

A row that cannot be converted raises :class:`RowProblem` naming the field at fault; the loader turns it into
a line of the data report (file, row index, field) instead of dropping the row silently.
"""

from __future__ import annotations

import json
from typing import Any

from .conversation import ANSWER_ROLES, PROMPT_ROLES, Conversation, Message
from .registry import DatasetAttr
from .readers import RawRow


class RowProblem(Exception):
    """One row cannot be used: ``field`` is the column (or ``messages[i].from``) at fault."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def convert_row(row: RawRow, attr: DatasetAttr, *, require_answer: bool = True) -> Conversation:
    """Convert one raw row of ``attr``'s formatting into a validated conversation.

    ``require_answer=False`` accepts rows without an answer (pre-training text, prompts to predict from).
    """
    data = row.data
    if "__bad_json__" in data:
        raise RowProblem("(line)", data["__bad_json__"])
    if "__not_an_object__" in data:
        raise RowProblem("(row)", f"expected a JSON object, got {type(data['__not_an_object__']).__name__}")
    if attr.formatting == "alpaca":
        conv = _from_alpaca(data, attr, require_answer)
    elif attr.formatting == "sharegpt":
        conv = _from_messages(data, attr, require_answer, openai=False)
    else:
        conv = _from_messages(data, attr, require_answer, openai=True)
    conv.source = f"{attr.name}: {row.where}"
    validate(conv, require_answer=require_answer, field=_messages_field(attr))
    return conv


def _messages_field(attr: DatasetAttr) -> str:
    if attr.formatting == "alpaca":
        return attr.column("history") or "turns"
    return attr.column("messages") or "messages"


def validate(conv: Conversation, *, require_answer: bool, field: str = "messages") -> None:
    """Check that prompt turns (user/observation) and answers (assistant/function) alternate."""
    if not conv.messages:
        raise RowProblem(field, "no messages")
    for i, msg in enumerate(conv.messages):
        expected = PROMPT_ROLES if i % 2 == 0 else ANSWER_ROLES
        if msg.role not in expected:
            raise RowProblem(f"{field}[{i}]", f"role {msg.role!r} at position {i}; expected "
                             f"{' or '.join(expected)} (prompt and answer turns must alternate)")
        if msg.role in ANSWER_ROLES and not msg.content.strip() and not (msg.reasoning or "").strip():
            raise RowProblem(f"{field}[{i}]", "empty answer")
    if conv.messages[0].role == "observation":
        raise RowProblem(f"{field}[0]", "a conversation cannot start with a tool result")
    if require_answer and len(conv.messages) % 2 == 1:
        raise RowProblem(f"{field}[{len(conv.messages) - 1}]",
                         f"the conversation ends with a {conv.messages[-1].role} turn and has no answer to train on")


def _text(data: dict[str, Any], column: str, *, required: bool) -> str | None:
    if column not in data or data[column] is None:
        if required:
            present = ", ".join(list(data)[:8]) or "none"
            raise RowProblem(column, f"missing (row has: {present})")
        return None
    value = data[column]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RowProblem(column, f"expected text, got {type(value).__name__}")
    return value


def _tools(data: dict[str, Any], column: str | None) -> str | None:
    if not column or data.get(column) in (None, "", [], {}):
        return None
    value = data[column]
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as err:
            raise RowProblem(column, f"tools must be JSON ({err.msg})") from None
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    raise RowProblem(column, f"expected a JSON list of tools, got {type(value).__name__}")


def _from_alpaca(data: dict[str, Any], attr: DatasetAttr, require_answer: bool) -> Conversation:
    prompt_col = attr.column("prompt") or "instruction"
    if prompt_col not in data and prompt_col == "instruction" and "text" in data:
        prompt_col = "text"  # a .txt file or a plain-text column (pre-training data)
    prompt = _text(data, prompt_col, required=True) or ""
    query_col = attr.column("query")
    query = _text(data, query_col, required=False) if query_col else None
    content = "\n".join(part for part in (prompt, query) if part)
    if not content.strip():
        raise RowProblem(prompt_col, "empty prompt" + (f" (and {query_col})" if query_col else ""))
    messages: list[Message] = []
    history_col = attr.column("history")
    if history_col and data.get(history_col):
        history = data[history_col]
        if not isinstance(history, list):
            raise RowProblem(history_col, f"expected a list of [prompt, answer] pairs, got {type(history).__name__}")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RowProblem(f"{history_col}[{i}]", "expected a [prompt, answer] pair of two strings")
            messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    messages.append(Message("user", content))
    response_col = attr.column("response")
    response = data.get(response_col) if response_col else None
    if isinstance(response, list):
        raise RowProblem(response_col, "holds a list (ranked answers); preference data is not supported")
    answer = _text(data, response_col, required=require_answer) if response_col else None
    reasoning_col = attr.column("reasoning")
    reasoning = _text(data, reasoning_col, required=False) if reasoning_col else None
    if require_answer and answer is not None and not answer.strip() and not (reasoning or "").strip():
        raise RowProblem(response_col, "empty answer")
    if answer is not None and (answer.strip() or require_answer):
        messages.append(Message("assistant", answer, reasoning=reasoning or None))
    system_col = attr.column("system")
    return Conversation(messages=messages, system=_text(data, system_col, required=False) if system_col else None,
                        tools=_tools(data, attr.column("tools")))


def _from_messages(data: dict[str, Any], attr: DatasetAttr, require_answer: bool, *, openai: bool) -> Conversation:
    col = attr.column("messages") or ("messages" if openai else "conversations")
    raw = data.get(col)
    if raw is None:
        present = ", ".join(list(data)[:8]) or "none"
        raise RowProblem(col, f"missing (row has: {present})")
    if not isinstance(raw, list):
        raise RowProblem(col, f"expected a list of messages, got {type(raw).__name__}")
    role_tag, content_tag = attr.tag("role_tag"), attr.tag("content_tag")
    roles = {attr.tag("user_tag"): "user", attr.tag("assistant_tag"): "assistant",
             attr.tag("observation_tag"): "observation", attr.tag("function_tag"): "function"}
    system_tag = attr.tag("system_tag")
    system = None
    messages: list[Message] = []
    for i, item in enumerate(raw):
        where = f"{col}[{i}]"
        if not isinstance(item, dict):
            raise RowProblem(where, f"expected an object with {role_tag!r} and {content_tag!r}")
        if role_tag not in item:
            raise RowProblem(f"{where}.{role_tag}", f"missing (message has: {', '.join(item)})")
        tag = item[role_tag]
        if tag == system_tag:
            if i != 0:
                raise RowProblem(f"{where}.{role_tag}", f"a {system_tag!r} message is only allowed first")
            system = _content(item, content_tag, where)
            continue
        if tag not in roles:
            raise RowProblem(f"{where}.{role_tag}", f"unknown role {tag!r}; expected one of "
                             f"{', '.join(repr(r) for r in [*roles, system_tag])} (set `tags` in dataset_info.json)")
        role = roles[tag]
        if openai and role == "assistant" and item.get("tool_calls"):
            messages.append(Message("function", tool_calls_to_json(item["tool_calls"], f"{where}.tool_calls")))
            continue
        content = _content(item, content_tag, where)
        reasoning = item.get("reasoning_content") or item.get("reasoning") if role == "assistant" else None
        if role == "observation" and messages and messages[-1].role == "observation":
            messages[-1].content += "\n" + content  # several tool results answer one call turn
            continue
        messages.append(Message(role, content, reasoning=reasoning if isinstance(reasoning, str) else None))
    if system is None and attr.column("system"):
        system = _text(data, attr.column("system"), required=False)
    return Conversation(messages=messages, system=system, tools=_tools(data, attr.column("tools")))


def _content(item: dict[str, Any], content_tag: str, where: str) -> str:
    if content_tag not in item or item[content_tag] is None:
        raise RowProblem(f"{where}.{content_tag}", "missing")
    value = item[content_tag]
    if isinstance(value, (list, dict)):
        parts = value if isinstance(value, list) else [value]
        if all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            return "".join(str(p.get("text", "")) for p in parts)  # OpenAI content parts
        return json.dumps(value, ensure_ascii=False)  # a function call written as an object
    if not isinstance(value, str):
        raise RowProblem(f"{where}.{content_tag}", f"expected text, got {type(value).__name__}")
    return value


def tool_calls_to_json(calls: Any, where: str) -> str:
    """OpenAI ``tool_calls`` -> LLaMA-Factory's function content: a JSON list of {name, arguments}."""
    if not isinstance(calls, list):
        raise RowProblem(where, "expected a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or "name" not in fn:
            raise RowProblem(f"{where}[{j}]", "expected {\"function\": {\"name\": ..., \"arguments\": ...}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as err:
                raise RowProblem(f"{where}[{j}].function.arguments", f"not valid JSON ({err.msg})") from None
        out.append({"name": fn["name"], "arguments": args})
    return json.dumps(out, ensure_ascii=False)
