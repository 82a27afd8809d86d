"""The tokenizer part of a GGUF file: byte-level BPE vocab and merges, token types, special ids, chat template.

llama.cpp re-implements tokenization, so the GGUF must also name the *pre-tokenizer* (how text is split before
BPE). Rather than guess it from the model name, :func:`detect_pre_tokenizer` replays each of llama.cpp's
candidate split rules on a probe text full of edge cases (numbers, contractions, code, CJK, emoji, newlines),
runs the model's own BPE on the pieces, and keeps the first rule that gives exactly the ids of the Hugging Face
tokenizer. A tokenizer that no rule reproduces is refused rather than exported with silently different
tokenization.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ExportError

logger = logging.getLogger(__name__)

_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

# llama.cpp pre-tokenizer name -> the regexes it applies one after the other (llama-vocab.cpp).
# Order matters: the first rule that reproduces the HF tokenizer wins, most specific first.
PRE_TOKENIZER_RULES: dict[str, tuple[str, ...]] = {
    "smollm": (r"\p{N}", _GPT2),
    "qwen2": (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "llama-bpe": (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                  r"|\s+(?!\S)|\s+",),
    "gpt-2": (_GPT2,),
}

PROBE_TEXT = (
    "Hello world! I'M here, you're there; DON'T stop. 3 33 333 3333 2024-01-31 12.5% 1,000,000\n"
    "\n\n  indented\tline\r\nobj.get(self)['key'] = x->y && z != 0; // comment\n"
    "def f(a, b):\n    return a**2 + b  # ok\n"
    "你好，世界！这是一个测试。中文和English混合 日本語のテキスト 한국어 텍스트\n"
    "emoji: 😀🎉👍🏽 🇨🇳 ❤️ — “quotes” «guillemets» café naïve Straße\n"
    "   trailing spaces   \n\n\n"
)


@dataclass
class GGUFVocab:
    """Everything llama.cpp needs to tokenize exactly like the Hugging Face tokenizer."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    eot_ids: list[int] = field(default_factory=list)


def _looks_special(text: str) -> bool:
    """Added tokens that behave as control tokens even when a tokenizer forgot to flag them special."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _split(text: str, rules: tuple[str, ...]) -> list[str]:
    import regex

    pieces = [text]
    for rule in rules:
        pattern = regex.compile(rule)
        out: list[str] = []
        for piece in pieces:
            pos = 0
            for m in pattern.finditer(piece):
                if m.start() > pos:
                    out.append(piece[pos:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = m.end()
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


def detect_pre_tokenizer(tokenizer: Any, probe: str = PROBE_TEXT) -> str:
    """The llama.cpp pre-tokenizer name (``smollm``, ``qwen2``, ``llama-bpe``, ``gpt-2``) that reproduces ``tokenizer``."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    expected = backend.encode(probe, add_special_tokens=False).ids
    if backend.normalizer is not None:
        probe = backend.normalizer.normalize_str(probe)
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for name, rules in PRE_TOKENIZER_RULES.items():
        ids: list[int] = []
        for piece in _split(probe, rules):
            mapped = "".join(s for s, _ in to_bytes.pre_tokenize_str(piece))
            ids.extend(tok.id for tok in backend.model.tokenize(mapped))
        if ids == expected:
            return name
    raise ExportError(
        "the tokenizer splits text in a way none of llama.cpp's pre-tokenizers reproduces "
        f"({', '.join(PRE_TOKENIZER_RULES)}); a GGUF would tokenize differently from the trained model",
        hint="export merged safetensors (`export_format: safetensors`) and convert them with llama.cpp's "
             "convert_hf_to_gguf.py, which knows more tokenizers")


def _merges(tokenizer_json: dict[str, Any]) -> list[str]:
    merges = tokenizer_json.get("model", {}).get("merges") or []
    if merges and isinstance(merges[0], (list, tuple)):
        merges = [" ".join(pair) for pair in merges]
    return list(merges)


def special_token_flags(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) as the HF tokenizer actually behaves when encoding a plain string."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if len(full) == len(plain):
        return False, False
    add_bos = tokenizer.bos_token_id is not None and full[0] == tokenizer.bos_token_id and plain[:1] != full[:1]
    add_eos = tokenizer.eos_token_id is not None and full[-1] == tokenizer.eos_token_id and plain[-1:] != full[-1:]
    return bool(add_bos), bool(add_eos)


def build_vocab(model_dir: Path, vocab_size: int, config: dict[str, Any]) -> GGUFVocab:
    """Read the tokenizer saved in ``model_dir`` into the GGUF vocab (padded to the embedding's ``vocab_size``)."""
    from transformers import AutoTokenizer

    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json; GGUF export needs a fast (byte-level BPE) tokenizer",
                          hint="save the tokenizer with use_fast_tokenizer: true")
    tokenizer_json = json.loads(tj_path.read_text(encoding="utf-8"))
    model_kind = tokenizer_json.get("model", {}).get("type")
    if model_kind != "BPE" or "ByteLevel" not in json.dumps(tokenizer_json.get("pre_tokenizer")):
        raise ExportError(f"{tj_path} is a {model_kind} tokenizer without byte-level pre-tokenization; GGUF export "
                          "writes byte-level BPE (gpt2-style) vocabularies only",
                          hint="export merged safetensors (`export_format: safetensors`)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer in {model_dir} has ids up to {max(vocab.values())}, but the model's "
                          f"embedding has only {vocab_size} rows",
                          hint="train with `resize_vocab: true` so the embedding matches the tokenizer")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED: embedding rows past the tokenizer
        elif i in added:
            text = added[i].content
            tokens.append(text)
            types.append(3 if added[i].special or _looks_special(text) else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
    add_bos, add_eos = special_token_flags(tokenizer)

    def pick(tok_id: int | None, key: str) -> int | None:
        if tok_id is not None:
            return int(tok_id)
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        return int(value) if value is not None else None

    eos_id = pick(tokenizer.eos_token_id, "eos_token_id")
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    eot = [i for i in (vocab.get("<|im_end|>"), vocab.get("<|eot_id|>"), vocab.get("<|end|>")) if i is not None]
    return GGUFVocab(
        tokens=tokens, token_types=types, merges=_merges(tokenizer_json), pre=detect_pre_tokenizer(tokenizer),
        bos_id=pick(tokenizer.bos_token_id, "bos_token_id"), eos_id=eos_id,
        pad_id=pick(tokenizer.pad_token_id, "pad_token_id"),
        unk_id=int(tokenizer.unk_token_id) if tokenizer.unk_token_id is not None else None,
        add_bos=add_bos, add_eos=add_eos, chat_template=template, eot_ids=eot[:1],
    )


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add the tokenizer keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    if vocab.eot_ids:
        writer.add_eot_token_id(vocab.eot_ids[0])
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
