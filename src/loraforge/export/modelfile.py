"""An Ollama ``Modelfile`` next to the GGUF: FROM, a Go TEMPLATE equivalent to the chat template, SYSTEM, stops.

Ollama does not run Jinja, so the chat template must be re-expressed as a Go template. Two families cover the
models loraforge exports: ChatML (``<|im_start|>role ... <|im_end|>``: Qwen2/2.5/3, QwQ, SmolLM2) and Llama 3
(``<|start_header_id|>role<|end_header_id|>``). The family is read from the markers in the model's own chat
template; the parts that differ between models — a default system prompt (Qwen2.5, SmolLM2), a fixed preamble
in the system block (Llama 3.1's date lines), the generation prompt (QwQ opens a ``<think>`` block) — are found
by rendering the Jinja template with sample conversations. Before anything is written, the family's rendering
rule is checked against Jinja on several conversations, so a Modelfile is only given a TEMPLATE that matches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """The markers of one chat-format family."""

    name: str
    detect: str                  # a marker whose presence in the Jinja template selects the family
    open: str                    # "{role}" is replaced by the role name
    close: str                   # after a system/user message, and after an assistant message in history
    stops: tuple[str, ...]


FAMILIES = (
    Family("llama3", "<|start_header_id|>", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
           ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    Family("chatml", "<|im_start|>", "<|im_start|>{role}\n", "<|im_end|>\n", ("<|im_start|>", "<|im_end|>")),
)

_S, _U1, _A1, _U2 = "SYSTEM-7f3a", "USER-one-2b9c", "ASSISTANT-one-5d1e", "USER-two-8c4f"


@dataclass
class ChatFormat:
    """A chat template re-expressed as one family plus the parameters read from the Jinja output."""

    family: Family
    preamble: str                # text always at the start of the system block ("" = block only with a system)
    default_system: str | None   # the system prompt the Jinja template uses when none is given
    generation_prompt: str       # what opens the assistant's turn

    def render(self, messages: list[dict[str, str]], system: str | None) -> str:
        """Render like the Go template does (used to check the family against Jinja before writing)."""
        f = self.family
        out = ""
        if self.preamble or system:
            out += f.open.format(role="system") + self.preamble + (system or "") + f.close
        turns = [m for m in messages if m["role"] != "system"]
        for i, m in enumerate(turns):
            out += f.open.format(role=m["role"]) + m["content"]
            if m["role"] != "assistant" or i < len(turns) - 1:
                out += f.close
        if turns and turns[-1]["role"] != "assistant":
            out += self.generation_prompt
        return out

    def go_template(self) -> str:
        """The Ollama TEMPLATE text (Go ``text/template``), rendering ``.System`` and ``.Messages``."""
        f = self.family
        sys_open, sys_close = f.open.format(role="system"), f.close
        if self.preamble:  # the system block is always there (e.g. Llama 3.1's date lines)
            head = f"{sys_open}{self.preamble}{{{{ .System }}}}{sys_close}\n"
        else:
            head = f"{{{{- if .System }}}}{sys_open}{{{{ .System }}}}{sys_close}{{{{ end }}}}\n"
        role_open = f.open.replace("{role}", "{{ .Role }}")
        return (
            head
            + "{{- range $i, $_ := .Messages }}\n"
            + "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            + '{{- if ne .Role "system" }}' + role_open + "{{ .Content }}"
            + '{{ if or (not $last) (ne .Role "assistant") }}' + f.close + "{{ end }}{{ end }}\n"
            + '{{- if and $last (ne .Role "assistant") }}' + self.generation_prompt + "{{ end }}\n"
            + "{{- end }}"
        )


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool = True) -> str:
    from .gguf.tokenizer import special_token_flags

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and special_token_flags(tokenizer)[0]:
        text = text[len(bos):]  # a BOS the tokenizer adds anyway: llama.cpp and Ollama add it (add_bos_token)
    return text


def _system_block(text: str, family: Family) -> str | None:
    start = family.open.format(role="system")
    if not text.startswith(start):
        return None
    end = text.find(family.close, len(start))
    return text[len(start):end] if end >= 0 else None


def derive_chat_format(tokenizer: Any) -> ChatFormat | None:
    """Read the chat format from ``tokenizer.chat_template``; None when no family reproduces it exactly."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    family = next((f for f in FAMILIES if f.detect in template), None)
    if family is None:
        return None
    try:
        user_only = _render(tokenizer, [{"role": "user", "content": _U1}])
        no_gen = _render(tokenizer, [{"role": "user", "content": _U1}], generation=False)
        with_sys = _render(tokenizer, [{"role": "system", "content": _S}, {"role": "user", "content": _U1}])
    except Exception as err:  # noqa: BLE001 - any template failure means "cannot express it", not a crash
        logger.warning("could not render the chat template with sample messages (%s); Modelfile has no TEMPLATE", err)
        return None
    if not user_only.startswith(no_gen):
        return None
    generation_prompt = user_only[len(no_gen):]
    block = _system_block(with_sys, family) or ""
    if not block.endswith(_S):
        return None
    preamble = block[: -len(_S)]
    default_block = _system_block(user_only, family)
    default_system = None
    if default_block is not None and default_block != preamble:
        if preamble:
            return None
        default_system = default_block
    fmt = ChatFormat(family, preamble, default_system, generation_prompt)
    samples = [
        [{"role": "user", "content": _U1}],
        [{"role": "system", "content": _S}, {"role": "user", "content": _U1}],
        [{"role": "system", "content": _S}, {"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
         {"role": "user", "content": _U2}],
        [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}],
    ]
    for messages in samples:
        system = next((m["content"] for m in messages if m["role"] == "system"), default_system)
        if fmt.render(messages, system) != _render(tokenizer, messages):
            logger.warning("the chat template does not follow the %s layout exactly; the Modelfile gets no TEMPLATE "
                           "(Ollama then uses the template embedded in the GGUF)", family.name)
            return None
    return fmt


