"""Chat template definitions as data: the :class:`TemplateSpec` a YAML file describes, and its validation.

A template is a handful of text *slots* with ``{placeholders}``, for example (Qwen3)::

    system: "<|im_start|>system\\n{content}<|im_end|>\\n"
    user: "<|im_start|>user\\n{content}<|im_end|>\\n"
    generation_prompt: "<|im_start|>assistant\\n"
    assistant: "{content}<|im_end|>\\n"

Only the placeholders a slot is allowed to use are substituted (:data:`SLOT_FIELDS`); any other text in braces
is kept literally, so JSON in a slot needs no escaping. ``{bos_token}`` and ``{eos_token}`` are the
tokenizer's own special tokens. The rendering rules (which slot a message uses, where the system prompt and
the thinking block go) live in :mod:`loraforge.data.render`; this module only holds and checks definitions.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from ..errors import TemplateError


@dataclass(frozen=True)
class Field:
    """A placeholder inside a slot, e.g. ``{content}``."""

    name: str


Piece = Union[str, Field]

SPECIAL_FIELDS = ("bos_token", "eos_token")
# The placeholders each slot may use (besides bos_token/eos_token).
SLOT_FIELDS: dict[str, tuple[str, ...]] = {
    "prefix": (),
    "system": ("content",),
    "user": ("content", "system"),
    "generation_prompt": (),
    "assistant": ("content", "reasoning"),
    "function": ("content", "reasoning"),
    "observation": ("content",),
    "tools.system": ("tools",),
    "tools.item": ("tool",),
    "tools.call": ("name", "arguments"),
}
_FIELD_RE = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Slot:
    """A slot's text as literal pieces and placeholders."""

    pieces: tuple[Piece, ...] = ()

    @classmethod
    def parse(cls, text: str, allowed: tuple[str, ...]) -> "Slot":
        """Split ``text`` at the ``{name}`` placeholders listed in ``allowed`` (other braces stay literal)."""
        pieces: list[Piece] = []
        pos = 0
        for match in _FIELD_RE.finditer(text):
            if match.group(1) not in allowed:
                continue
            if match.start() > pos:
                pieces.append(text[pos:match.start()])
            pieces.append(Field(match.group(1)))
            pos = match.end()
        if pos < len(text):
            pieces.append(text[pos:])
        return cls(tuple(pieces))

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.pieces if isinstance(p, Field))

    def render(self, **values: str) -> str:
        """The slot's text with each placeholder replaced by ``values[name]`` (missing ones render empty)."""
        return "".join(p if isinstance(p, str) else values.get(p.name, "") for p in self.pieces)

    def text_after(self, name: str, **values: str) -> str:
        """The rendered text after the last ``{name}`` placeholder (all of it when there is none)."""
        cut = max((i + 1 for i, p in enumerate(self.pieces) if p == Field(name)), default=0)
        return Slot(self.pieces[cut:]).render(**values)

    def startswith_field(self, name: str) -> bool:
        return bool(self.pieces) and self.pieces[0] == Field(name)

    def __str__(self) -> str:
        return "".join(p if isinstance(p, str) else "{" + p.name + "}" for p in self.pieces)


@dataclass(frozen=True)
class ToolSpec:
    """How tool definitions are listed in the system prompt and how tool calls are written (Qwen style)."""

    system: Slot  # the tools text, {tools} = the items concatenated
    item: Slot  # one tool, {tool} = its JSON
    call: Slot  # one call, {name} and {arguments} (JSON)
    separator: str = "\n\n"  # between the system prompt and the tools text (when there is a system prompt)
    call_separator: str = "\n"  # between calls, and between text content and the first call
    wrap: bool = True  # wrap a bare {name, description, parameters} as {"type": "function", "function": ...}
    style: str = ""


THINKING_MODES = ("hybrid", "inline", "drop")


@dataclass(frozen=True)
class ThinkingSpec:
    """Where an assistant's reasoning goes.

    ``hybrid``: a thinking model with an on/off switch (Qwen3): ``enable_thinking`` decides whether a final
    answer without reasoning gets an empty block in the answer (trained) or in the prompt (no-think mode).
    ``inline``: reasoning, when a sample has it, is written as ``open + reasoning + close`` before the answer.
    ``drop``: reasoning is not rendered.
    """

    mode: str = "inline"
    open: str = "<think>\n"
    close: str = "\n</think>\n\n"
    drop_history: bool = False  # drop reasoning of answers before the last user query (Qwen3)
    query_skip: tuple[str, str] | None = None  # a user message wrapped in these is a tool result, not a query

    @property
    def tags(self) -> tuple[str, str]:
        return self.open.strip(), self.close.strip()


