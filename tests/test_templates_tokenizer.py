"""The `tokenizer` template kind against the real chat templates in ../shared/fixtures/chat_templates.

Proofs, for every fixture (Qwen2.5, Qwen3, QwQ, Llama 3.1, Mistral Nemo, Gemma 2, SmolLM3):
* input_ids are ``tokenizer(apply_chat_template(messages))`` token for token, and prediction prompts are
  ``apply_chat_template(..., add_generation_prompt=True)``;
* the last answer's labels start exactly after the model's own generation prompt and run to the end;
* where a named template renders the same text (qwen, qwen3, llama3, mistral and gemma without a system prompt),
  (input_ids, labels) equal the named template's for every masking option (train_on_prompt, mask_history,
  enable_thinking true/false/null, truncation), and the named templates are proven token-exact in
  test_templates_parity.py;
* QwQ and SmolLM3, which no named template renders, are checked span by span.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import replace

import pytest

from loraforge.config.data import DataArguments
from loraforge.data.conversation import Conversation, Message
from loraforge.data.template_tokenizer import TokenizerTemplate, tokenizer_template
from loraforge.data.templates import get_template, resolve_template
from loraforge.errors import TemplateError
from token_spans import spans

IGNORE = -100
TOOLS = json.dumps([{"name": "get_weather", "description": "Get the weather of a city.",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]}}])


def M(role: str, content: str, reasoning: str | None = None) -> Message:  # noqa: N802 - short test helper
    return Message(role, content, reasoning=reasoning)


def call(name: str, **arguments) -> str:
    return json.dumps([{"name": name, "arguments": arguments}], ensure_ascii=False)


PLAIN = {
    "single": Conversation([M("user", "Hello! Who are you?"), M("assistant", "I am a helpful assistant.")]),
    "multi_turn": Conversation([M("user", "What is 2+2?"), M("assistant", "2+2 = 4."),
                                M("user", "And times 3?"), M("assistant", "12."),
                                M("user", "Thanks"), M("assistant", "You're welcome! 😀")]),
    "chinese": Conversation([M("user", "请用一句话介绍北京。"), M("assistant", "北京是中国的首都。")]),
    "spaces": Conversation([M("user", "  padded question  "), M("assistant", " padded answer \n")]),
}
SYSTEM = {
    "system": Conversation([M("user", "Say hi."), M("assistant", "Hi!")], system="You are a terse assistant."),
    "system_multi": Conversation([M("user", "Hi"), M("assistant", "Hello!"), M("user", "See you"), M("assistant", "Bye!")],
                                 system="Be nice."),
}
TOOL = {
    "tool_call": Conversation([M("user", "Weather in Paris?"), M("function", call("get_weather", city="Paris")),
                               M("observation", '{"temperature": 21}'), M("assistant", "It is 21 degrees.")],
                              tools=TOOLS),
    "tool_call_multi": Conversation([M("user", "Hi"), M("assistant", "Hello!"), M("user", "Weather in Rome?"),
                                     M("function", call("get_weather", city="Rome")),
                                     M("observation", '{"temperature": 25}'), M("assistant", "25 degrees.")],
                                    system="You are a weather bot.", tools=TOOLS),
}
REASONING = {
    "reasoning": Conversation([M("user", "What is 17*3?"), M("assistant", "51.", "17*3 = 51.")]),
    "reasoning_multi": Conversation([M("user", "Hi"), M("assistant", "Hello!", "Greet back."),
                                     M("user", "2+2?"), M("assistant", "4", "Simple sum.")]),
    "reasoning_inline": Conversation([M("user", "Why?"), M("assistant", "<think>\nBecause.\n</think>\n\nBecause.")]),
}
ALL = {**PLAIN, **SYSTEM, **TOOL, **REASONING}
FILES = {
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", {}),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", {}),
    "qwq": ("Qwen-QwQ-32B.jinja", {}),
    "smollm3": ("HuggingFaceTB-SmolLM3-3B.jinja", {}),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja",
                 {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"]}),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja",
                     {"bos_token": "<s>", "eos_token": "</s>",
                      "additional_special_tokens": ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                                    "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]}),
    "gemma2": ("google-gemma-2-2b-it.jinja", {"bos_token": "<bos>", "eos_token": "<eos>",
                                              "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}),
}
# What each real template cannot render (it raises, or is not prefix-stable for it): expected to be refused.
REFUSED = {
    "qwen2.5": set(), "qwen3": set(), "qwq": set(),
    "smollm3": {"tool_call", "tool_call_multi"},  # the template has no tool format: it would drop the calls
    "llama3.1": set(),
    "mistral-nemo": {"system", "system_multi", "tool_call_multi"},  # system prompt / tools join the last user turn
    "gemma2": {"system", "system_multi", "tool_call", "tool_call_multi"},  # no system role, no tool role
}
# The named template that renders the same text, and the conversations it renders identically.
NAMED = {"qwen2.5": ("qwen", set(PLAIN) | set(SYSTEM) | set(TOOL)), "qwen3": ("qwen3", set(ALL)),
         "llama3.1": ("llama3", set(PLAIN) | set(SYSTEM)), "mistral-nemo": ("mistral", set(PLAIN)),
         "gemma2": ("gemma", set(PLAIN))}


@pytest.fixture(scope="module")
def toks(qwen3_tokenizer_dir, chat_templates_dir):
    """One Qwen3 tokenizer per fixture, carrying that model's chat template and its special tokens (BOS, EOS, turn
    markers: special in the real tokenizers too, so no token spans them)."""
    from transformers import AutoTokenizer

    out = {}
    for family, (file, special) in FILES.items():
        tok = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
        if special:
            tok.add_special_tokens(special)
        tok.chat_template = (chat_templates_dir / file).read_text(encoding="utf-8")
        out[family] = tok
    return out


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def reference(tok, template: TokenizerTemplate, conv: Conversation, mode, *, generation=False) -> str:
    messages, tools, extra = template.hf_messages(conv, enable_thinking=mode)
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation, **extra)


@pytest.mark.parametrize("mode", [True, False, None], ids=["think", "nothink", "auto"])
@pytest.mark.parametrize("case", sorted(ALL))
@pytest.mark.parametrize("family", sorted(FILES))
def test_token_exact_and_last_answer_labelled_after_the_generation_prompt(toks, family, case, mode):
    tok, conv = toks[family], ALL[case]
    template = tokenizer_template(tok)
    if case in REFUSED[family]:
        with pytest.raises(TemplateError):
            template.encode(conv, tok, cutoff_len=100_000, enable_thinking=mode)
        return
    text = reference(tok, template, conv, mode)
    input_ids, labels = template.encode(conv, tok, cutoff_len=100_000, enable_thinking=mode)
    assert input_ids == ids(tok, text)
    assert template.render_text(conv, tok, enable_thinking=mode) == text
    # the prompt of the last answer: the model's own generation prompt, as far as the finished text shares it
    prompt_conv = replace(conv, messages=conv.messages[:-1])
    thinking = template._thinking(conv, mode)
    gen = reference(tok, template, prompt_conv, thinking, generation=True)
    shared = next((i for i, (a, b) in enumerate(zip(gen, text)) if a != b), min(len(gen), len(text)))
    n_prompt = len(ids(tok, text[:shared]))
    assert all(x == IGNORE for x in labels[n_prompt - 1:n_prompt])
    assert labels[n_prompt:] == input_ids[n_prompt:]
    # prediction prompts are the model's own generation prompt
    gen_default = reference(tok, template, prompt_conv, True if mode is None else mode, generation=True)
    assert template.encode_prompt(prompt_conv, tok, enable_thinking=mode) == ids(tok, gen_default)
    # every answer is trained, every prompt is not: the trained text holds each answer's words
    trained = "".join(spans(tok, input_ids, labels))
    for msg in conv.messages:
        words = msg.content.split("</think>")[-1].strip()
        if msg.role == "assistant" and words:
            assert words in trained
        elif msg.role == "user":
            assert msg.content.strip() not in trained


OPTIONS = [dict(), dict(train_on_prompt=True), dict(mask_history=True), dict(enable_thinking=False),
           dict(enable_thinking=None), dict(mask_history=True, enable_thinking=False), dict(cutoff_len=24),
           dict(cutoff_len=24, mask_history=True)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("family", sorted(NAMED))
def test_same_ids_and_labels_as_the_named_template(toks, family, options):
    tok = toks[family]
    name, cases = NAMED[family]
    named, ours = get_template(name), tokenizer_template(tok)
    options = {"cutoff_len": 100_000, **options}
    compared = 0
    for case in sorted(cases):
        conv = ALL[case]
        mode = options.get("enable_thinking", True)
        if named.render_text(conv, tok, enable_thinking=mode) != ours.render_text(conv, tok, enable_thinking=mode):
            continue  # e.g. qwen3 with thinking off and reasoning in the data: the real template keeps it
        assert ours.encode(conv, tok, **options) == named.encode(conv, tok, **options), case
        compared += 1
    assert compared >= len(cases) // 2


def test_qwq_spans(toks):
    tok = toks["qwq"]
    template = tokenizer_template(tok)
    conv = REASONING["reasoning_multi"]
    input_ids, labels = template.encode(conv, tok, cutoff_len=100_000)
    # history answers lose their reasoning in the real template; the last one keeps it after the opening
    # <think>\n that QwQ's generation prompt writes
    assert spans(tok, input_ids, labels) == ["Hello!<|im_end|>\n", "Simple sum.\n</think>\n\n4<|im_end|>\n"]
    assert tok.decode(template.encode_prompt(replace(conv, messages=conv.messages[:1]), tok)).endswith(
        "<|im_start|>assistant\n<think>\n")


@pytest.mark.parametrize("mode", [True, False])
def test_smollm3_spans(toks, mode):
    tok = toks["smollm3"]
    template = tokenizer_template(tok)
    assert template.supports_thinking
    input_ids, labels = template.encode(REASONING["reasoning"], tok, cutoff_len=100_000, enable_thinking=mode)
    text = tok.decode(input_ids)
    if mode:  # SmolLM3 has no reasoning field: the reasoning is written inline, and trained
        assert "Reasoning Mode: /think" in text
        assert spans(tok, input_ids, labels) == ["<think>\n17*3 = 51.\n</think>\n\n51.<|im_end|>\n"]
    else:  # thinking off: reasoning dropped, the empty think block is the model's generation prompt (not trained)
        assert "Reasoning Mode: /no_think" in text
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n51.<|im_end|>\n")
        assert spans(tok, input_ids, labels) == ["51.<|im_end|>\n"]


def test_qwen3_history_and_thinking_spans(toks):
    tok = toks["qwen3"]
    template = tokenizer_template(tok)
    conv = REASONING["reasoning_multi"]
    on = spans(tok, *template.encode(conv, tok, cutoff_len=100_000))
    assert on == ["Hello!<|im_end|>\n", "<think>\nSimple sum.\n</think>\n\n4<|im_end|>\n"]
    off = spans(tok, *template.encode(conv, tok, cutoff_len=100_000, enable_thinking=False))
    assert off == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]


def test_refusals_name_the_sample_and_the_fix(toks):
    mistral, gemma = toks["mistral-nemo"], toks["gemma2"]
    conv = replace(SYSTEM["system_multi"], source="data.json:row 3")
    with pytest.raises(TemplateError, match="data.json:row 3: the model's chat template is not prefix-stable") as info:
        tokenizer_template(mistral).encode(conv, mistral, cutoff_len=1000)
    assert "set `template:`" in str(info.value)
    with pytest.raises(TemplateError, match="refused this conversation: System role not supported"):
        tokenizer_template(gemma).encode(conv, gemma, cutoff_len=1000)


def test_llama31_tool_call(toks):
    tok = toks["llama3.1"]
    template = tokenizer_template(tok)
    input_ids, labels = template.encode(TOOL["tool_call"], tok, cutoff_len=100_000)
    trained = spans(tok, input_ids, labels)
    assert trained[0] == '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
    assert trained[1] == "It is 21 degrees.<|eot_id|>"


def test_template_unset_picks_named_else_tokenizer_and_says_so(toks, caplog):
    with caplog.at_level(logging.INFO, logger="loraforge.data"):
        assert resolve_template(DataArguments(), toks["qwen3"]).name == "qwen3"
        for family in ("qwq", "smollm3"):
            caplog.clear()
            chosen = resolve_template(DataArguments(), toks[family])
            assert isinstance(chosen, TokenizerTemplate)
            assert "using the model's own chat template (`template: tokenizer`)" in caplog.text
            assert "loraforge data preview" in caplog.text


def test_explicit_tokenizer_and_llamafactory_names(toks, caplog):
    tok = toks["gemma2"]
    with caplog.at_level(logging.WARNING):
        chosen = resolve_template(DataArguments(template="tokenizer", default_system=None), tok)
    assert isinstance(chosen, TokenizerTemplate)
    assert "cannot train a conversation with a system prompt" in caplog.text  # Gemma 2 has no system role
    assert resolve_template(DataArguments(template="gemma2"), tok).name == "gemma"
    assert resolve_template(DataArguments(template="ministral"), toks["mistral-nemo"]).name == "mistral"
    assert isinstance(resolve_template(DataArguments(template="qwq"), toks["qwq"]), TokenizerTemplate)
    assert isinstance(resolve_template(DataArguments(template="smollm3"), toks["smollm3"]), TokenizerTemplate)


def test_config_accepts_the_new_names():
    from loraforge.config import load_config
    from loraforge.data.templates import known_template_names
    from loraforge.errors import ConfigError

    names = known_template_names()  # what every command passes to config validation
    for name in ("tokenizer", "gemma2", "ministral", "smollm3", "qwq"):
        cfg = load_config({"model_name_or_path": "tiny-random-qwen3", "template": name}, purpose="chat",
                          build_training_args=False, template_names=names)
        assert cfg.data.template == name
    with pytest.raises(ConfigError, match="unknown `template: tokenzier`; did you mean tokenizer"):
        load_config({"model_name_or_path": "tiny-random-qwen3", "template": "tokenzier"}, purpose="chat",
                    build_training_args=False, template_names=names)


def test_no_chat_template_is_a_clear_error(toks):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toks["qwen3"].name_or_path)
    tok.chat_template = None
    with pytest.raises(TemplateError, match="needs a tokenizer with a chat template"):
        resolve_template(DataArguments(template="tokenizer"), tok)


def test_default_system_stop_tokens_pickling_and_saved_tokenizer(toks, tmp_path):
    tok = toks["qwen2.5"]
    template = resolve_template(DataArguments(template="tokenizer", default_system="Be brief."), tok)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in template.render_text(PLAIN["single"], tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in template.stop_token_ids(tok)
    assert pickle.loads(pickle.dumps(template)) == template  # data workers receive it by pickling
    template.apply_to_tokenizer(tok)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path)).chat_template == template.chat_template


def test_reasoning_split_of_generated_text(toks):
    template = tokenizer_template(toks["qwen3"])
    assert template.split_reasoning("<think>\nhmm\n</think>\n\nyes") == ("hmm", "yes")
    assert template.split_reasoning("plain") == (None, "plain")


# A ChatML template with HF's {% generation %} marks; UNSTABLE also tags whichever user message is last, so
# prefixes of a conversation render differently from the whole (as Mistral's system prompt does).
MARKED = ("{%- for m in messages %}{%- if m.role == 'user' %}{{ '<|im_start|>user\\n' + m.content + TAG + "
          "'<|im_end|>\\n' }}{%- elif m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
          "{{ m.content + '<|im_end|>\\n' }}{% endgeneration %}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.mark.parametrize("options", OPTIONS[:3] + OPTIONS[-2:], ids=lambda o: ",".join(o) or "default")
def test_generation_marks_give_the_same_spans_as_prefixes(toks, options):
    tok = toks["qwen2.5"]
    marked = TokenizerTemplate(MARKED.replace("TAG", "''"))
    plain = TokenizerTemplate(marked.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    options = {"cutoff_len": 100_000, **options}
    for case in ("single", "multi_turn", "chinese"):
        assert marked.encode(ALL[case], tok, **options) == plain.encode(ALL[case], tok, **options)


def test_generation_marks_train_a_template_that_is_not_prefix_stable(toks):
    tok = toks["qwen2.5"]
    source = MARKED.replace("TAG", "(' [last]' if loop.last else '')")
    conv = PLAIN["multi_turn"]
    input_ids, labels = TokenizerTemplate(source).encode(conv, tok, cutoff_len=100_000)
    messages, _, _ = TokenizerTemplate(source).hf_messages(conv)
    assert input_ids == ids(tok, tok.apply_chat_template(messages, tokenize=False, chat_template=source))
    assert spans(tok, input_ids, labels) == ["2+2 = 4.<|im_end|>\n", "12.<|im_end|>\n",
                                             "You're welcome! 😀<|im_end|>\n"]
    unmarked = source.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    conv_with_tag = Conversation(conv.messages[:3] + [M("assistant", "12.")])
    with pytest.raises(TemplateError, match="not prefix-stable"):
        TokenizerTemplate(unmarked).encode(conv_with_tag, tok, cutoff_len=100_000)
