"""Render a :class:`Conversation` with a :class:`TemplateSpec` into text turns: (prompt, answer) pairs.

This is the one place the rendering rules live; :mod:`.template_jinja` writes the same rules as Jinja, and
:mod:`.templates` tokenizes the turns. Rules, in order:

* turn 0 starts with the prefix and the system block (the system prompt, or the default one, with the tool
  list appended); ``first_user``/``last_user`` placement puts the system slot in front of that user message;
* each prompt message (user or observation) uses its slot and is followed by the generation prompt;
* each answer (assistant, or function = tool calls) uses its slot; reasoning goes where the thinking spec says.

Thinking (``mode: hybrid``, Qwen3), for an answer at message index ``i``:
  reasoning is dropped when ``enable_thinking`` is False, and for answers before the last user query unless
  ``keep_reasoning_history``; a thinking block is written when the answer comes after the last user query and
  is the last message or has reasoning. An empty block of the last answer belongs to the prompt (not trained)
  when ``enable_thinking`` is False, or None and the sample has no reasoning at all; otherwise to the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import TemplateError
from .conversation import ANSWER_ROLES, PROMPT_ROLES, Conversation
from .template_spec import TemplateSpec, ThinkingSpec, ToolSpec


@dataclass
class Turn:
    """One prompt and the answer that follows it (None: the prompt ends with the generation prompt only)."""

    prompt: str
    answer: str | None
    tail: int = 0  # characters at the end of the prompt after the message text (end of turn, generation prompt)


@dataclass(frozen=True)
class RenderOptions:
    enable_thinking: bool | None = True
    keep_reasoning_history: bool = False
    default_system: str | None = None  # overrides the template's default system prompt
    bos_token: str = ""
    eos_token: str = ""


def split_reasoning(text: str, thinking: ThinkingSpec) -> tuple[str | None, str]:
    """Split ``<think>reasoning</think>answer`` into (reasoning, answer) as Qwen3's template does.

    Returns (None, text) when there is no closing tag; an explicit empty block gives ("", answer). An opening
    tag without a closing one (generation cut off while thinking) gives (the rest, "").
    """
    open_tag, close_tag = thinking.tags
    if close_tag in text:
        head, _, _ = text.partition(close_tag)
        answer = text.split(close_tag)[-1].lstrip("\n")
        return head.rstrip("\n").split(open_tag)[-1].lstrip("\n"), answer
    stripped = text.lstrip()
    if stripped.startswith(open_tag):
        return stripped[len(open_tag):].strip("\n"), ""
    return None, text


def parse_tools(conv: Conversation, tools: ToolSpec | None) -> list[dict[str, Any]]:
    """The conversation's tool list (JSON text) as dicts, wrapped as OpenAI function tools when needed."""
    if not conv.tools or not conv.tools.strip():
        return []
    try:
        value = json.loads(conv.tools)
    except json.JSONDecodeError as err:
        raise TemplateError(f"{conv.source or 'conversation'}: `tools` is not valid JSON ({err.msg} at char "
                            f"{err.pos})", hint="tools must be a JSON list of function schemas") from None
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(t, dict) for t in items):
        raise TemplateError(f"{conv.source or 'conversation'}: `tools` must be a JSON list of objects")
    wrap = tools.wrap if tools is not None else True
    return [t if not wrap or t.get("type") == "function" else {"type": "function", "function": t} for t in items]


def parse_calls(content: str, source: str) -> list[tuple[str, Any]]:
    """(name, arguments) of each call in a function message (a JSON object or list of {name, arguments})."""
    where = source or "conversation"
    try:
        value = json.loads(content)
    except json.JSONDecodeError as err:
        raise TemplateError(f"{where}: a function (tool call) message must be JSON, got {content[:60]!r} "
                            f"({err.msg})", hint='write [{"name": "...", "arguments": {...}}]') from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            call = call["function"]
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise TemplateError(f"{where}: each tool call needs a string `name`, got {call!r}")
        args = call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise TemplateError(f"{where}: tool call `{call['name']}` has arguments that are not JSON: "
                                    f"{args[:60]!r}") from None
        out.append((call["name"], args))
    return out


