"""Parity with the models' own chat templates, token for token (qwen, qwen3) and text for text (llama3,
mistral, gemma, tokenized with the Qwen3 tokenizer as a stand-in).

References are the real Jinja files in tests/fixtures/chat_templates and the official Qwen3 tokenizer.
The label mask must start exactly where the model's own generation prompt ends.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from loraforge.data.conversation import Conversation, Message
from loraforge.data.render import to_hf_messages
from loraforge.data.templates import get_template
from token_spans import spans as trained_spans

IGNORE = -100
TOOLS = json.dumps([
    {"name": "get_weather", "description": "Get the current weather of a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                    "required": ["city"]}},
    {"type": "function", "function": {"name": "search", "description": "Search the web",
                                      "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
], ensure_ascii=False)


def call(name: str, **arguments) -> str:
    return json.dumps([{"name": name, "arguments": arguments}], ensure_ascii=False)


def M(role: str, content: str, reasoning: str | None = None) -> Message:  # noqa: N802 - short test helper
    return Message(role, content, reasoning=reasoning)


# Conversations without reasoning: they must match every template.
PLAIN = {
    "single": Conversation([M("user", "Hello! Who are you?"), M("assistant", "I am a helpful assistant.")]),
    "system": Conversation([M("user", "Say hi."), M("assistant", "Hi!")], system="You are a terse assistant."),
    "multi_turn": Conversation([M("user", "What is 2+2?"), M("assistant", "2+2 = 4."),
                                M("user", "And times 3?"), M("assistant", "12."),
                                M("user", "Thanks"), M("assistant", "You're welcome!")]),
    "chinese": Conversation([M("user", "请用一句话介绍北京。"), M("assistant", "北京是中国的首都，历史悠久。")],
                            system="你是一个乐于助人的助手。"),
    "emoji": Conversation([M("user", "Rate this 🍕🍕 pizza 😀"), M("assistant", "10/10 🔥👍🏽 would eat again")]),
    "newlines": Conversation([M("user", "line one\n\nline two\n"), M("assistant", "\nanswer with\n\nnewlines\n")]),
}
TOOL_CONVS = {
    "tools_system": Conversation(
        [M("user", "What's the weather in 北京?"), M("function", call("get_weather", city="北京")),
         M("observation", '{"temperature": 21, "unit": "°C"}'), M("assistant", "It is 21 °C in 北京 ☀️.")],
        system="You are a weather bot.", tools=TOOLS),
    "tools_no_system_two_calls": Conversation(
        [M("user", "Weather in Paris and Rome?"),
         M("function", json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                   {"name": "get_weather", "arguments": {"city": "Rome"}}])),
         M("observation", '[{"temperature": 18}, {"temperature": 25}]'), M("assistant", "Paris 18, Rome 25."),
         M("user", "Thanks!"), M("assistant", "Any time.")], tools=TOOLS),
    "tools_call_is_last": Conversation([M("user", "Search for loraforge"),
                                        M("function", call("search", q="loraforge"))],
                                       tools=TOOLS),
}
# Conversations with reasoning (Qwen3): the real template keeps it only after the last user query.
THINKING = {
    "reasoning_single": Conversation([M("user", "What is 17*3?"), M("assistant", "51.", "17*3 = 51.\nCheck: 50+1.")]),
    "reasoning_multi": Conversation([M("user", "Hi"), M("assistant", "Hello!", "Greet back."),
                                     M("user", "2+2?"), M("assistant", "4", "Simple sum.")], system="Be nice."),
    "reasoning_inline_in_content": Conversation([M("user", "Why?"),
                                                 M("assistant", "<think>\nBecause.\n</think>\n\nBecause.")]),
    "explicit_empty_reasoning": Conversation([M("user", "Capital of France?"), M("assistant", "Paris.", "")]),
    "reasoning_tools": Conversation(
        [M("user", "天气?"), M("function", call("get_weather", city="上海"), "Need the tool."),
         M("observation", '{"temperature": 30}'), M("assistant", "30 度 🌡️", "Read the result.")],
        system="You are a weather bot.", tools=TOOLS),
}


@pytest.fixture(scope="module")
def qwen_tok(qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))


def real(chat_templates_dir, file: str) -> str:
    return (chat_templates_dir / file).read_text(encoding="utf-8")


def jinja_text(tok, chat_template: str, conv: Conversation, *, generation: bool = False, **kwargs) -> str:
    messages, tools = to_hf_messages(conv)
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation,
                                   chat_template=chat_template, **kwargs)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def without_last(conv: Conversation) -> Conversation:
    return replace(conv, messages=conv.messages[:-1])


def without_reasoning(conv: Conversation) -> Conversation:
    msgs = [M(m.role, m.content.split("</think>")[-1].lstrip("\n") if m.role == "assistant" else m.content)
            for m in conv.messages]
    return replace(conv, messages=msgs)


def first_label(labels: list[int]) -> int:
    return next(i for i, x in enumerate(labels) if x != IGNORE)


def check_token_exact(tok, template, chat_template, conv, *, mode=True, jinja_kwargs=None, gen_kwargs=None):
    """input_ids == the real template's tokens; labels start right after its generation prompt."""
    jinja_kwargs = jinja_kwargs or {}
    gen_kwargs = jinja_kwargs if gen_kwargs is None else gen_kwargs
    ref_conv = without_reasoning(conv) if mode is False else conv
    ref = jinja_text(tok, chat_template, ref_conv, **jinja_kwargs)
    assert template.render_text(conv, tok, enable_thinking=mode) == ref
    input_ids, labels = template.encode(conv, tok, cutoff_len=100_000, enable_thinking=mode)
    assert input_ids == ids(tok, ref)
    # the last answer's labels start exactly after the model's own generation prompt
    prompt = jinja_text(tok, chat_template, without_last(ref_conv), generation=True, **jinja_kwargs)
    assert ref.startswith(prompt)
    n_prompt = len(ids(tok, prompt))
    assert input_ids[:n_prompt] == ids(tok, prompt)
    assert labels[n_prompt - 1] == IGNORE and labels[n_prompt] == input_ids[n_prompt]
    assert labels[n_prompt:] == input_ids[n_prompt:]  # the whole last answer, end token and "\n" included
    # prediction prompts: the model's own generation prompt (None = the template's default, thinking)
    gen_prompt = jinja_text(tok, chat_template, without_last(ref_conv), generation=True, **gen_kwargs)
    assert template.encode_prompt(without_last(conv), tok, enable_thinking=mode) == ids(tok, gen_prompt)
    return input_ids, labels


