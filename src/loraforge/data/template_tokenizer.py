"""The `tokenizer` template kind: render with the model's own Jinja chat template, find the trained spans in it.

Any model that ships a chat template can then be trained without a hand-written template. A conversation is
rendered once, whole, by ``tokenizer.apply_chat_template`` (T), so the ids are the model's own rendering token for
token. Which characters of T are answers is found by rendering prefixes of the conversation, for each answer k:

* the prompt before it ends where the rendering of ``messages[:k]`` with the generation prompt (G_k) stops
  agreeing with T. Normally G_k is a prefix of T; a template that adds text to the generation prompt that history
  does not keep (Qwen3 with ``enable_thinking=False``, QwQ's opening ``<think>``) agrees up to the assistant
  header. The rendering of ``messages[:k]`` without the generation prompt must be a prefix of T: a template that
  rewrites earlier *prompts* as the conversation grows (Mistral's system prompt joins whichever user message is
  last) is not prefix-stable, and the conversation is refused with the first difference;
* the answer ends where the rendering of ``messages[:k+1]`` (F_k) ends, when F_k is a prefix of T. A template
  that rewrites an earlier *answer* once it is history (Qwen3 and QwQ drop its reasoning) renders F_k differently;
  then the answer ends after its content in T plus the text that closes an answer in F_k (``<|im_end|>\\n``). The
  content is located by rendering once more with the content replaced by a sentinel character.

A template with HF's ``{% generation %}`` marks says itself which text is trained: its marked blocks are the
answers (one per answer; else prefixes are rendered as above), so even a template that is not prefix-stable works.

Reasoning: a template that reads ``reasoning_content`` gets it there; any other template gets it inline, as
``<think>\\n...\\n</think>\\n\\n`` before the answer (what LLaMA-Factory trains). With ``enable_thinking: false`` a
template that has the switch gets ``enable_thinking=False`` and the reasoning is dropped; ``null`` turns it on
only for samples that carry reasoning.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from ..errors import TemplateError
from .conversation import Conversation, Message
from .render import Turn, check_turns, parse_calls, parse_tools, split_reasoning
from .template_encode import build_example, tokenize_turns
from .template_spec import ThinkingSpec

logger = logging.getLogger(__name__)

_GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # HF's marks of the trained (assistant) text
# Templates that read the reasoning as a message field; HF fills `thinking` (gpt-oss) from `reasoning_content`.
_READS_REASONING = re.compile(r"reasoning_content|(?:\.|\[['\"])thinking\b")
SENTINEL = "\ue000"  # a private-use character: no data or template writes it, so it marks where content sits
_THINK = ThinkingSpec(mode="inline")
NAME = "tokenizer"


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo = 0
    while lo < n and a[lo] == b[lo]:
        lo += 1
    return lo


def _common_suffix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[len(a) - 1 - k] == b[len(b) - 1 - k]:
        k += 1
    return k


def _show(text: str, at: int) -> str:
    return repr(text[max(0, at - 30):at + 40])


@dataclass(frozen=True)
class TokenizerTemplate:
    """A template that is the model's own Jinja ``chat_template``; same interface as :class:`Template`."""

    chat_template: str
    default_system: str | None = None
    enable_thinking: bool | None = True
    name: str = NAME
    description: str = "the model's own chat template (from its tokenizer), trained spans found by rendering prefixes"

    @property
    def supports_thinking(self) -> bool:
        """True when the model's template has Qwen3's ``enable_thinking`` switch."""
        return "enable_thinking" in self.chat_template

    @property
    def thought_words(self) -> tuple[str, str]:
        return _THINK.tags

    # --- messages ---------------------------------------------------------------------------------------------

    def _thinking(self, conv: Conversation, enable_thinking: bool | None) -> bool:
        if enable_thinking is not None:
            return enable_thinking
        return any(m.reasoning is not None or (m.role == "assistant" and _THINK.tags[1] in m.content)
                   for m in conv.messages)

    def hf_messages(self, conv: Conversation, *, enable_thinking: bool | None = True
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]:
        """(messages, tools, extra template variables) as ``apply_chat_template`` takes them.

        Tool calls get ids (``call00001``, ...) and tool results the id of the call they answer, because some
        templates (Mistral) refuse calls without one; templates that do not print ids ignore them.
        """
        thinking = self._thinking(conv, enable_thinking)
        reads_reasoning = bool(_READS_REASONING.search(self.chat_template))
        drop = self.supports_thinking and not thinking
        messages: list[dict[str, Any]] = []
        system = conv.system or self.default_system
        if system:
            messages.append({"role": "system", "content": system})
        call_ids: list[str] = []
        n_calls = 0
        for msg in conv.messages:
            if msg.role == "user":
                messages.append({"role": "user", "content": msg.content})
            elif msg.role == "observation":
                item = {"role": "tool", "content": msg.content}
                if call_ids:
                    item["tool_call_id"] = call_ids[0]
                messages.append(item)
            else:
                content, reasoning = ("", msg.reasoning) if msg.role == "function" else (msg.content, msg.reasoning)
                if reasoning is None and msg.role == "assistant" and _THINK.tags[1] in content:
                    reasoning, content = split_reasoning(content, _THINK)
                item = {"role": "assistant", "content": content}
                if drop:
                    reasoning = None
                if reasoning is not None and reads_reasoning:
                    item["reasoning_content"] = reasoning
                elif reasoning:
                    item["content"] = _THINK.open + reasoning.strip("\n") + _THINK.close + content.lstrip("\n")
                if msg.role == "function":
                    call_ids, calls = [], []
                    for name, args in parse_calls(msg.content, conv.source):
                        n_calls += 1
                        call_id = f"call{n_calls:05d}"  # 9 alphanumeric characters, as Mistral requires
                        call_ids.append(call_id)
                        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
                    item["tool_calls"] = calls
                messages.append(item)
        tools = parse_tools(conv, None) or None
        extra = {"enable_thinking": thinking} if self.supports_thinking else {}
        return messages, tools, extra

    def _render(self, tokenizer: Any, messages: list[dict[str, Any]], tools, extra: dict[str, Any], *,
                generation: bool, where: str) -> str:
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.chat_template,
                                                 tokenize=False, add_generation_prompt=generation, **extra)
        except Exception as err:  # noqa: BLE001 - a Jinja raise_exception or a template bug: the template refuses
            raise TemplateError(f"{where}: the model's own chat template refused this conversation: {err}",
                                hint="drop what it refuses (e.g. a system prompt for Gemma), or set `template:` to a "
                                     "named template or YAML that renders it") from None
        if not isinstance(text, str):
            raise TemplateError(f"{where}: the model's chat template did not render text")
        return text

    # --- spans ------------------------------------------------------------------------------------------------

    def render(self, conv: Conversation, tokenizer: Any, *, enable_thinking: bool | None = True,
               for_generation: bool = False, with_tails: bool = False) -> list[Turn]:
        """The conversation as (prompt, answer) text turns whose concatenation is the model's own rendering."""
        where = conv.source or "conversation"
        check_turns(conv, where, for_generation)
        messages, tools, extra = self.hf_messages(conv, enable_thinking=enable_thinking)
        if for_generation:
            return [Turn(self._render(tokenizer, messages, tools, extra, generation=True, where=where), None)]
        off = len(messages) - len(conv.messages)  # the system message, when there is one

        def render(upto: int, generation: bool, msgs=messages) -> str:
            return self._render(tokenizer, msgs[:upto], tools, extra, generation=generation, where=where)

        full = render(len(messages), False)
        for tool in tools or []:  # a template without a tool format would silently drop the tool list
            name = (tool.get("function") or {}).get("name") or tool.get("name")
            if isinstance(name, str) and name not in full:
                raise TemplateError(f"{where}: the model's chat template does not write the tool list (tool `{name}` "
                                    "is missing from its rendering): it has no tool format",
                                    hint="drop the tools from these samples, or set `template:` to a template with "
                                         "tools (qwen, qwen3, ...)")
        spans = self._generation_spans(tokenizer, messages, tools, extra, full, len(conv.messages) // 2) \
            if _GENERATION_MARK.search(self.chat_template) else None
        if spans is None:
            spans = self._prefix_spans(render, full, messages, off, len(conv.messages), where)
        turns: list[Turn] = []
        pos = 0
        for i, (start, end) in enumerate(spans):
            k = 2 * i + 1
            if start < pos:
                raise TemplateError(f"{where}: the model's chat template is not prefix-stable: the prompt of message "
                                    f"{k} ends inside the previous answer ({_show(full, start)})",
                                    hint="set `template:` to a named template or a template YAML")
            if end <= start:
                raise TemplateError(f"{where}: message {k} (the answer) is empty in the model's own rendering",
                                    hint="check the sample, or set `template:` to a named template")
            _check_written(conv.messages[k], full[start:end], k, where)
            tail = self._prompt_tail(tokenizer, messages, tools, extra, off + k - 1, render(off + k, True), start,
                                     where) if with_tails else 0
            turns.append(Turn(full[pos:start], full[start:end], tail))
            pos = end
        if pos < len(full):  # text the template writes after the last answer belongs to that answer
            turns[-1] = Turn(turns[-1].prompt, turns[-1].answer + full[pos:], turns[-1].tail)
        return turns

    def _prefix_spans(self, render, full: str, messages, off: int, n: int, where: str) -> list[tuple[int, int]]:
        """(start, end) of each answer in ``full``, found by rendering prefixes (see the module docstring)."""
        spans = []
        for k in range(1, n, 2):
            gen = render(off + k, True)
            # When the generation prompt is a prefix of the whole text, what the model sees when it writes this
            # answer is exactly what precedes it in training. Otherwise the messages before it, rendered without
            # the generation prompt, must still be a prefix: the difference may only be in the generation prompt.
            start = len(gen) if full.startswith(gen) else None
            if start is None:
                before = render(off + k, False)
                if not full.startswith(before) or not gen.startswith(before):
                    bad = before if not full.startswith(before) else gen
                    at = _common_prefix(bad, full)
                    raise TemplateError(
                        f"{where}: the model's chat template is not prefix-stable: the conversation up to message {k} "
                        f"renders differently from the same messages inside the whole conversation (from character "
                        f"{at}: {_show(bad, at)} versus {_show(full, at)}), so the trained answers cannot be found",
                        hint="set `template:` to a named template (docs/templates.md lists them) or a template YAML")
            after = full if off + k + 1 == len(messages) else render(off + k + 1, False)
            end = len(after) if full.startswith(after) else None
            if start is None or end is None:
                marked = [dict(m) for m in messages]  # answer k's content replaced by the sentinel
                marked[off + k]["content"] = SENTINEL
                marked[off + k].pop("reasoning_content", None)
                full_marked = render(len(messages), False, marked)
                if start is None:  # the generation prompt writes text history does not keep: the prompt is what
                    # both renderings share, and never reaches into the answer's own text
                    start = min(_common_prefix(gen, full), _common_prefix(full, full_marked))
                if end is None:
                    end = self._history_end(render(off + k + 1, False, marked), after, full, full_marked, k, where)
            spans.append((start, end))
        return spans

    def _generation_spans(self, tokenizer, messages, tools, extra, full: str, n_answers: int
                          ) -> list[tuple[int, int]] | None:
        """(start, end) of the template's own ``{% generation %}`` blocks in ``full`` (through the tokenizer's
        assistant mask); None when they are unusable (slow tokenizer, not one block per answer): then prefixes."""
        if not getattr(tokenizer, "is_fast", False):
            return None
        try:
            out = tokenizer.apply_chat_template(messages, tools=tools, chat_template=self.chat_template, tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=True, **extra)
        except Exception:  # noqa: BLE001 - any failure here means "use prefix rendering", which reports errors
            return None
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) != list(out["input_ids"]):
            return None
        spans: list[tuple[int, int]] = []
        inside = False
        for marked, (lo, hi) in zip(out["assistant_masks"], enc["offset_mapping"]):
            if marked and inside:
                spans[-1] = (spans[-1][0], hi)
            elif marked:
                spans.append((lo, hi))
            inside = bool(marked)
        if len(spans) != n_answers:
            logger.debug("the chat template's {%% generation %%} blocks (%d) do not match the %d answers; rendering "
                         "prefixes instead", len(spans), n_answers)
            return None
        return spans

    @staticmethod
    def _history_end(after_marked: str, after: str, full: str, full_marked: str, index: int, where: str) -> int:
        """End of answer ``index`` in ``full`` when the template renders it differently once it is history: after
        its content (located by the sentinel rendering) comes the text that closes an answer in ``after``."""
        closing = after[len(after) - _common_suffix(after, after_marked):]
        content_end = len(full) - _common_suffix(full, full_marked)
        if SENTINEL not in full_marked or not full.startswith(closing, content_end):
            raise TemplateError(f"{where}: cannot find where answer {index} ends in the model's own rendering (the "
                                f"template writes it differently once later messages follow: {_show(after, len(after))})",
                                hint="set `template:` to a named template or a template YAML")
        return content_end + len(closing)

    def _prompt_tail(self, tokenizer, messages, tools, extra, index: int, gen: str, start: int, where: str) -> int:
        """Characters of the prompt after message ``index``'s text (its end of turn and the generation prompt):
        they survive truncation so a cut prompt stays well-formed."""
        marked = [dict(m) for m in messages[:index + 1]]
        marked[index]["content"] = f"{marked[index]['content']}{SENTINEL}"
        gen_marked = self._render(tokenizer, marked, tools, extra, generation=True, where=where)
        return max(0, _common_suffix(gen, gen_marked) - (len(gen) - start))

    # --- the Template interface ---------------------------------------------------------------------------------

    def render_text(self, conv: Conversation, tokenizer: Any, *, enable_thinking: bool | None = True,
                    for_generation: bool = False) -> str:
        """The conversation as one string, exactly ``apply_chat_template(..., tokenize=False)``."""
        where = conv.source or "conversation"
        check_turns(conv, where, for_generation)
        messages, tools, extra = self.hf_messages(conv, enable_thinking=enable_thinking)
        return self._render(tokenizer, messages, tools, extra, generation=for_generation, where=where)

    def encode(self, conv: Conversation, tokenizer: Any, *, cutoff_len: int, train_on_prompt: bool = False,
               mask_history: bool = False, enable_thinking: bool | None = True) -> tuple[list[int], list[int]]:
        """(input_ids, labels): the model's own rendering, every answer trained (the last with ``mask_history``)."""
        turns = self.render(conv, tokenizer, enable_thinking=enable_thinking)
        pairs = tokenize_turns(tokenizer, turns)
        if sum(len(p.prompt) + len(p.answer) for p in pairs) > cutoff_len:  # tails matter only when cutting
            pairs = tokenize_turns(tokenizer, self.render(conv, tokenizer, enable_thinking=enable_thinking,
                                                          with_tails=True))
        return build_example(pairs, cutoff_len=cutoff_len, train_on_prompt=train_on_prompt,
                             mask_history=mask_history)

    def encode_prompt(self, conv: Conversation, tokenizer: Any, *, enable_thinking: bool | None = True) -> list[int]:
        """Token ids of the model's own generation prompt for ``conv`` (ending with a user or tool message)."""
        text = self.render_text(conv, tokenizer, enable_thinking=True if enable_thinking is None else enable_thinking,
                                for_generation=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """EOS and the special token that closes an answer in this template (e.g. ``<|im_end|>``, ``<|eot_id|>``)."""
        ids: list[int] = []
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        probe = Conversation([Message("user", "Hi"), Message("assistant", SENTINEL)])
        try:
            text = self.render_text(probe, tokenizer)
        except TemplateError:
            return ids
        closing = text.split(SENTINEL, 1)[-1]
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        special |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
        for token in tokenizer(closing, add_special_tokens=False)["input_ids"][:1]:
            if token in special and token not in ids:
                ids.append(int(token))
        return ids

    def to_jinja(self) -> str:
        return self.chat_template

    def apply_to_tokenizer(self, tokenizer: Any) -> int:
        """Keep the model's own chat template (it is what training rendered); set pad to EOS when unset."""
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.chat_template = self.chat_template
        return 0

    def split_reasoning(self, text: str) -> tuple[str | None, str]:
        return split_reasoning(text, _THINK)


def _check_written(msg: Message, answer: str, index: int, where: str) -> None:
    """Refuse an answer whose words (or tool calls) the model's template does not write into its span."""
    if msg.role == "function":
        missing = [name for name, _ in parse_calls(msg.content, where) if name not in answer]
        what = f"the tool call `{missing[0]}`" if missing else ""
    else:
        words = msg.content.split(_THINK.tags[1])[-1].strip()
        what = "the answer" if words and words not in answer else ""
    if what:
        raise TemplateError(f"{where}: the model's chat template does not write {what} of message {index} where "
                            f"the answer goes (its span is {answer[:80]!r})",
                            hint="set `template:` to a named template or a template YAML that renders it")


def tokenizer_template(tokenizer: Any, *, default_system: str | None = None,
                       enable_thinking: bool | None = True) -> TokenizerTemplate:
    """The `tokenizer` template for ``tokenizer``; :class:`TemplateError` when it has no chat template."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):
        source = source.get("default")
    if not isinstance(source, str) or not source.strip():
        raise TemplateError("`template: tokenizer` needs a tokenizer with a chat template, and this one has none "
                            "(a base model?)", hint="set `template:` to a named template (e.g. `default`, `empty`)")
    return TokenizerTemplate(source, default_system=default_system, enable_thinking=enable_thinking)