def check_turns(conv: Conversation, where: str, for_generation: bool) -> None:
    """Prompts and answers alternate, starting with a prompt; a training example ends with an answer and a
    generation prompt with a prompt. Shared by the named templates and the `tokenizer` kind."""
    msgs = conv.messages
    if not msgs:
        raise TemplateError(f"{where}: the conversation has no messages")
    for i, msg in enumerate(msgs):
        want = PROMPT_ROLES if i % 2 == 0 else ANSWER_ROLES
        if msg.role not in want:
            raise TemplateError(f"{where}: message {i} has role `{msg.role}` where {' or '.join(want)} was "
                                "expected (prompts and answers must alternate, starting with a prompt)")
    last_is_prompt = msgs[-1].role in PROMPT_ROLES
    if for_generation and not last_is_prompt:
        raise TemplateError(f"{where}: a generation prompt must end with a user or observation message, "
                            f"got `{msgs[-1].role}`")
    if not for_generation and last_is_prompt:
        raise TemplateError(f"{where}: the conversation ends with `{msgs[-1].role}`; a training example must "
                            "end with an assistant (or function) answer")


def _check_roles(spec: TemplateSpec, conv: Conversation, for_generation: bool) -> None:
    where = conv.source or "conversation"
    check_turns(conv, where, for_generation)
    if spec.tools is None:
        for i, msg in enumerate(conv.messages):
            if msg.role in ("function", "observation"):
                raise TemplateError(f"{where}: message {i} is a tool "
                                    f"{'call' if msg.role == 'function' else 'result'}, but template "
                                    f"`{spec.name}` has no tool format",
                                    hint="use a template with tools (qwen, qwen3, qwen3_nothink) or set "
                                    "`tool_format`")


def system_text(spec: TemplateSpec, conv: Conversation, opts: RenderOptions) -> str:
    """The system prompt as written: the conversation's, else the default, plus the tool list."""
    default = opts.default_system if opts.default_system is not None else spec.default_system
    system = conv.system or default
    if spec.strip_content:
        system = system.strip()
    tools = parse_tools(conv, spec.tools)
    if tools:
        if spec.tools is None:
            raise TemplateError(f"{conv.source or 'conversation'}: the conversation declares tools, but template "
                                f"`{spec.name}` has no tool format",
                                hint="use a template with tools (qwen, qwen3, qwen3_nothink) or set `tool_format`")
        items = "".join(spec.tools.item.render(tool=json.dumps(t, ensure_ascii=False)) for t in tools)
        block = spec.tools.system.render(tools=items)
        system = system + spec.tools.separator + block if system else block
    return system


def _last_query(spec: TemplateSpec, conv: Conversation) -> int:
    """Index of the last user message that is a real query (Qwen3 skips tool results sent as user)."""
    skip = spec.thinking.query_skip
    for i in range(len(conv.messages) - 1, -1, -1):
        msg = conv.messages[i]
        if msg.role == "user" and not (skip and msg.content.startswith(skip[0]) and msg.content.endswith(skip[1])):
            return i
    return len(conv.messages) - 1


def _answer_parts(spec: TemplateSpec, conv: Conversation, i: int, last_query: int,
                  opts: RenderOptions) -> tuple[str, str, str]:
    """(prompt-side text, {content} of the answer slot, {reasoning}) for answer message ``i``."""
    msg = conv.messages[i]
    think = spec.thinking
    content = "" if msg.role == "function" else msg.content
    reasoning = msg.reasoning
    if think.mode == "hybrid" and reasoning is None and msg.role != "function" and think.tags[1] in content:
        reasoning, content = split_reasoning(content, think)
    if spec.strip_content:
        content = content.strip()
    calls = ""
    if msg.role == "function":
        tools = spec.tools
        calls = tools.call_separator.join(
            tools.call.render(name=name, arguments=json.dumps(args, ensure_ascii=False))
            for name, args in parse_calls(msg.content, conv.source))
    if spec.reasoning_in_slot:
        return "", _join_calls(spec, content, calls, has_text=bool(content)), reasoning or ""
    prompt_side, block, text = "", "", content
    if think.mode == "inline" and reasoning:
        block, text = think.open + reasoning.strip("\n") + think.close, content.lstrip("\n")
    elif think.mode == "hybrid":
        if opts.enable_thinking is False:
            reasoning = ""
        is_last = i == len(conv.messages) - 1
        in_final = opts.keep_reasoning_history or not think.drop_history or i > last_query
        if in_final and (is_last or reasoning):
            block, text = think.open + (reasoning or "").strip("\n") + think.close, content.lstrip("\n")
            no_block_in_sample = msg.reasoning is None and think.tags[1] not in msg.content
            if not reasoning and (opts.enable_thinking is False
                                  or (opts.enable_thinking is None and no_block_in_sample)):
                prompt_side, block = block, ""  # no-think mode: the empty block is part of the prompt
    return prompt_side, block + _join_calls(spec, text, calls, has_text=bool(content)), ""