# --- qwen (Qwen2.5) -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(set({**PLAIN, **TOOL_CONVS}) - {"newlines"}))
def test_qwen25_token_exact(qwen_tok, chat_templates_dir, case):
    conv = {**PLAIN, **TOOL_CONVS}[case]
    chat_template = real(chat_templates_dir, "Qwen-Qwen2.5-7B-Instruct.jinja")
    input_ids, labels = check_token_exact(qwen_tok, get_template("qwen"), chat_template, conv)
    answers = [m for m in conv.messages if m.role in ("assistant", "function")]
    assert len(trained_spans(qwen_tok, input_ids, labels)) == len(answers)


def test_answer_starting_with_newline_keeps_the_prompt_a_token_prefix(qwen_tok, chat_templates_dir):
    """Qwen2.5's template writes "assistant\n" + "\nanswer": tokenized whole, the two "\n" merge into one
    token across the end of the generation prompt. loraforge splits that token, so the prompt tokens are the
    ones generation sees; the text is still identical."""
    conv = PLAIN["newlines"]
    t = get_template("qwen")
    chat_template = real(chat_templates_dir, "Qwen-Qwen2.5-7B-Instruct.jinja")
    ref = jinja_text(qwen_tok, chat_template, conv)
    prompt = jinja_text(qwen_tok, chat_template, without_last(conv), generation=True)
    assert t.render_text(conv, qwen_tok) == ref
    input_ids, labels = t.encode(conv, qwen_tok, cutoff_len=4096)
    assert input_ids == ids(qwen_tok, prompt) + ids(qwen_tok, ref[len(prompt):])
    assert input_ids != ids(qwen_tok, ref)  # whole-text tokenization merges "\n\n" (id 271) across the boundary
    assert first_label(labels) == len(ids(qwen_tok, prompt))
    assert qwen_tok.decode(input_ids) == ref


def test_qwen25_default_system_is_written(qwen_tok):
    text = get_template("qwen").render_text(PLAIN["single"], qwen_tok)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                           "assistant.<|im_end|>\n<|im_start|>user\n")


def test_qwen_answers_are_trained_with_end_token_and_newline(qwen_tok):
    conv = PLAIN["multi_turn"]
    input_ids, labels = get_template("qwen").encode(conv, qwen_tok, cutoff_len=4096)
    assert trained_spans(qwen_tok, input_ids, labels) == [
        "2+2 = 4.<|im_end|>\n", "12.<|im_end|>\n", "You're welcome!<|im_end|>\n"]


