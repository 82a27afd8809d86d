"""Decoder shapes the memory model needs, from a built-in table, a local ``config.json`` or a cached hub config.

Only shapes are read (never weights), so ``loraforge estimate`` works offline for every built-in name and for
any folder or file holding a Hugging Face ``config.json`` of a dense decoder (Llama, Qwen2/2.5/3, Mistral, ...).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    """The shapes of a dense decoder-only transformer (what ``config.json`` says)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    source: str = "built-in"
    model_type: str = ""  # the transformers family (decides whether loraforge's fast path covers it)

    @property
    def q_dim(self) -> int:
        """Width of the query projection (heads x head_dim)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projections (kv heads x head_dim)."""
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer inside one decoder block."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params_per_layer(self) -> int:
        """Weights of the seven linear layers of one block (what QLoRA quantizes)."""
        return sum(a * b for a, b in self.linear_shapes().values())

    def small_params_per_layer(self) -> int:
        """Norm weights and biases of one block (kept in 16/32 bits even under QLoRA)."""
        n = 2 * self.hidden_size
        if self.qk_norm:
            n += 2 * self.head_dim
        if self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        return n

    def params_per_layer(self) -> int:
        """All parameters of one decoder block."""
        return self.linear_params_per_layer() + self.small_params_per_layer()

    @property
    def embedding_params(self) -> int:
        """Input embedding table (vocab x hidden)."""
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Output projection; 0 when it shares the embedding table."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        """Every parameter, counting a tied embedding once (what ``model.parameters()`` yields)."""
        return (self.embedding_params + self.lm_head_params + self.num_layers * self.params_per_layer()
                + self.hidden_size)

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        """Adapter parameters: r x (in + out) for every targeted linear of every block."""
        shapes = self.linear_shapes()
        return self.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def _qwen3(name: str, h: int, i: int, layers: int, heads: int, tied: bool) -> Architecture:
    return Architecture(name, 151936, h, i, layers, heads, 8, 128, tied, qk_norm=True, model_type="qwen3")


def _qwen25(name: str, vocab: int, h: int, i: int, layers: int, heads: int, kv: int, tied: bool) -> Architecture:
    return Architecture(name, vocab, h, i, layers, heads, kv, h // heads, tied, qkv_bias=True, model_type="qwen2")


def _llama3(name: str, h: int, i: int, layers: int, heads: int, head_dim: int, tied: bool) -> Architecture:
    return Architecture(name, 128256, h, i, layers, heads, 8, head_dim, tied, model_type="llama")


# Shapes as published in each model's config.json on the Hugging Face hub.
BUILTIN_ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    _qwen3("qwen3-0.6b", 1024, 3072, 28, 16, True),
    _qwen3("qwen3-1.7b", 2048, 6144, 28, 16, True),
    _qwen3("qwen3-4b", 2560, 9728, 36, 32, True),
    _qwen3("qwen3-8b", 4096, 12288, 36, 32, False),
    _qwen3("qwen3-14b", 5120, 17408, 40, 40, False),
    _qwen3("qwen3-32b", 5120, 25600, 64, 64, False),
    _qwen25("qwen2.5-0.5b", 151936, 896, 4864, 24, 14, 2, True),
    _qwen25("qwen2.5-1.5b", 151936, 1536, 8960, 28, 12, 2, True),
    _qwen25("qwen2.5-3b", 151936, 2048, 11008, 36, 16, 2, True),
    _qwen25("qwen2.5-7b", 152064, 3584, 18944, 28, 28, 4, False),
    _qwen25("qwen2.5-14b", 152064, 5120, 13824, 48, 40, 8, False),
    _llama3("llama3-8b", 4096, 14336, 32, 32, 128, False),
    _llama3("llama3.2-1b", 2048, 8192, 16, 32, 64, True),
    _llama3("llama3.2-3b", 3072, 8192, 28, 24, 128, True),
    Architecture("smollm2-135m", 49152, 576, 1536, 30, 9, 3, 64, True),
)}

# Hub ids (lower case, without -Instruct/-Base suffixes) and loraforge built-in model names that share a shape.
ALIASES = {
    **{f"qwen/qwen3-{s}": f"qwen3-{s}" for s in ("0.6b", "1.7b", "4b", "8b", "14b", "32b")},
    **{f"qwen/qwen2.5-{s}": f"qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b", "14b")},
    "meta-llama/meta-llama-3-8b": "llama3-8b", "meta-llama/llama-3.1-8b": "llama3-8b",
    "meta-llama/meta-llama-3.1-8b": "llama3-8b", "llama3.1-8b": "llama3-8b",
    "meta-llama/llama-3.2-1b": "llama3.2-1b", "meta-llama/llama-3.2-3b": "llama3.2-3b",
    "huggingfacetb/smollm2-135m": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
}
_SUFFIXES = ("-instruct-2507", "-instruct", "-base", "-chat", "-it")


def builtin_names() -> list[str]:
    """Names accepted without any file or download."""
    return sorted(BUILTIN_ARCHITECTURES)


def _lookup(name: str) -> Architecture | None:
    key = name.strip().lower()
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            key = key[: -len(suffix)]
            break
    key = ALIASES.get(key, key)
    return BUILTIN_ARCHITECTURES.get(key)


def architecture_from_config(config: dict[str, Any], *, name: str, source: str) -> Architecture:
    """Read the shapes from a parsed ``config.json``; raise :class:`ModelLoadError` naming what is missing."""
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # multimodal wrappers keep the language model's shapes here
    if any(k in config for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ModelLoadError(f"{source}: mixture-of-experts models ({config.get('model_type')}) are not supported "
                             "by the memory estimator yet; estimate a dense model of similar size instead")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(config.get(k), int)]
    if missing:
        raise ModelLoadError(f"{source} lacks {', '.join(missing)}; it does not look like the config.json of a "
                             "decoder-only language model")
    heads = config["num_attention_heads"]
    model_type = str(config.get("model_type", ""))
    return Architecture(
        name=name, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type.startswith("qwen3"), source=source, model_type=model_type)


def _read_config_file(path: Path, name: str) -> Architecture:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return architecture_from_config(config, name=name, source=str(path))


def _tiny_random_qwen3() -> Architecture | None:
    try:
        from ..models.builtin import TINY_QWEN3_CONFIG
    except ImportError:
        return None
    cfg = dict(TINY_QWEN3_CONFIG, model_type="qwen3")
    return architecture_from_config(cfg, name="tiny-random-qwen3", source="loraforge built-in tiny-random-qwen3")


def _cached_hub_config(repo_id: str) -> Path | None:
    """config.json of ``repo_id`` from the local Hugging Face cache, or downloaded when the hub is reachable."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception:  # noqa: BLE001 - any hub failure means "not available", reported below
        return None


