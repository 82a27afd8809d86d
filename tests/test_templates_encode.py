"""Rendering into input_ids/labels: masks, train_on_prompt, mask_history, truncation, EOS, stop tokens, errors.

Hermetic: a byte-level tokenizer (one token per byte, plus the chat special tokens) built in memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from loraforge.data.conversation import Conversation, Message
from loraforge.data.template_encode import TurnIds, build_example, share_budget
from loraforge.data.templates import get_template
from loraforge.errors import TemplateError
from token_spans import spans

IGNORE = -100
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<s>", "</s>"]


def byte_tokenizer(**special):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    model = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=model, additional_special_tokens=SPECIALS,
                                   **{"eos_token": "<|endoftext|>", **special})


@pytest.fixture()
def tok():
    return byte_tokenizer()


def conv(*pairs: str, system: str | None = None) -> Conversation:
    roles = ["user", "assistant"]
    return Conversation([Message(roles[i % 2], text) for i, text in enumerate(pairs)], system=system,
                        source="data.json:row 7")


def test_every_answer_trained_prompts_masked(tok):
    t = get_template("chatml")
    c = conv("Hi", "Hello!", "How are you?", "Fine, thanks.", system="Be kind.")
    input_ids, labels = t.encode(c, tok, cutoff_len=1024)
    assert tok.decode(input_ids) == t.render_text(c, tok)
    assert spans(tok, input_ids, labels) == ["Hello!<|im_end|>\n", "Fine, thanks.<|im_end|>\n"]
    first_prompt = t.render(c, tok)[0].prompt
    assert first_prompt == ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                            "<|im_start|>assistant\n")
    n = len(tok(first_prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n] == [IGNORE] * n and labels[n] == input_ids[n]


def test_train_on_prompt_and_mask_history(tok):
    t = get_template("qwen")
    c = conv("a", "b", "c", "d")
    ids_all, labels_all = t.encode(c, tok, cutoff_len=1024, train_on_prompt=True)
    assert labels_all == ids_all
    ids_last, labels_last = t.encode(c, tok, cutoff_len=1024, mask_history=True)
    assert ids_last == ids_all
    assert spans(tok, ids_last, labels_last) == ["d<|im_end|>\n"]
    ids_both, labels_both = t.encode(c, tok, cutoff_len=1024, mask_history=True, train_on_prompt=True)
    # history answers are masked, prompts are trained
    assert "b<|im_end|>" not in "".join(spans(tok, ids_both, labels_both))
    assert spans(tok, ids_both, labels_both)[-1].endswith("<|im_start|>assistant\nd<|im_end|>\n")


def test_share_budget_shortens_the_longer_side_first():
    assert share_budget(100, 10, 50) == (40, 10)  # short answer kept whole
    assert share_budget(10, 100, 50) == (10, 40)  # short prompt kept whole
    assert share_budget(60, 40, 50) == (30, 20)  # both long: in proportion
    assert share_budget(5, 5, 50) == (5, 5)
    assert share_budget(5, 5, 0) == (0, 0)


def test_truncation_keeps_turns_in_order(tok):
    t = get_template("chatml")
    c = conv("q" * 40, "a" * 40, "Q" * 40, "A" * 40)
    full_ids, _ = t.encode(c, tok, cutoff_len=10_000)
    input_ids, labels = t.encode(c, tok, cutoff_len=100)
    assert len(input_ids) == 100 and len(labels) == 100
    text = tok.decode(input_ids)
    # turn 1's question is shortened, but its end of turn and generation prompt stay; turn 2 does not fit
    assert text == "<|im_start|>user\n" + "q" * 39 + "<|im_end|>\n<|im_start|>assistant\n" + "a" * 40 + "<|im_end|>\n"
    # mask_history spends the budget on the last turn first and trains only it
    input_ids, labels = t.encode(c, tok, cutoff_len=100, mask_history=True)
    assert len(input_ids) == 100
    assert spans(tok, input_ids, labels) == ["A" * 40 + "<|im_end|>\n"]
    assert tok.decode(input_ids) == ("<|im_start|>user\n" + "Q" * 39 + "<|im_end|>\n<|im_start|>assistant\n"
                                     + "A" * 40 + "<|im_end|>\n")  # the first turn no longer fits
    input_ids, labels = t.encode(c, tok, cutoff_len=160, mask_history=True)
    assert tok.decode(input_ids).startswith("<|im_start|>user\nqqq")  # earlier turn kept in front, shortened
    assert tok.decode(input_ids).count("<|im_start|>assistant\n") == 2
    assert len(full_ids) > 100


def test_build_example_drops_turns_past_the_budget():
    turns = [TurnIds([1, 2], [3]), TurnIds([4, 5], [6]), TurnIds([7], [8])]
    assert build_example(turns, cutoff_len=6) == ([1, 2, 3, 4, 5, 6], [IGNORE, IGNORE, 3, IGNORE, IGNORE, 6])
    assert build_example(turns, cutoff_len=2, mask_history=True) == ([7, 8], [IGNORE, 8])
    # a shortened prompt keeps its tail (end of turn + generation prompt)
    long = [TurnIds(list(range(10, 30)), [1, 2], tail=3)]
    assert build_example(long, cutoff_len=7)[0] == [10, 11, 27, 28, 29, 1, 2]


@pytest.mark.parametrize("name,answer", [
    ("alpaca", "Sure.<|endoftext|>\n\n"), ("default", "Sure.<|endoftext|>\n"), ("empty", "Sure."),
    ("chatml", "Sure.<|im_end|>\n"), ("gemma", "Sure.<end_of_turn>\n"), ("llama3", "Sure.<|eot_id|>"),
    ("mistral", "Sure.</s>"), ("smollm2", "Sure.<|im_end|>\n")])
def test_answer_end_tokens_are_trained(tok, name, answer):
    input_ids, labels = get_template(name).encode(conv("Do it", "Sure."), tok, cutoff_len=1024)
    assert spans(tok, input_ids, labels) == [answer]


def test_alpaca_and_default_layout(tok):
    text = get_template("alpaca").render_text(conv("Add 1+1", "2"), tok)
    assert text == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n### Instruction:\nAdd 1+1\n\n### Response:\n2<|endoftext|>\n\n")
    text = get_template("default").render_text(conv("Hi", "Yo"), tok)
    assert text == "Human: Hi<|endoftext|>\nAssistant:Yo<|endoftext|>\n"


def test_default_system_override(tok):
    t = replace(get_template("qwen"), default_system="Custom.")
    assert t.render_text(conv("a", "b"), tok).startswith("<|im_start|>system\nCustom.<|im_end|>\n")
    assert t.render_text(conv("a", "b", system="Own."), tok).startswith("<|im_start|>system\nOwn.<|im_end|>\n")


def test_stop_tokens_and_apply_to_tokenizer(tok, caplog):
    t = get_template("chatml")
    assert t.apply_to_tokenizer(tok) == 0
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    im_end, im_start = tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    assert t.stop_token_ids(tok) == [im_end, im_start]
    assert tok.chat_template == t.to_jinja()
    # a stop word the vocabulary lacks is added, and the caller is told to resize the embeddings
    other = byte_tokenizer()
    with caplog.at_level(logging.WARNING):
        assert get_template("llama3").apply_to_tokenizer(other) == 1
    assert other.eos_token == "<|eot_id|>" and "resize" in caplog.text


def test_slow_tokenizer_fallback_matches_fast(tok):
    class Slow:
        is_fast = False
        bos_token, eos_token = None, tok.eos_token

        def encode(self, text, add_special_tokens=False):
            return tok(text, add_special_tokens=False)["input_ids"]

    c = conv("Hi 😀", "Hé!", "more", "ok", system="sys")
    t = get_template("qwen3")
    assert t.encode(c, Slow(), cutoff_len=512) == t.encode(c, tok, cutoff_len=512)


def test_encode_batch_equals_encode(tok):
    t = get_template("qwen3")
    convs = [conv("a", "b"), conv("x" * 30, "y" * 30, "z", "w"), conv("q", "r", system="s")]
    assert t.encode_batch(convs, tok, cutoff_len=40) == [t.encode(c, tok, cutoff_len=40) for c in convs]


def test_split_reasoning():
    t = get_template("qwen3")
    assert t.split_reasoning("<think>\nabc\n</think>\n\nanswer") == ("abc", "answer")
    assert t.split_reasoning("<think>\n\n</think>\n\nanswer") == ("", "answer")
    assert t.split_reasoning("abc\n</think>\n\nanswer") == ("abc", "answer")  # opening tag in the prompt (QwQ)
    assert t.split_reasoning("<think>\nstill thinking") == ("still thinking", "")
    assert t.split_reasoning("just an answer") == (None, "just an answer")
    assert t.thought_words == ("<think>", "</think>") and t.supports_thinking
    assert not get_template("qwen").supports_thinking


def test_reasoning_inline_for_non_thinking_templates(tok):
    c = Conversation([Message("user", "q"), Message("assistant", "a", reasoning="r")])
    assert get_template("chatml").render_text(c, tok).endswith(
        "<|im_start|>assistant\n<think>\nr\n</think>\n\na<|im_end|>\n")


@pytest.mark.parametrize("messages,match", [
    ([("assistant", "x")], "message 0 has role `assistant`"),
    ([("user", "x"), ("user", "y")], "message 1 has role `user`"),
    ([("user", "x")], "must end with an assistant"),
    ([], "no messages"),
])
def test_bad_conversations_name_the_row(tok, messages, match):
    c = Conversation([Message(r, x) for r, x in messages], source="data.json:row 7")
    with pytest.raises(TemplateError, match=match) as info:
        get_template("qwen").encode(c, tok, cutoff_len=64)
    assert "data.json:row 7" in str(info.value)


def test_tool_errors(tok):
    fn = Conversation([Message("user", "x"), Message("function", '[{"name": "f", "arguments": {}}]')],
                      source="t.json:row 1")
    with pytest.raises(TemplateError, match="has no tool format"):
        get_template("chatml").encode(fn, tok, cutoff_len=64)
    bad_call = replace(fn, messages=[Message("user", "x"), Message("function", "not json")])
    with pytest.raises(TemplateError, match="must be JSON"):
        get_template("qwen").encode(bad_call, tok, cutoff_len=64)
    bad_tools = replace(fn, tools="[{oops")
    with pytest.raises(TemplateError, match="`tools` is not valid JSON"):
        get_template("qwen").encode(bad_tools, tok, cutoff_len=64)
    with pytest.raises(TemplateError, match="must end with a user or observation"):
        get_template("qwen").encode_prompt(fn, tok)


def test_tool_call_arguments_given_as_json_string(tok):
    as_text = Conversation([Message("user", "x"), Message(
        "function", json.dumps([{"name": "f", "arguments": json.dumps({"a": "é"})}]))], tools='[{"name": "f"}]')
    as_obj = replace(as_text, messages=[Message("user", "x"), Message("function", '[{"name": "f", "arguments": '
                                                                                 '{"a": "é"}}]')])
    t = get_template("qwen3")
    assert t.render_text(as_text, tok) == t.render_text(as_obj, tok)
    assert '<tool_call>\n{"name": "f", "arguments": {"a": "é"}}\n</tool_call><|im_end|>\n' in t.render_text(as_obj, tok)
