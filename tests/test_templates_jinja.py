"""The exported Jinja chat template renders exactly what training rendered, for every template and mode.

Hermetic: renders with transformers' own chat-template renderer; one test goes through a saved tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from loraforge.data.conversation import Conversation, Message
from loraforge.data.prompt_template import prompt_template_spec
from loraforge.data.render import to_hf_messages
from loraforge.data.templates import Template, get_template, template_names
from loraforge.errors import TemplateError

TOOLS = json.dumps([{"name": "lookup", "description": "Look up a word.",
                     "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}])
CALL = json.dumps([{"name": "lookup", "arguments": {"word": "über"}}], ensure_ascii=False)
TWO_CALLS = json.dumps([{"name": "lookup", "arguments": {"word": "a"}}, {"name": "lookup", "arguments": {}}])


def M(role, content, reasoning=None):  # noqa: N802
    return Message(role, content, reasoning=reasoning)


CONVS = {
    "single": Conversation([M("user", "Hi"), M("assistant", "Hello")]),
    "system": Conversation([M("user", "Hi"), M("assistant", "Hello")], system="Sys 'quoted' {braces} \\ back"),
    "multi": Conversation([M("user", "a"), M("assistant", "b", "r1"), M("user", "c"), M("assistant", "d", "r2")],
                          system="S"),
    "inline_think": Conversation([M("user", "q"), M("assistant", "<think>\nr\n</think>\n\nans"),
                                  M("user", "q2"), M("assistant", "<think>\n\n</think>\n\nans2")]),
    "empty_reasoning": Conversation([M("user", "q"), M("assistant", "a", "")]),
    "reasoning_newlines": Conversation([M("user", "q"), M("assistant", "\n\nans\n", "\nr\n\n")]),
    "unicode": Conversation([M("user", "  你好 😀 \n"), M("assistant", "\n 世界 🌍  ")], system=" 系统 "),
    "tools": Conversation([M("user", "define über"), M("function", CALL, "use tool"), M("observation", "a word"),
                           M("assistant", "It means over.", "done")], system="Tool bot", tools=TOOLS),
    "tools_two_calls_no_system": Conversation([M("user", "x"), M("function", TWO_CALLS), M("observation", "r"),
                                               M("assistant", "ok"), M("user", "again"), M("function", CALL)],
                                              tools=TOOLS),
}
BOS, EOS = "<s>", "</s>"


def jinja(chat_template: str, conv: Conversation, *, generation: bool = False, **kwargs) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages, tools = to_hf_messages(conv)
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=chat_template,
                                        add_generation_prompt=generation, bos_token=BOS, eos_token=EOS, **kwargs)
    return rendered[0]


class Tok:
    bos_token, eos_token = BOS, EOS


def prompts(conv: Conversation) -> list[Conversation]:
    """Every prefix of ``conv`` that ends with a prompt (what generation would be asked to continue)."""
    return [replace(conv, messages=conv.messages[:i]) for i in range(1, len(conv.messages), 2)]


def variants() -> list[tuple[str, Template]]:
    out = [(name, get_template(name)) for name in template_names()]
    out.append(("qwen3+keep_history", replace(get_template("qwen3"), keep_reasoning_history=True)))
    out.append(("qwen+default_system", replace(get_template("qwen"), default_system="Custom system.")))
    out.append(("prompt_template", Template(prompt_template_spec(
        "Below is an instruction.\n\n### Instruction:\n{instruction}\n\n### Question:\n{question}\n\n"
        "### Response:\n<think>\n{reasoning}\n</think>\n{answer}{eos_token}"))))
    out.append(("prompt_template_no_instruction", Template(prompt_template_spec("Q: {question}\nA: {answer}\n"))))
    return out


@pytest.mark.parametrize("mode", [True, False, None], ids=["think", "nothink", "auto"])
@pytest.mark.parametrize("name,template", variants(), ids=[n for n, _ in variants()])
def test_exported_jinja_renders_what_training_rendered(name, template, mode):
    chat_template = replace(template, enable_thinking=mode).to_jinja()
    compared = 0
    for case, conv in CONVS.items():
        try:
            ours = template.render_text(conv, Tok(), enable_thinking=mode)
        except TemplateError:
            assert template.spec.tools is None, f"{name} refused {case}"
            continue
        assert jinja(chat_template, conv) == ours, case
        assert jinja(chat_template, conv, enable_thinking=mode) == ours, case
        for prompt in prompts(conv):
            expect = template.render_text(prompt, Tok(), enable_thinking=mode, for_generation=True)
            assert jinja(chat_template, prompt, generation=True) == expect, case
        compared += 1
    assert compared >= 5


def test_enable_thinking_default_follows_training_mode():
    conv = Conversation([M("user", "Hi")])
    on, off = get_template("qwen3"), replace(get_template("qwen3"), enable_thinking=False)
    assert jinja(on.to_jinja(), conv, generation=True).endswith("<|im_start|>assistant\n")
    assert jinja(off.to_jinja(), conv, generation=True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # an explicit switch wins
    assert jinja(off.to_jinja(), conv, generation=True, enable_thinking=True).endswith("<|im_start|>assistant\n")


def test_consecutive_tool_results_share_one_turn():
    """API clients send one `tool` message per result; like Qwen's template, they form one user turn."""
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "a", "arguments": {}}},
                    {"type": "function", "function": {"name": "b", "arguments": "{\"k\": 1}"}}]},
                {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}]
    from transformers.utils.chat_template_utils import render_jinja_template

    text = render_jinja_template([messages], chat_template=get_template("qwen3").to_jinja(),
                                 add_generation_prompt=True)[0][0]
    assert text.endswith('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", '
                         '"arguments": {"k": 1}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nr1\n'
                         '</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>\n<|im_start|>assistant\n')


def test_saved_tokenizer_renders_training_text(tmp_path):
    """apply_to_tokenizer -> save -> load -> apply_chat_template gives the training text and tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    model = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    template = replace(get_template("qwen3"), enable_thinking=False)
    template.apply_to_tokenizer(tok)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token == "<|im_end|>"
    for case in ("single", "multi", "tools", "unicode"):
        conv = CONVS[case]
        messages, tools = to_hf_messages(conv)
        text = loaded.apply_chat_template(messages, tools=tools, tokenize=False)
        assert text == template.render_text(conv, loaded, enable_thinking=False), case
        input_ids, _ = template.encode(conv, loaded, cutoff_len=10_000, enable_thinking=False)
        assert loaded(text, add_special_tokens=False)["input_ids"] == input_ids, case