@dataclass(frozen=True)
class TemplateSpec:
    """One chat template as plain data (see the module docstring and docs/templates.md)."""

    name: str
    description: str = ""
    prefix: Slot = Slot()
    system: Slot = Slot((Field("content"),))
    default_system: str = ""
    system_placement: str = "block"  # block | first_user | last_user | none (not written)
    always_system: bool = False  # write the system slot even when there is no system prompt
    user: Slot = Slot((Field("content"),))
    generation_prompt: Slot = Slot()
    assistant: Slot = Slot((Field("content"), Field("eos_token")))
    function: Slot | None = None  # defaults to the assistant slot
    observation: Slot | None = None  # defaults to the user slot
    observation_open: str = ""  # written once before a run of consecutive tool results
    observation_close: str = ""  # written once after it
    strip_content: bool = False  # trim whitespace around each message (Llama 3, Gemma)
    tools: ToolSpec | None = None
    thinking: ThinkingSpec = ThinkingSpec()
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False  # make stop_words[0] the tokenizer's EOS token
    source: str = field(default="", compare=False)

    @property
    def function_slot(self) -> Slot:
        return self.function if self.function is not None else self.assistant

    @property
    def observation_slot(self) -> Slot:
        return self.observation if self.observation is not None else self.user

    @property
    def reasoning_in_slot(self) -> bool:
        """True when the assistant slot places the reasoning itself (plain-text prompt templates)."""
        return "reasoning" in self.assistant.fields


PLACEMENTS = ("block", "first_user", "last_user", "none")
_TOP_KEYS = ("name", "description", "prefix", "system", "default_system", "system_placement", "always_system",
             "user", "generation_prompt", "assistant", "function", "observation", "observation_open",
             "observation_close", "strip_content", "tools", "thinking", "stop_words", "replace_eos")
_TOOL_KEYS = ("style", "system", "item", "call", "separator", "call_separator", "wrap")
_THINK_KEYS = ("mode", "open", "close", "drop_history", "query_skip")


class _Reader:
    """Typed access to one mapping of a definition, with errors that name the file and the field."""

    def __init__(self, data: Mapping[str, Any], where: str, allowed: tuple[str, ...], prefix: str = ""):
        self.data, self.where, self.prefix = data, where, prefix
        unknown = [k for k in data if k not in allowed]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), allowed, n=1)
            hint = f"did you mean `{prefix}{close[0]}`?" if close else f"known fields: {', '.join(allowed)}"
            raise TemplateError(f"{where}: unknown field `{prefix}{unknown[0]}`", hint=hint)

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = self.data.get(key, default)
        if value is not default and not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise TemplateError(f"{self.where}: field `{self.prefix}{key}` must be a {names}, "
                                f"got {type(value).__name__} {value!r}")
        return value

    def text(self, key: str, default: str | None = "") -> str | None:
        return self._get(key, str, default)

    def flag(self, key: str, default: bool = False) -> bool:
        return self._get(key, bool, default)

    def slot(self, key: str, default: str | None, slot_name: str | None = None) -> Slot | None:
        text = self.text(key, default)
        if text is None:
            return None
        allowed = SLOT_FIELDS[slot_name or key] + SPECIAL_FIELDS
        return Slot.parse(text, allowed)


