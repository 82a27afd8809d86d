"""Plain-text prompt templates (config key ``prompt_template``), as Unsloth-style notebooks write them.

    Below is an instruction ...\\n\\n### Instruction:\\n{instruction}\\n\\n### Question:\\n{question}\\n\\n
    ### Response:\\n<think>\\n{reasoning}\\n</think>\\n{answer}{eos_token}

is a Python format string: ``{instruction}`` is the conversation's system prompt (or ``default_system``),
``{question}`` the user message, ``{reasoning}`` the assistant's reasoning (empty when it has none), ``{answer}``
the assistant's answer, ``{eos_token}``/``{bos_token}`` the tokenizer's tokens; ``{{``/``}}`` are literal braces.
The loss starts at the first answer-side placeholder (``{reasoning}`` or ``{answer}``): everything before it
is prompt. A multi-turn conversation repeats the whole format once per turn.

The format becomes an ordinary :class:`TemplateSpec` (user slot = text before the first answer-side
placeholder, assistant slot = the rest), so rendering, truncation and the Jinja export are shared.
"""

from __future__ import annotations

import string
from pathlib import Path

from ..errors import TemplateError
from .template_spec import Field, Piece, Slot, TemplateSpec, ThinkingSpec

PROMPT_FIELDS = {"instruction": "system", "question": "content", "reasoning": "reasoning", "answer": "content",
                 "eos_token": "eos_token", "bos_token": "bos_token"}
ANSWER_SIDE = ("reasoning", "answer")


def read_prompt_template(value: str) -> tuple[str, str]:
    """(format text, where it came from): ``value`` itself, or the content of the .txt file it names."""
    looks_like_path = "{" not in value and "\n" not in value and len(value) < 4096
    if looks_like_path:
        path = Path(value).expanduser()
        if not path.is_file():
            raise TemplateError(f"`prompt_template: {value}` is neither a format string (it has no {{answer}} "
                                "placeholder) nor an existing file",
                                hint="give the format text with {question} and {answer}, or a path to a .txt file")
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as err:
            raise TemplateError(f"cannot read `prompt_template` file {path}: {err}") from None
    return value, "prompt_template"


def _parse(text: str, where: str) -> list[Piece]:
    pieces: list[Piece] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:
        raise TemplateError(f"{where}: not a valid format string ({err})",
                            hint="write literal braces as {{ and }}") from None
    for literal, field_name, spec, conversion in parsed:
        if literal:
            pieces.append(literal)
        if field_name is None:
            continue
        if field_name == "" or field_name.isdigit():
            raise TemplateError(f"{where}: positional placeholder {{{field_name}}} is not supported",
                                hint=f"use named placeholders: {', '.join('{' + k + '}' for k in PROMPT_FIELDS)}")
        if field_name not in PROMPT_FIELDS:
            raise TemplateError(f"{where}: unknown placeholder {{{field_name}}}",
                                hint=f"known placeholders: {', '.join('{' + k + '}' for k in PROMPT_FIELDS)}")
        if spec or conversion:
            raise TemplateError(f"{where}: placeholder {{{field_name}}} cannot carry a format spec or conversion")
        pieces.append(Field(field_name))
    return pieces


def prompt_template_spec(value: str, *, name: str = "prompt_template") -> TemplateSpec:
    """The :class:`TemplateSpec` of a plain-text prompt template (the text itself or a path to a .txt file)."""
    text, where = read_prompt_template(value)
    pieces = _parse(text, where)
    names = [p.name for p in pieces if isinstance(p, Field)]
    for required in ("question", "answer"):
        if names.count(required) != 1:
            raise TemplateError(f"{where}: the prompt template must contain {{{required}}} exactly once "
                                f"(found {names.count(required)})")
    for once in ("instruction", "reasoning"):
        if names.count(once) > 1:
            raise TemplateError(f"{where}: {{{once}}} may appear only once")
    cut = next(i for i, p in enumerate(pieces) if isinstance(p, Field) and p.name in ANSWER_SIDE)
    prompt_part, answer_part = pieces[:cut], pieces[cut:]
    for p in answer_part:
        if isinstance(p, Field) and p.name in ("question", "instruction"):
            raise TemplateError(f"{where}: {{{p.name}}} comes after the answer starts; the prompt part "
                                "(instruction, question) must come before {reasoning}/{answer}")

    def slot(part: list[Piece]) -> Slot:
        return Slot(tuple(Field(PROMPT_FIELDS[p.name]) if isinstance(p, Field) else p for p in part))

    return TemplateSpec(
        name=name, description="plain-text prompt template from the config", user=slot(prompt_part),
        assistant=slot(answer_part), system_placement="block" if "instruction" in names else "none",
        thinking=ThinkingSpec(mode="drop"), source=where)