# --- qwen3 ----------------------------------------------------------------------------------------------------

QWEN3_FILES = ["Qwen-Qwen3-0.6B.jinja", None]  # the fixture file, and the tokenizer's own chat_template


@pytest.mark.parametrize("source", QWEN3_FILES, ids=["jinja-file", "tokenizer-config"])
@pytest.mark.parametrize("mode", [True, False, None], ids=["think", "nothink", "auto"])
@pytest.mark.parametrize("case", sorted({**PLAIN, **TOOL_CONVS, **THINKING}))
def test_qwen3_token_exact(qwen_tok, chat_templates_dir, case, mode, source):
    conv = {**PLAIN, **TOOL_CONVS, **THINKING}[case]
    chat_template = real(chat_templates_dir, source) if source else qwen_tok.chat_template
    final = conv.messages[-1]
    has_block = final.reasoning is not None or "</think>" in final.content
    # the model's own generation prompt for this sample: empty think block in the prompt in no-think mode
    jinja_mode = mode if mode is not None else has_block
    check_token_exact(qwen_tok, get_template("qwen3"), chat_template, conv, mode=mode,
                      jinja_kwargs={"enable_thinking": jinja_mode},
                      gen_kwargs={} if mode is None else {"enable_thinking": mode})


def test_qwen3_labels_of_thinking_modes(qwen_tok):
    t = get_template("qwen3")
    plain, reasoned = PLAIN["single"], THINKING["reasoning_single"]
    spans = lambda conv, mode: trained_spans(qwen_tok, *t.encode(conv, qwen_tok, cutoff_len=4096,  # noqa: E731
                                                                  enable_thinking=mode))
    # enable_thinking true: an empty think block is added to the answer and trained
    assert spans(plain, True) == ["<think>\n\n</think>\n\nI am a helpful assistant.<|im_end|>\n"]
    assert spans(reasoned, True) == ["<think>\n17*3 = 51.\nCheck: 50+1.\n</think>\n\n51.<|im_end|>\n"]
    # false: reasoning removed, the empty block is part of the prompt (not trained)
    assert spans(plain, False) == ["I am a helpful assistant.<|im_end|>\n"]
    assert spans(reasoned, False) == ["51.<|im_end|>\n"]
    assert "Check: 50+1." not in t.render_text(reasoned, qwen_tok, enable_thinking=False)
    # None: samples with reasoning keep it (trained); samples without get the empty block in the prompt
    assert spans(plain, None) == ["I am a helpful assistant.<|im_end|>\n"]
    assert spans(reasoned, None) == spans(reasoned, True)
    assert spans(THINKING["explicit_empty_reasoning"], None) == ["<think>\n\n</think>\n\nParis.<|im_end|>\n"]


def test_qwen3_history_reasoning_dropped_unless_kept(qwen_tok):
    conv = THINKING["reasoning_multi"]
    t = get_template("qwen3")
    spans = trained_spans(qwen_tok, *t.encode(conv, qwen_tok, cutoff_len=4096))
    assert spans == ["Hello!<|im_end|>\n", "<think>\nSimple sum.\n</think>\n\n4<|im_end|>\n"]
    kept = replace(t, keep_reasoning_history=True)
    spans = trained_spans(qwen_tok, *kept.encode(conv, qwen_tok, cutoff_len=4096))
    assert spans == ["<think>\nGreet back.\n</think>\n\nHello!<|im_end|>\n",
                     "<think>\nSimple sum.\n</think>\n\n4<|im_end|>\n"]


def test_qwq_differences_are_the_documented_ones(qwen_tok, chat_templates_dir):
    """QwQ: same text as qwen3 for finished conversations; its generation prompt opens the think block."""
    qwq = real(chat_templates_dir, "Qwen-QwQ-32B.jinja")
    t = get_template("qwen3")
    inline = THINKING["reasoning_inline_in_content"]  # QwQ data carries the think block in the content
    assert jinja_text(qwen_tok, qwq, inline) == t.render_text(inline, qwen_tok)
    multi = replace(THINKING["reasoning_multi"], messages=[
        M(m.role, f"<think>\n{m.reasoning}\n</think>\n\n{m.content}" if m.reasoning else m.content)
        for m in THINKING["reasoning_multi"].messages])
    assert jinja_text(qwen_tok, qwq, multi) == t.render_text(multi, qwen_tok)
    # difference 1: QwQ's generation prompt includes "<think>\n" (and "</think>" unless enable_thinking=True)
    ours = t.render_text(without_last(inline), qwen_tok, for_generation=True)
    assert jinja_text(qwen_tok, qwq, without_last(inline), generation=True, enable_thinking=True) == ours + "<think>\n"
    assert jinja_text(qwen_tok, qwq, without_last(inline), generation=True) == ours + "<think>\n</think>"
    # difference 2: an answer without reasoning gets no empty think block from QwQ
    assert jinja_text(qwen_tok, qwq, PLAIN["single"]) == t.render_text(PLAIN["single"], qwen_tok).replace(
        "<think>\n\n</think>\n\n", "")
    # difference 3: tools without a system prompt: QwQ writes an empty system line first
    conv = TOOL_CONVS["tools_no_system_two_calls"]
    assert jinja_text(qwen_tok, qwq, conv).startswith("<|im_start|>system\n\n\n# Tools")
    assert t.render_text(conv, qwen_tok).startswith("<|im_start|>system\n# Tools")


