"""Hermetic helpers for the data tests: a character-level tokenizer, a ChatML-like template with the
`Template.encode` signature, and writers for small dataset folders. (No tests here.)"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.data.conversation import Conversation
from loraforge.errors import TemplateError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer():
    """A fast tokenizer with one token per character (ASCII + a few CJK/emoji) and ChatML special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"] + list("你好世界中文😀")
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["<unk>"] + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return tok


class FakeChatML:
    """ChatML rendering with the `Template.encode` contract (prompt tokens -100; simple right truncation)."""

    name = "fake_chatml"

    def __init__(self, refuse_role: str | None = None):
        self.refuse_role = refuse_role

    def _ids(self, tokenizer, text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def encode(self, conv: Conversation, tokenizer, *, cutoff_len: int, train_on_prompt: bool = False,
               mask_history: bool = False, enable_thinking: bool | None = True) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        if conv.system:
            part = self._ids(tokenizer, f"<|im_start|>system\n{conv.system}<|im_end|>\n")
            ids += part
            labels += part if train_on_prompt else [-100] * len(part)
        turns = conv.turns()
        for k, (prompt, answer) in enumerate(turns):
            if self.refuse_role and any(m is not None and m.role == self.refuse_role for m in (prompt, answer)):
                raise TemplateError(f"the fake template cannot render a {self.refuse_role} turn")
            role = "user" if prompt.role == "user" else "tool"
            p = self._ids(tokenizer, f"<|im_start|>{role}\n{prompt.content}<|im_end|>\n<|im_start|>assistant\n")
            ids += p
            labels += p if train_on_prompt else [-100] * len(p)
            if answer is not None:
                a = self._ids(tokenizer, f"{answer.content}<|im_end|>\n")
                ids += a
                trained = not mask_history or k == len(turns) - 1
                labels += a if trained else [-100] * len(a)
        return ids[:cutoff_len], labels[:cutoff_len]

    def to_jinja(self) -> str:
        return "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def write_json(path: Path, rows, *, lines: bool = False) -> Path:
    """Write rows as a JSON array (or JSON Lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if lines:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_info(folder: Path, info: dict) -> Path:
    """Write dataset_info.json in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset_info.json"
    path.write_text(json.dumps(info, indent=1), encoding="utf-8")
    return path


def alpaca_rows(n: int, start: int = 0) -> list[dict]:
    """``n`` distinct alpaca rows."""
    return [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"numbers {i}",
             "output": f"The sum is {2 * i + 1}."} for i in range(start, start + n)]


def sharegpt_rows(n: int, start: int = 0) -> list[dict]:
    """``n`` distinct two-turn sharegpt rows with a system prompt."""
    return [{"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"Hello {i}!"},
                               {"from": "human", "value": "Bye"}, {"from": "gpt", "value": f"Bye {i}."}],
             "system": "Be brief."} for i in range(start, start + n)]
