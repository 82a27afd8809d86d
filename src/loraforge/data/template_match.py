"""Which known template a tokenizer's own Jinja chat template renders like, found by rendering probes.

A few probe conversations (single turn, system prompt, multi-turn, tool call) are rendered with the
tokenizer's ``chat_template`` and with each registered template; a template matches when every probe it can
render gives the same text. Conversations with a system prompt are compared at the generation prompt only
(Mistral's template drops the system prompt from a finished conversation but writes it when prompting). The
model name is never looked at.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from ..errors import TemplateError
from .conversation import Conversation, Message
from .render import to_hf_messages

logger = logging.getLogger(__name__)

_TOOLS = json.dumps([{"name": "get_weather", "description": "Get the weather of a city.",
                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                     "required": ["city"]}}])


@dataclass(frozen=True)
class Probe:
    name: str
    conv: Conversation
    compare_full: bool  # False: compare only the generation prompt of the last answer


PROBES = (
    Probe("single-turn", Conversation([Message("user", "Hello, who are you?"),
                                       Message("assistant", "I am a helpful assistant.")]), True),
    Probe("multi-turn", Conversation([Message("user", "What is 2+2?"), Message("assistant", "4."),
                                      Message("user", "And 3+3?"), Message("assistant", "6.")]), True),
    Probe("system prompt", Conversation([Message("user", "Hi!"), Message("assistant", "Ahoy!")],
                                        system="You are a pirate."), False),
    Probe("tool call", Conversation([Message("user", "Weather in Paris?"),
                                     Message("function", '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
                                     Message("observation", '{"temperature": 21}'),
                                     Message("assistant", "It is 21 degrees in Paris.")], tools=_TOOLS), True),
)


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _jinja(tokenizer: Any, conv: Conversation, generation: bool) -> str | None:
    """The tokenizer's own rendering (None when its template refuses the conversation)."""
    messages, tools = to_hf_messages(conv)
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception:  # noqa: BLE001 - any template error means "this probe is not comparable"
        return None
    return text if isinstance(text, str) else None


def _prompt_conv(conv: Conversation) -> Conversation:
    return Conversation(conv.messages[:-1], system=conv.system, tools=conv.tools)


def _references(tokenizer: Any) -> list[tuple[Probe, str | None, str | None]]:
    """(probe, full text, generation-prompt text) as the tokenizer's template renders them."""
    out = []
    for probe in PROBES:
        full = _jinja(tokenizer, probe.conv, False) if probe.compare_full else None
        out.append((probe, full, _jinja(tokenizer, _prompt_conv(probe.conv), True)))
    return out


def _first_difference(template, tokenizer, references) -> tuple[int, str | None]:
    """(number of probes compared, description of the first difference or None)."""
    compared = 0
    for probe, full, prompt in references:
        pairs = []
        try:
            if full is not None:
                pairs.append(("", full, template.render_text(probe.conv, tokenizer)))
            if prompt is not None:
                pairs.append((" (generation prompt)", prompt,
                               template.render_text(_prompt_conv(probe.conv), tokenizer, for_generation=True)))
        except TemplateError:
            continue  # the template cannot render this probe (e.g. no tool format): not comparable
        if not pairs:
            continue
        compared += 1
        for what, theirs, ours in pairs:
            if theirs != ours:
                return compared, f"{probe.name}{what}: {_diff(theirs, ours, template.name)}"
    return compared, None


def _diff(theirs: str, ours: str, name: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    lo = max(0, at - 30)
    return (f"from character {at}, the model's template writes {theirs[lo:at + 40]!r}, "
            f"`{name}` writes {ours[lo:at + 40]!r}")


def derive_template(tokenizer: Any):
    """The :class:`TemplateSpec` of the registered template that renders like ``tokenizer.chat_template``.

    A tokenizer without a chat template (a base model) gets ``empty`` with a warning, as in LLaMA-Factory.
    Raises :class:`TemplateError` when no known template matches.
    """
    from .templates import get_template, template_names

    if _chat_template(tokenizer) is None:
        logger.warning("`template` is not set and the tokenizer has no chat template (a base model?); using the "
                       "`empty` template: prompt and answer are concatenated as they are")
        return get_template("empty").spec
    references = _references(tokenizer)
    best, best_count, closest = None, 0, []
    for name in template_names():
        template = get_template(name)
        compared, problem = _first_difference(template, tokenizer, references)
        if problem is None and compared >= 2 and compared > best_count:
            best, best_count = template, compared
        elif problem is not None:
            closest.append((compared, problem))
    if best is None:
        closest.sort(key=lambda item: -item[0])
        detail = f" (closest: {closest[0][1]})" if closest else ""
        raise TemplateError(f"`template` is not set and the tokenizer's chat template matches none of the known "
                            f"templates{detail}",
                            hint="set `template:` to a known name (docs/templates.md lists them), a template "
                                 "YAML file, or a `prompt_template`")
    logger.info("template: using `%s`, which renders like the tokenizer's chat template", best.name)
    return best.spec


def describe_mismatch(template, tokenizer: Any) -> str | None:
    """None when ``template`` renders the probes like the tokenizer's own chat template (or the tokenizer has
    none); else the first difference, and the known template that does match, if any."""
    if _chat_template(tokenizer) is None:
        return None
    references = _references(tokenizer)
    _, problem = _first_difference(template, tokenizer, references)
    if problem is None:
        return None
    try:
        match = derive_template(tokenizer).name
        return f"{problem}; `{match}` matches the model's template"
    except TemplateError:
        return problem