# --- llama3 / mistral / gemma: text parity, Qwen tokenizer as a stand-in -----------------------------------------

def render_real(chat_template: str, conv: Conversation, *, generation: bool, bos: str, eos: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages, tools = to_hf_messages(conv)
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=chat_template,
                                        add_generation_prompt=generation, bos_token=bos, eos_token=eos)
    return rendered[0]


STAND_IN = {
    "llama3": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", True),
    "mistral": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>", True),
    "gemma": ("google-gemma-2-2b-it.jinja", "<bos>", "<eos>", False),
}
TRIM = {"padded": Conversation([M("user", "  spaced question \n"), M("assistant", "\n spaced answer  ")])}


# Gemma's template has no system role: its system cases are test_gemma_system_goes_into_first_user_turn.
TEXT_CASES = [(name, case) for name in sorted(STAND_IN) for case in sorted({**PLAIN, **TRIM})
              if STAND_IN[name][3] or not {**PLAIN, **TRIM}[case].system]


@pytest.mark.parametrize(("name", "case"), TEXT_CASES)
def test_text_parity_with_real_templates(qwen_tok, chat_templates_dir, name, case):
    file, bos, eos, _ = STAND_IN[name]
    conv = {**PLAIN, **TRIM}[case]
    chat_template = real(chat_templates_dir, file)
    t = get_template(name)
    prompt = render_real(chat_template, without_last(conv), generation=True, bos=bos, eos=eos)
    assert t.render_text(without_last(conv), qwen_tok, for_generation=True) == prompt
    full = render_real(chat_template, conv, generation=False, bos=bos, eos=eos)
    ours = t.render_text(conv, qwen_tok)
    if name == "mistral" and conv.system:
        # Mistral's template writes the system prompt only when the last message is the user's (i.e. when
        # prompting); training keeps it where generation will see it
        assert ours == prompt + conv.messages[-1].content + "</s>"
    else:
        assert ours == full
    # tokens (Qwen tokenizer as a stand-in) and the label start
    input_ids, labels = t.encode(conv, qwen_tok, cutoff_len=100_000)
    assert qwen_tok.decode(input_ids) == ours
    leading_space = any(m.content[:1].isspace() for m in conv.messages if m.role == "assistant")
    if t.spec.strip_content or not leading_space:
        # (else "[/INST]" + "\n" is one Qwen token, split at the prompt's end: see the newline test above)
        assert input_ids == ids(qwen_tok, ours)
    n_prompt = len(ids(qwen_tok, prompt))
    assert input_ids[:n_prompt] == ids(qwen_tok, prompt)
    assert labels[n_prompt - 1] == IGNORE and labels[n_prompt:] == input_ids[n_prompt:]


def test_gemma_system_goes_into_first_user_turn(qwen_tok, chat_templates_dir):
    conv = PLAIN["system"]
    text = get_template("gemma").render_text(conv, qwen_tok)
    assert text == ("<bos><start_of_turn>user\nYou are a terse assistant.\n\nSay hi.<end_of_turn>\n"
                    "<start_of_turn>model\nHi!<end_of_turn>\n")
    with pytest.raises(Exception, match="System role not supported"):
        render_real(real(chat_templates_dir, "google-gemma-2-2b-it.jinja"), conv, generation=False,
                    bos="<bos>", eos="<eos>")


def test_llama3_stop_words(qwen_tok):
    t = get_template("llama3")
    assert t.spec.stop_words == ("<|eot_id|>", "<|eom_id|>")
    # the Qwen stand-in knows neither word: only its EOS is a stop token
    assert t.stop_token_ids(qwen_tok) == [qwen_tok.eos_token_id]