def resolve_architecture(model: str) -> Architecture:
    """A built-in name or alias, a folder or file holding ``config.json``, or a hub id (from the local cache)."""
    if not model or not str(model).strip():
        raise ModelLoadError("no model given: pass --model (a built-in name, a folder with config.json, or a hub id)")
    found = _lookup(model)
    if found is not None:
        return found
    if model.strip().lower() == "tiny-random-qwen3":
        tiny = _tiny_random_qwen3()
        if tiny is not None:
            return tiny
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} holds no config.json; point --model at a model folder or its config.json")
        return _read_config_file(path / "config.json", path.name)
    if path.is_file():
        return _read_config_file(path, path.parent.name or path.stem)
    if "/" in model and not model.startswith((".", "/", "~")):
        cached = _cached_hub_config(model)
        if cached is not None:
            return replace(_read_config_file(cached, model.split("/")[-1]), source=f"hub {model} ({cached})")
        raise ModelLoadError(
            f"the config of hub model {model!r} is not in the local Hugging Face cache and the hub cannot be "
            "reached (offline)",
            hint=f"use a built-in name ({', '.join(builtin_names())}), or download {model}/config.json once "
                 "and pass its path")
    raise ModelLoadError(f"unknown model {model!r}: not a built-in name, a folder or a file",
                         hint=f"built-in names: {', '.join(builtin_names())}")
