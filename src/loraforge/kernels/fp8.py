"""FP8 (e4m3) matmuls for the frozen base weight of a LoRA projection (``fp8: true``).

Only the two GEMMs that involve the frozen base weight run in FP8: the forward ``x W^T`` and the input gradient
``dY W``. ``fp8: backward`` (what ``auto`` picks on Hopper) keeps the forward pass 16-bit and runs in FP8 only what
backward computes: the input gradients, and the forward GEMMs of a checkpointed layer replayed for its backward.
The adapters, norms, attention, the loss and every gradient that trains something stay in 16 bits.

- Activations (``x``, ``dY``) are scaled per row (per token): ``scale = amax(row) / 448``.
- The frozen weight has one scale, from its largest magnitude, measured once. The 4/8-bit weight is dequantized
  to 16 bits as before and cast to e4m3 (and, for backward, to its transpose) by one kernel each.
- ``torch._scaled_mm`` multiplies with per-row scales into a 16-bit result; forward uses fast accumulation.

On an H200 the FP8 GEMMs took 0.6x the time of the bf16 ones at Qwen3-8B's shapes
(``benchmarks/results/fastpath/levers_h200.json``). Each quantizer has a PyTorch reference (:func:`quantize_rows_reference`,
:func:`cast_weight_reference`) that the Triton kernels are tested against; on a CPU the references run, and
``torch._scaled_mm`` has a CPU implementation, so the FP8 path runs in the CPU tests too.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from loraforge.kernels._triton import cdiv, jit, next_power_of_2, tl

E4M3 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0
_TINY = 1e-12


#: whether ``fp8: backward`` also runs the forward GEMMs of a layer replayed inside backward in FP8 (see
#: :func:`replays_in_fp8`); the benchmarks' A/B switch
REPLAY = {"on": True}


def replays_in_fp8(fp8: bool | str, replay: bool) -> bool:
    """Whether a projection's forward GEMM runs in FP8: always with ``fp8: true``; with ``fp8: backward`` when the
    forward is a checkpointed layer's replay inside backward (``replay``). The replay's outputs are never the
    loss: they only feed the layer's gradients, which ``backward`` already computes in FP8, while the forward
    pass that gives the loss stays 16-bit."""
    return fp8 is True or (fp8 == "backward" and replay and REPLAY["on"])


def fp8_supported(device: torch.device) -> bool:
    """FP8 GEMMs with per-row scales: Hopper or newer GPUs (compute capability 9.0), or the CPU (tests)."""
    if E4M3 is None or not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    from loraforge.kernels import cuda_capability

    return cuda_capability(device) >= (9, 0)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] 16/32-bit -> ([M, K] e4m3, [M, 1] fp32 scales) with ``x ~= q * scale`` row by row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_(min=_TINY)
    return (xf / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def cast_weight_reference(w: torch.Tensor, scale: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``w / scale`` in e4m3 ([out, in], or its transpose [in, out] contiguous)."""
    q = (w.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.t().contiguous() if transpose else q


@jit
def _quant_rows_kernel(X, Q, S, n_cols, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    tl.store(S + row, scale)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=mask)


@jit
def _cast_kernel(W, Q, SCALE, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(SCALE)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(w / scale, -448.0), 448.0)
    tl.store(Q + offs, q.to(Q.dtype.element_ty), mask=mask)


@jit
def _cast_t_kernel(W, Q, SCALE, rows, cols, TILE: tl.constexpr):
    r = tl.program_id(0) * TILE + tl.arange(0, TILE)
    c = tl.program_id(1) * TILE + tl.arange(0, TILE)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    scale = tl.load(SCALE)
    w = tl.load(W + r[:, None].to(tl.int64) * cols + c[None, :], mask=mask, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(w / scale, -448.0), 448.0).to(Q.dtype.element_ty)
    # Q is [cols, rows]: element (r, c) of W goes to (c, r); the tile is transposed so the stores run along rows
    tl.store(Q + c[:, None].to(tl.int64) * rows + r[None, :], tl.trans(q), mask=tl.trans(mask))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of a [M, K] tensor: the Triton kernel on a GPU, else the reference."""
    from loraforge.kernels import use_triton

    if not use_triton(x):
        return quantize_rows_reference(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=E4M3, device=x.device)
    s = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = min(4096, next_power_of_2(cols))
        _quant_rows_kernel[(rows,)](x, q, s, cols, x.stride(0), q.stride(0), BLOCK=block)
    return q, s


def cast_weight(w: torch.Tensor, scale: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``w / scale`` in e4m3, [out, in] or transposed [in, out]: one Triton kernel on a GPU, else the reference."""
    from loraforge.kernels import use_triton

    if not use_triton(w):
        return cast_weight_reference(w, scale, transpose)
    w = w.contiguous()
    rows, cols = w.shape
    if transpose:
        q = torch.empty((cols, rows), dtype=E4M3, device=w.device)
        _cast_t_kernel[(cdiv(rows, 64), cdiv(cols, 64))](w, q, scale, rows, cols, TILE=64)
    else:
        q = torch.empty((rows, cols), dtype=E4M3, device=w.device)
        _cast_kernel[(cdiv(w.numel(), 2048),)](w, q, scale, w.numel(), BLOCK=2048)
    return q


def weight_scale(base_layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight's one FP8 scale (fp32, [1], on its device): measured once, at the first use, from the
    dequantized weight, and kept on the layer."""
    scale = getattr(base_layer, "_loraforge_fp8_scale", None)
    if scale is None:
        from loraforge.kernels.lora import dequantize_weight

        weight = dequantize_weight(base_layer, dtype)
        scale = (weight.float().abs().amax() / E4M3_MAX).clamp_(min=_TINY).reshape(1)
        base_layer._loraforge_fp8_scale = scale
        base_layer._loraforge_fp8_vectors = {}
    return scale


def scale_vector(vectors: dict, scale: torch.Tensor, n: int) -> torch.Tensor:
    """A weight's one scale as the [1, n] per-column vector ``_scaled_mm`` takes, made once per width and kept in
    ``vectors`` (the layer's, or a q/k/v group's)."""
    vec = vectors.get(n)
    if vec is None:
        vec = vectors[n] = scale.reshape(1, 1).expand(1, n).contiguous()
    return vec


def _scale_vector(base_layer: torch.nn.Module, scale: torch.Tensor, n: int) -> torch.Tensor:
    return scale_vector(base_layer._loraforge_fp8_vectors, scale, n)


def fp8_weight(base_layer: torch.nn.Module, dtype: torch.dtype, scale: torch.Tensor,
               transpose: bool = False) -> torch.Tensor:
    """The frozen weight in e4m3, [out, in] (or [in, out] with ``transpose``): dequantized to the compute dtype
    (bitsandbytes), then cast by one kernel. (A one-kernel NF4-to-e4m3 dequantization was tried and measured
    4.7x slower than bitsandbytes' dequantization on an H200; see docs/performance.md.)"""
    from loraforge.kernels.lora import dequantize_weight

    return cast_weight(dequantize_weight(base_layer, dtype), scale, transpose)


def gemm_shapes_ok(k: int, n: int) -> bool:
    """``torch._scaled_mm`` needs both the inner and the output dimension to be multiples of 16."""
    return k % 16 == 0 and n % 16 == 0


def scaled_mm(a8: torch.Tensor, a_scale: torch.Tensor, b8_t: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype, fast: bool) -> torch.Tensor:
    """``(a8 * a_scale) @ (b8_t * b_scale)``: a8 [M, K] row-major, b8_t [K, N] column-major e4m3, a_scale [M, 1],
    b_scale [1, N] (per-row scaling)."""
    return torch._scaled_mm(a8, b8_t, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype, use_fast_accum=fast)


class _LastRows:
    """The q/k/v projections (and gate/up) read the same input: it is quantized once, not three times. Holds one
    entry, for the very tensor object and version last quantized."""

    def __init__(self) -> None:
        self.entry: tuple[Any, int, torch.Tensor, torch.Tensor] | None = None

    def get(self, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.entry
        if e is not None and e[0]() is x and e[1] == x._version:
            return e[2], e[3]
        q, s = quantize_rows(x2)
        self.entry = (weakref.ref(x), x._version, q, s)
        return q, s

    def clear(self) -> None:
        self.entry = None


LAST_ROWS = _LastRows()


def fp8_forward(x: torch.Tensor, x2: torch.Tensor, base_layer: torch.nn.Module, dtype: torch.dtype,
                weight: torch.Tensor | None = None, fast: bool = True) -> torch.Tensor:
    """``x2 @ W^T`` through FP8 (``x`` is the tensor ``x2`` was reshaped from: the key of the shared
    quantization); ``weight``: the weight in ``dtype`` when the caller already holds it; ``fast``: the GEMM's fast
    accumulation (the forward of ``fp8: true``; a replay for ``fp8: backward`` accumulates exactly)."""
    scale = weight_scale(base_layer, dtype)
    xq, xs = LAST_ROWS.get(x, x2)
    # [out, in]; .t() is the column-major [in, out] operand
    w8 = fp8_weight(base_layer, dtype, scale) if weight is None else cast_weight(weight, scale)
    return scaled_mm(xq, xs, w8.t(), _scale_vector(base_layer, scale, w8.shape[0]), dtype, fast=fast)


def fp8_input_grad(dy: torch.Tensor, base_layer: torch.nn.Module, dtype: torch.dtype,
                   w8t: torch.Tensor | None = None) -> torch.Tensor:
    """``dy @ W`` through FP8 (the input gradient of ``x W^T``); ``w8t``: the weight's e4m3 transpose when the
    caller already holds it (see ``keep_weight`` in :func:`loraforge.kernels.lora.lora_linear`)."""
    scale = weight_scale(base_layer, dtype)
    dq, ds = quantize_rows(dy)
    if w8t is None:  # [in, out]; .t() is the column-major operand
        w8t = fp8_weight(base_layer, dtype, scale, transpose=True)
    return scaled_mm(dq, ds, w8t.t(), _scale_vector(base_layer, scale, w8t.shape[0]), dtype, fast=False)
