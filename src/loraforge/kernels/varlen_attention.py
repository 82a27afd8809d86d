"""Variable-length causal attention: one implementation for packed rows, token-budget micro-batches and the
fast path.

A batch may hold several samples in one flattened row (``position_ids`` restart at 0 for each sample, or the
flash-attention kwargs ``cu_seq_lens_q`` / ``max_length_q`` are given). No sample attends to another, and no
[T, T] mask is ever built: on an Ampere or newer GPU the samples go through PyTorch's own flash-attention varlen
kernel (``torch.nn.attention.varlen.varlen_attn``); elsewhere (CPU, tests, Turing GPUs such as the T4/T10) through
:func:`varlen_attention_reference`, which runs each sample through ``scaled_dot_product_attention`` and is the
numerical reference.

The function is registered with transformers' ``AttentionInterface`` under :data:`ATTENTION_NAME`, the
documented way to add an attention kernel; :func:`use_varlen_attention` switches a model to it. It is for
training and evaluation forwards (right padding or packing, no KV cache). Generation with left padding needs a
padding mask, so :func:`use_generation_attention` switches a model back to ``sdpa`` before ``generate``.
"""

from __future__ import annotations

import inspect
import weakref
import logging
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ATTENTION_NAME = "loraforge_varlen"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sample boundaries (int32 cumulative lengths, [n + 1]) and the longest sample of a batch whose rows may
    hold several samples each, their positions restarting at 0; every row start is a boundary too.

    This syncs with the host once (for the max length), so the result is cached for the position tensor of the
    current forward (each layer asks again). Collators that know the lengths pass ``cu_seq_lens_q`` /
    ``max_length_q`` instead."""
    ref = _CACHE.get("ref")
    if ref is not None and ref() is position_ids and _CACHE["version"] == position_ids._version:
        return _CACHE["value"]
    rows, width = position_ids.shape[0], position_ids.shape[-1]
    restart = position_ids.reshape(rows, width) == 0
    restart[:, 0] = True
    starts = torch.nonzero(restart.reshape(-1), as_tuple=False).reshape(-1)
    cu = torch.cat([starts, starts.new_full((1,), rows * width)]).to(torch.int32)
    value = (cu, int((cu[1:] - cu[:-1]).max()))
    _CACHE.update(ref=weakref.ref(position_ids), version=position_ids._version, value=value)
    return value


_CACHE: dict[str, Any] = {}


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """Causal attention of each sample on its own. q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]."""
    bounds = cu_seqlens.tolist()
    groups = q.shape[1] // k.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs, 0)


def _torch_varlen() -> Any | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_kwargs(fn: Any) -> dict[str, Any]:
    """The causal switch of ``varlen_attn`` changed between PyTorch releases (``is_causal`` -> ``window_size``)."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        return {"window_size": (-1, 0)}
    return {"is_causal": True}


_KERNEL: dict[str, Any] = {}


def _kernel() -> tuple[Any, dict[str, Any], bool] | None:
    if "fn" not in _KERNEL:
        fn = _torch_varlen()
        _KERNEL["fn"] = fn
        if fn is not None:
            _KERNEL["kwargs"] = _varlen_kwargs(fn)
            _KERNEL["gqa"] = "enable_gqa" in inspect.signature(fn).parameters
    fn = _KERNEL["fn"]
    return None if fn is None else (fn, _KERNEL["kwargs"], _KERNEL["gqa"])


def flash_varlen_supported(device: torch.device) -> bool:
    """PyTorch's varlen kernel is flash-attention 2, which needs an Ampere or newer GPU (compute capability 8.0);
    Turing cards (T4, T10, RTX 20xx) take the per-sample SDPA path instead."""
    from loraforge.kernels import cuda_capability

    return cuda_capability(device) >= (8, 0)