def _words(value: Any, where: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TemplateError(f"{where}: field `{key}` must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def parse_tool_spec(data: Mapping[str, Any], where: str) -> ToolSpec:
    """Build a :class:`ToolSpec` from a ``tools:`` mapping."""
    r = _Reader(data, where, _TOOL_KEYS, "tools.")
    missing = [k for k in ("system", "item", "call") if k not in data]
    if missing:
        raise TemplateError(f"{where}: `tools` needs the fields {', '.join('tools.' + k for k in missing)}",
                            hint="or name a known tool style, e.g. `tools: qwen`")
    spec = ToolSpec(system=r.slot("system", None, "tools.system"), item=r.slot("item", None, "tools.item"),
                    call=r.slot("call", None, "tools.call"), separator=r.text("separator", "\n\n"),
                    call_separator=r.text("call_separator", "\n"), wrap=r.flag("wrap", True),
                    style=r.text("style", ""))
    for key, slot, need in (("system", spec.system, "tools"), ("item", spec.item, "tool"),
                            ("call", spec.call, "name")):
        if need not in slot.fields:
            raise TemplateError(f"{where}: field `tools.{key}` must contain the placeholder {{{need}}}")
    return spec


def parse_thinking(data: Mapping[str, Any] | None, where: str) -> ThinkingSpec:
    """Build a :class:`ThinkingSpec` from a ``thinking:`` mapping (absent: reasoning written inline)."""
    if data is None:
        return ThinkingSpec()
    if not isinstance(data, Mapping):
        raise TemplateError(f"{where}: field `thinking` must be a mapping, e.g. {{mode: hybrid}}")
    r = _Reader(data, where, _THINK_KEYS, "thinking.")
    mode = r.text("mode", "inline")
    if mode not in THINKING_MODES:
        raise TemplateError(f"{where}: `thinking.mode: {mode}` is not one of {', '.join(THINKING_MODES)}")
    skip = _words(data.get("query_skip"), where, "thinking.query_skip")
    if skip and len(skip) != 2:
        raise TemplateError(f"{where}: `thinking.query_skip` must be two strings (opening and closing tag)")
    spec = ThinkingSpec(mode=mode, open=r.text("open", "<think>\n"), close=r.text("close", "\n</think>\n\n"),
                        drop_history=r.flag("drop_history"), query_skip=tuple(skip) if skip else None)
    if not spec.open.strip() or not spec.close.strip():
        raise TemplateError(f"{where}: `thinking.open` and `thinking.close` must contain a tag, e.g. <think>")
    return spec


def parse_spec(data: Mapping[str, Any], *, where: str, name: str | None = None,
               tool_styles: Mapping[str, ToolSpec] | None = None) -> TemplateSpec:
    """Validate one template definition (a YAML mapping) into a :class:`TemplateSpec`.

    ``where`` names the source in error messages; ``name`` is used when the mapping has no ``name``.
    ``tool_styles`` resolves ``tools: <style name>``.
    """
    if not isinstance(data, Mapping):
        raise TemplateError(f"{where}: a template definition must be a mapping of fields, got {type(data).__name__}")
    r = _Reader(data, where, _TOP_KEYS)
    name = r.text("name", name)
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise TemplateError(f"{where}: field `name` must be a non-empty word (letters, digits, _ . -), got {name!r}")
    placement = r.text("system_placement", "block")
    if placement not in PLACEMENTS:
        raise TemplateError(f"{where}: `system_placement: {placement}` is not one of {', '.join(PLACEMENTS)}")
    tools_value = data.get("tools")
    tools: ToolSpec | None = None
    if isinstance(tools_value, str):
        styles = tool_styles or {}
        if tools_value not in styles:
            raise TemplateError(f"{where}: unknown tool style `tools: {tools_value}`",
                                hint=f"known styles: {', '.join(sorted(styles)) or 'none'}, or a mapping")
        tools = styles[tools_value]
    elif isinstance(tools_value, Mapping):
        tools = parse_tool_spec(tools_value, where)
    elif tools_value is not None:
        raise TemplateError(f"{where}: field `tools` must be a tool style name or a mapping")
    spec = TemplateSpec(
        name=name, description=r.text("description", ""), prefix=r.slot("prefix", ""),
        system=r.slot("system", "{content}"), default_system=r.text("default_system", ""),
        system_placement=placement, always_system=r.flag("always_system"), user=r.slot("user", "{content}"),
        generation_prompt=r.slot("generation_prompt", ""), assistant=r.slot("assistant", "{content}{eos_token}"),
        function=r.slot("function", None), observation=r.slot("observation", None),
        observation_open=r.text("observation_open", ""), observation_close=r.text("observation_close", ""),
        strip_content=r.flag("strip_content"), tools=tools, thinking=parse_thinking(data.get("thinking"), where),
        stop_words=_words(data.get("stop_words"), where, "stop_words"), replace_eos=r.flag("replace_eos"),
        source=where)
    check_spec(spec)
    return spec


def check_spec(spec: TemplateSpec) -> None:
    """Raise :class:`TemplateError` when the slots of ``spec`` cannot render a conversation."""
    where = spec.source or f"template {spec.name}"
    for key in ("user", "assistant", "system"):
        if "content" not in getattr(spec, key).fields:
            raise TemplateError(f"{where}: field `{key}` must contain the placeholder {{content}}")
    if spec.observation is not None and "content" not in spec.observation.fields:
        raise TemplateError(f"{where}: field `observation` must contain the placeholder {{content}}")
    if spec.function is not None and "content" not in spec.function.fields:
        raise TemplateError(f"{where}: field `function` must contain the placeholder {{content}}")
    if "system" in spec.user.fields and spec.system_placement != "block":
        raise TemplateError(f"{where}: a user slot with {{system}} places the system prompt itself; "
                            f"drop `system_placement: {spec.system_placement}`")
    if spec.thinking.mode == "hybrid":
        for key in ("assistant", "function"):
            slot = getattr(spec, key)
            if slot is not None and not slot.startswith_field("content"):
                raise TemplateError(f"{where}: with `thinking.mode: hybrid` the `{key}` slot must start with "
                                    "{content} (the empty thinking block goes right after the generation prompt)")
    if spec.replace_eos and not spec.stop_words:
        raise TemplateError(f"{where}: `replace_eos: true` needs `stop_words` (the first one becomes the EOS token)")
