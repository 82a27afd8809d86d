"""The tiny-random-qwen3 tokenizer, rebuilt offline from qwen.tiktoken, equals the official Qwen3 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done it, don't you think? IT'S LOUD.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "日本語のテキスト：ひらがな、カタカナ、漢字を含みます。",
    "안녕하세요, 세계! 한국어 문장입니다.",
    "مرحبا بالعالم، هذه جملة عربية.",
    "Emoji 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\t// tab",
    "3.14159 2,718,281 1e-10 0x1F 2024-06-07 12:30:45 +49 (0)30 123456",
    "spaces:     five   three \n\n\n  newlines\r\n  and\t\ttabs   ",
    "   leading and trailing   ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nreasoning here\n</think>\n\nanswer <tool_call>{\"name\": \"f\"}</tool_call><|endoftext|>",
    "Ünïcödé çàfé naïve — “quotes” … ½ ≠ ∞ ₿",
    "Cafe\u0301 vs Café (NFC normalisation)",
]


@pytest.fixture(scope="module")
def official(qwen3_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))


@pytest.fixture(scope="module")
def rebuilt(tiny_qwen3_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen3_path))


def test_vocab_and_merges_are_the_official_files(qwen3_tokenizer_dir: Path, tiny_qwen3_path: Path):
    ours = json.loads((tiny_qwen3_path / "vocab.json").read_text(encoding="utf-8"))
    theirs = json.loads((qwen3_tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(ours) == 151643
    assert ours == theirs
    our_merges = (tiny_qwen3_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    their_merges = (qwen3_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(our_merges) == len(their_merges) == 151388
    assert our_merges == their_merges


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_same_ids_on_multilingual_text(official, rebuilt, text: str):
    ids = rebuilt(text)["input_ids"]
    assert ids == official(text)["input_ids"]
    assert rebuilt.decode(ids) == official.decode(ids)


def test_whole_text_set_at_once(official, rebuilt):
    joined = "\n".join(TEXTS)
    assert rebuilt(joined)["input_ids"] == official(joined)["input_ids"]
    assert rebuilt(TEXTS)["input_ids"] == official(TEXTS)["input_ids"]


def test_added_tokens_special_tokens_and_ids(official, rebuilt):
    assert len(rebuilt) == len(official) == 151669
    ours = {i: (t.content, t.special) for i, t in rebuilt.added_tokens_decoder.items()}
    theirs = {i: (t.content, t.special) for i, t in official.added_tokens_decoder.items()}
    assert ours == theirs
    assert sorted(ours) == list(range(151643, 151669))
    assert ours[151667] == ("<think>", False) and ours[151645] == ("<|im_end|>", True)
    for ours_tok, theirs_tok, expected in ((rebuilt.eos_token, official.eos_token, "<|im_end|>"),
                                           (rebuilt.pad_token, official.pad_token, "<|endoftext|>")):
        assert ours_tok == theirs_tok == expected
    assert (rebuilt.eos_token_id, rebuilt.pad_token_id) == (official.eos_token_id, official.pad_token_id)
    assert (rebuilt.eos_token_id, rebuilt.pad_token_id) == (151645, 151643)
    assert rebuilt.bos_token is None and official.bos_token is None
    assert rebuilt.all_special_tokens == official.all_special_tokens
    assert rebuilt.model_max_length == official.model_max_length == 131072


def test_special_tokens_are_never_split_and_skip_on_decode(rebuilt):
    ids = rebuilt("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == 151644 and ids[-1] == 151645
    assert rebuilt.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_is_qwen3s(official, rebuilt):
    assert rebuilt.chat_template == official.chat_template
    convo = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    tools = [{"type": "function", "function": {"name": "add", "description": "add numbers",
                                                "parameters": {"type": "object", "properties": {}}}}]
    for kwargs in ({}, {"enable_thinking": False}, {"tools": tools}):
        ours = rebuilt.apply_chat_template(convo, tokenize=False, add_generation_prompt=True, **kwargs)
        assert ours == official.apply_chat_template(convo, tokenize=False, add_generation_prompt=True, **kwargs)
    rendered = rebuilt.apply_chat_template(convo, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tokenizer_config_matches_official_keys(qwen3_tokenizer_dir: Path, tiny_qwen3_path: Path):
    ours = json.loads((tiny_qwen3_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    theirs = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert ours == theirs