def _join_calls(spec: TemplateSpec, text: str, calls: str, *, has_text: bool) -> str:
    """The answer text and the tool calls (separated when the message has text before the calls)."""
    if not calls:
        return text
    return text + spec.tools.call_separator + calls if has_text else text + calls


def render_turns(spec: TemplateSpec, conv: Conversation, opts: RenderOptions, *,
                 for_generation: bool = False) -> list[Turn]:
    """Render ``conv`` into turns; with ``for_generation`` the last turn is a prompt with no answer."""
    _check_roles(spec, conv, for_generation)
    specials = {"bos_token": opts.bos_token, "eos_token": opts.eos_token}
    system = system_text(spec, conv, opts)
    msgs = conv.messages
    user_idx = [i for i, m in enumerate(msgs) if m.role == "user"]
    inline_at = {"first_user": user_idx[0] if user_idx else -1,
                 "last_user": user_idx[-1] if user_idx else -1}.get(spec.system_placement, -1)
    head = spec.prefix.render(**specials)
    if spec.system_placement == "block" and "system" not in spec.user.fields and (system or spec.always_system):
        head += spec.system.render(content=system, **specials)
    last_query = _last_query(spec, conv)
    gen = spec.generation_prompt.render(**specials)
    turns: list[Turn] = []
    for i in range(0, len(msgs), 2):
        msg = msgs[i]
        content = msg.content.strip() if spec.strip_content else msg.content
        if msg.role == "observation":
            slot, values = spec.observation_slot, {"content": content}
            close = spec.observation_close
        else:
            if i == inline_at and system:
                content = spec.system.render(content=system, **specials) + content
            slot, values, close = spec.user, {"content": content, "system": system}, ""
        text = (spec.observation_open if msg.role == "observation" else "") + slot.render(**values, **specials) + close
        prompt = (head if i == 0 else "") + text + gen
        tail = len(slot.text_after("content", **values, **specials)) + len(close) + len(gen)
        if i + 1 < len(msgs):
            prompt_side, body, reasoning = _answer_parts(spec, conv, i + 1, last_query, opts)
            answer_slot = spec.function_slot if msgs[i + 1].role == "function" else spec.assistant
            turns.append(Turn(prompt + prompt_side, answer_slot.render(content=body, reasoning=reasoning, **specials),
                              tail + len(prompt_side)))
        else:
            if spec.thinking.mode == "hybrid" and opts.enable_thinking is False and not spec.reasoning_in_slot:
                prompt += spec.thinking.open + spec.thinking.close
            turns.append(Turn(prompt, None))
    return turns


def render_text(spec: TemplateSpec, conv: Conversation, opts: RenderOptions, *,
                for_generation: bool = False) -> str:
    """The whole conversation as one string (what ``apply_chat_template(..., tokenize=False)`` returns)."""
    return "".join(t.prompt + (t.answer or "") for t in render_turns(spec, conv, opts, for_generation=for_generation))


def to_hf_messages(conv: Conversation) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) in the form ``tokenizer.apply_chat_template`` takes: system first, function turns as
    assistant ``tool_calls``, observations as ``tool`` messages, reasoning as ``reasoning_content``."""
    messages: list[dict[str, Any]] = []
    if conv.system:
        messages.append({"role": "system", "content": conv.system})
    for msg in conv.messages:
        if msg.role == "user":
            item: dict[str, Any] = {"role": "user", "content": msg.content}
        elif msg.role == "observation":
            item = {"role": "tool", "content": msg.content}
        elif msg.role == "function":
            calls = parse_calls(msg.content, conv.source)
            item = {"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}
        else:
            item = {"role": "assistant", "content": msg.content}
        if msg.reasoning is not None and msg.role in ANSWER_ROLES:
            item["reasoning_content"] = msg.reasoning
        messages.append(item)
    tools = parse_tools(conv, None)
    return messages, (tools or None)