class FlashVarlenGQA(torch.autograd.Function):
    """Causal flash-attention 2 over packed samples with K/V heads shared by groups of query heads, without
    repeating K and V: ATen's flash kernels take fewer K/V heads than query heads and sum the K/V gradients over
    each group in backward. For PyTorch releases whose ``varlen_attn`` has no ``enable_gqa`` (2.11, 2.12)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                scale: float | None) -> torch.Tensor:
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, seed, offset,
            scale=ctx.scale)
        return dq, dk, dv, None, None, None


#: ``native`` runs grouped K/V heads through :class:`FlashVarlenGQA` when ``varlen_attn`` has no ``enable_gqa``;
#: ``repeat`` expands them to one per query head first (exact too; the benchmarks compare the two)
GQA_MODE = {"mode": "native"}


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     scale: float | None = None) -> torch.Tensor:
    """Causal attention within each sample of a flattened batch. q: [T, Hq, D]; k, v: [T, Hkv, D]."""
    usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_varlen_supported(q.device)
    kernel = _kernel() if usable else None
    if kernel is None:
        return varlen_attention_reference(q, k, v, cu_seqlens, scale)
    fn, kwargs, gqa = kernel
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if k.shape[1] != q.shape[1]:
        if gqa:
            kwargs = {**kwargs, "enable_gqa": True}
        elif GQA_MODE["mode"] == "native" and hasattr(torch.ops.aten, "_flash_attention_forward"):
            return FlashVarlenGQA.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu, max_len, scale)
        else:  # expand the shared K/V heads (costs memory and copies, still exact)
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, scale=scale, **kwargs)


def dense_attention_preferred(q: torch.Tensor) -> bool:
    """Rows that are one sequence each run through SDPA's cuDNN backend on Hopper or newer GPUs: measured on an
    H200 (``benchmarks/results/fastpath/levers_h200.json``) 1.4x (4 x 2048) to 1.6x (1 x 16384) the speed of the flash
    varlen kernel, forward + backward. Elsewhere the varlen kernel keeps the rows."""
    from loraforge.kernels import cuda_capability

    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)) or DENSE_MODE["mode"] != "cudnn":
        return False
    return cuda_capability(q.device) >= (9, 0)


#: ``cudnn``: one-sequence rows take :func:`dense_causal_attention` on Hopper+; ``varlen``: never (the A/B)
DENSE_MODE = {"mode": "cudnn"}
#: ``grouped``: K/V heads go to SDPA as they are, with ``enable_gqa=True``, instead of repeated: measured on an
#: H200 at Qwen3-8B, 2048 x 4 (``benchmarks/results/fastpath/peers_8b_s5call1.json``, worker ``_cudnngqa``, the
#: A/B from before this was the default; ``bench_peers`` worker ``_denserep`` is the A/B now):
#: 25 ms less GPU time per step (the K/V copies, forward, replay and backward) and 0.09 GiB less memory.
#: Cleared (repeat) after the first refusal by a PyTorch/cuDNN that takes no grouped heads.
DENSE_GQA = {"grouped": True}


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention of [B, Hq, S, D] rows (K/V [B, Hkv, S, D]) through SDPA, cuDNN first, flash second.
    Grouped K/V heads go in as they are (``enable_gqa=True``, see :data:`DENSE_GQA`), else repeated."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if "priority" not in _KERNEL:
        _KERNEL["priority"] = "set_priority" in inspect.signature(sdpa_kernel).parameters
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]

    def sdpa(k: torch.Tensor, v: torch.Tensor, **extra: Any) -> torch.Tensor:
        with sdpa_kernel(backends, set_priority=True) if _KERNEL["priority"] else sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **extra)

    if k.shape[1] == q.shape[1]:
        return sdpa(k, v)
    if DENSE_GQA["grouped"]:
        try:
            return sdpa(k, v, enable_gqa=True)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:  # no backend here takes grouped heads: repeat them from now on
            logger.info("SDPA refused grouped K/V heads (%s); repeating them instead", err)
            DENSE_GQA["grouped"] = False
    groups = q.shape[1] // k.shape[1]
    return sdpa(k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, Hq, S, D], key/value [B, Hkv, S, D] ->
    ([B, S, Hq, D], None). Each row is one causal sequence unless it is packed (``position_ids`` restarting
    at 0, or ``cu_seq_lens_q`` for one flattened row): then each packed sample attends only to itself.
    Positions that continue through a row (LLaMA-Factory's plain ``packing``) keep the row one sequence."""
    batch, heads, seq, dim = query.shape
    if key.shape[2] != seq:
        raise RuntimeError(f"{ATTENTION_NAME} attention is for training and evaluation forwards (no KV cache); "
                           "call loraforge.kernels.varlen_attention.use_generation_attention(model) before "
                           "generate()")
    if dropout:
        raise RuntimeError(f"{ATTENTION_NAME} attention has no attention dropout; set attention_dropout to 0")
    if attention_mask is not None:
        raise RuntimeError(f"{ATTENTION_NAME} attention received a padding mask; it expects right-padded or "
                           "packed rows (no mask)")
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is not None and batch != 1:
        raise RuntimeError(f"{ATTENTION_NAME} attention: cu_seq_lens_q needs the samples flattened into one row, "
                           f"got {batch} rows")
    if cu is None and kwargs.get("position_ids") is not None:
        cu, max_len = cu_seqlens_from_position_ids(kwargs["position_ids"].expand(batch, -1))
    if (cu is None or (kwargs.get("cu_seq_lens_q") is None and cu.numel() == batch + 1)) \
            and dense_attention_preferred(query):  # every row is one causal sequence: no varlen needed
        return dense_causal_attention(query, key, value, scaling).transpose(1, 2), None
    if cu is not None and max_len is not None and batch == 1 and dense_attention_preferred(query):
        n, top = cu.numel() - 1, int(max_len)
        if n * top == seq:  # packed samples that all have the longest length: rows of one sequence each
            def rows(t: torch.Tensor) -> torch.Tensor:
                return t.transpose(1, 2).reshape(n, top, t.shape[1], dim).transpose(1, 2)

            out = dense_causal_attention(rows(query), rows(key), rows(value), scaling)
            return out.transpose(1, 2).reshape(1, seq, heads, dim), None
    if cu is None:  # a plain (right-padded) batch: every row is one causal sequence
        cu = torch.arange(0, (batch + 1) * seq, seq, device=query.device, dtype=torch.int32)
        max_len = seq
    if not isinstance(max_len, int):
        max_len = int(max_len)
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], dim)
    out = varlen_attention(q, k, v, cu, max_len, scaling)
    return out.reshape(batch, seq, heads, dim), None


def register() -> None:
    """Add :data:`ATTENTION_NAME` to transformers' attention registry (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, attention_forward)


def use_varlen_attention(model: Any) -> None:
    """Run ``model``'s attention through :func:`attention_forward` (training and evaluation forwards)."""
    register()
    set_attention(model, ATTENTION_NAME)


def use_generation_attention(model: Any) -> None:
    """Switch ``model`` back to ``sdpa`` (padding masks, KV cache) if it runs the varlen attention."""
    if attention_of(model) == ATTENTION_NAME:
        set_attention(model, "sdpa")


def attention_of(model: Any) -> str | None:
    """The attention implementation ``model`` (or the base model under a peft wrapper) runs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None)


def set_attention(model: Any, name: str) -> None:
    """Switch ``model``'s attention implementation to ``name`` (a key of transformers' AttentionInterface)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(name)
    else:  # older transformers: every sub-config carries the name
        for module in base.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = name