def stop_tokens(tokenizer: Any, eos_ids: list[int], fmt: ChatFormat | None) -> list[str]:
    """Every text at which generation must stop: the family's markers and each end-of-sequence token."""
    stops: list[str] = list(fmt.family.stops) if fmt else []
    for tok_id in eos_ids:
        text = tokenizer.convert_ids_to_tokens(int(tok_id))
        if isinstance(text, str) and text not in stops:
            stops.append(text)
    return stops


def _quote(text: str) -> str:
    return '"""' + text + '"""' if ("\n" in text or '"' in text) else f'"{text}"'


def write_modelfile(path: Path, gguf_name: str, tokenizer: Any, eos_ids: list[int],
                    default_system: str | None = None) -> ChatFormat | None:
    """Write ``Modelfile`` for ``ollama create NAME -f Modelfile``; returns the chat format it expressed."""
    fmt = derive_chat_format(tokenizer)
    lines = [f"# Ollama model file written by loraforge: ollama create my-model -f {path.name}", f"FROM ./{gguf_name}", ""]
    if fmt is None:
        lines += ["# No TEMPLATE: the chat template has no Go equivalent here; Ollama falls back to the template",
                  "# embedded in the GGUF (tokenizer.chat_template).", ""]
        logger.warning("Modelfile written without TEMPLATE: the chat template is not a ChatML or Llama 3 layout")
    else:
        lines += [f"TEMPLATE {_quote(fmt.go_template())}", ""]
    system = default_system if default_system is not None else (fmt.default_system if fmt else None)
    if system:
        lines += [f"SYSTEM {_quote(system)}", ""]
    for stop in stop_tokens(tokenizer, eos_ids, fmt):
        lines.append(f"PARAMETER stop {_quote(stop)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return fmt
