"""Hugging Face ``config.json`` and tensor names -> GGUF hyper-parameters and llama.cpp tensor names.

Three architectures are supported: ``llama`` (Llama 2/3, SmolLM2, ...), ``qwen2`` and ``qwen3``. They share the
tensor layout of a pre-norm decoder; the differences are carried by :class:`ArchSpec`:

- llama.cpp's ``llama`` architecture applies RoPE to interleaved pairs, while transformers rotates the two halves
  of each head, so the rows of ``q_proj``/``k_proj`` are permuted on the way out (qwen2/qwen3 use the "NEOX"
  rotation, like transformers, and are written as they are);
- qwen2 has q/k/v biases, qwen3 has per-head RMS norms on q and k (``attn_q_norm``/``attn_k_norm``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import ExportError


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face ``model_type`` is written as GGUF."""

    gguf_arch: str            # general.architecture
    interleaved_rope: bool    # llama.cpp rotates (x0, x1) pairs: permute q/k rows from the HF half-split layout


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", interleaved_rope=True),
    "qwen2": ArchSpec("qwen2", interleaved_rope=False),
    "qwen3": ArchSpec("qwen3", interleaved_rope=False),
}

# HF suffix inside a decoder layer -> llama.cpp tensor base name.
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class HParams:
    """The hyper-parameters llama.cpp reads, taken from ``config.json``."""

    model_type: str
    spec: ArchSpec
    vocab_size: int
    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None


def _rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope base, scaling dict or None) from either the transformers 4 or the transformers 5 layout."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    theta = None
    scaling = config.get("rope_scaling")
    if isinstance(params, dict):
        theta = params.get("rope_theta")
        if params.get("rope_type", "default") != "default":
            scaling = params
    if theta is None:
        theta = config.get("rope_theta", 10000.0)
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind in (None, "default"):
            scaling = None
    return float(theta), scaling if isinstance(scaling, dict) else None


def read_hparams(config: dict[str, Any], source: str = "config.json") -> HParams:
    """Read the GGUF hyper-parameters from a model's ``config.json``; errors name the missing field."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ExportError(
            f"GGUF export supports the llama, qwen2 and qwen3 architectures; {source} has "
            f"`model_type: {model_type}`",
            hint="export merged safetensors instead (`export_format: safetensors`) and convert them with "
                 "llama.cpp's convert_hf_to_gguf.py")

    def need(key: str) -> Any:
        if config.get(key) is None:
            raise ExportError(f"{source} has no `{key}`, which the GGUF header needs",
                              hint="re-save the model with transformers' save_pretrained")
        return config[key]

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    theta, scaling = _rope_settings(config)
    head_dim = config.get("head_dim") or hidden // heads
    return HParams(
        model_type=model_type,
        spec=ARCHS[model_type],
        vocab_size=int(need("vocab_size")),
        context_length=int(config.get("max_position_embeddings") or 4096),
        embedding_length=hidden,
        block_count=int(need("num_hidden_layers")),
        feed_forward_length=int(need("intermediate_size")),
        head_count=heads,
        head_count_kv=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=theta,
        rms_norm_eps=float(config.get("rms_norm_eps") or 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )


def write_hparams(writer: Any, hp: HParams) -> None:
    """Add the architecture's hyper-parameters to a ``gguf.GGUFWriter``."""
    import gguf

    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.embedding_length)
    writer.add_block_count(hp.block_count)
    writer.add_feed_forward_length(hp.feed_forward_length)
    writer.add_head_count(hp.head_count)
    writer.add_head_count_kv(hp.head_count_kv)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    writer.add_vocab_size(hp.vocab_size)
    if hp.rope_scaling is None:
        return
    kind = hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type"))
    factor = float(hp.rope_scaling.get("factor", 1.0))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        if hp.rope_scaling.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(hp.rope_scaling["original_max_position_embeddings"]))
    elif kind == "llama3":
        pass  # carried by the rope_freqs tensor (see llama3_rope_factors)
    else:
        raise ExportError(f"RoPE scaling `{kind}` cannot be written to GGUF yet (supported: linear, yarn, llama3)",
                          hint="export merged safetensors instead (`export_format: safetensors`)")


def llama3_rope_factors(hp: HParams) -> np.ndarray | None:
    """The per-frequency divisors of Llama 3.1's RoPE scaling, which llama.cpp reads from ``rope_freqs.weight``."""
    rs = hp.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) != "llama3":
        return None
    factor = float(rs.get("factor", 8.0))
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < old_ctx / high, 1.0,
                   np.where(wavelen > old_ctx / low, factor, 1.0 / ((1.0 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def gguf_tensor_name(hf_name: str, hp: HParams) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; None for tensors left out.

    Left out: rotary caches, and ``lm_head.weight`` when the embeddings are tied (llama.cpp then reuses
    ``token_embd.weight`` as the output matrix).
    """
    if hf_name.endswith(_SKIPPED_SUFFIXES):
        return None
    if hf_name == "lm_head.weight" and hp.tie_word_embeddings:
        return None
    m = _LAYER_RE.match(hf_name)
    if m:
        layer, inner, kind = m.groups()
        base = _LAYER_TENSORS.get(inner)
        if base is not None and int(layer) < hp.block_count:
            return f"blk.{layer}.{base}.{kind}"
    else:
        stem, _, kind = hf_name.rpartition(".")
        base = _GLOBAL_TENSORS.get(stem)
        if base is not None and kind == "weight":
            return f"{base}.weight"
    raise ExportError(
        f"tensor {hf_name!r} has no GGUF name for the {hp.model_type} architecture",
        hint="this usually means a modified architecture; export merged safetensors instead "
             "(`export_format: safetensors`)")


def _interleave_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from [first half | second half] to pairs (x0, x_{d/2}), (x1, ...), ..."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_layout(gguf_name: str, array: np.ndarray, hp: HParams) -> np.ndarray:
    """Apply the architecture's layout change to one tensor (only llama's q/k rows change)."""
    if not hp.spec.interleaved_rope:
        return array
    if ".attn_q." in gguf_name:
        return _interleave_rope_rows(array, hp.head_count)
    if ".attn_k." in gguf_name:
        return _interleave_rope_rows(array, hp.head_count_kv)
    return array
