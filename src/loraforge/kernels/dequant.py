"""NF4 dequantization in one kernel, into 16 bits or straight into FP8 (and into the transpose for backward).

bitsandbytes stores an NF4 weight as two 4-bit codes per byte (high nibble first), one absmax per block of 64
values, and with double quantization those absmax values themselves as 8-bit codes with one fp32 scale per 256
blocks plus an offset. Its ``dequantize_4bit`` runs two kernels per call (the absmax first, then the weight);
here one kernel reads the packed bytes and the 8-bit absmax codes and writes the weight: in the compute dtype
(exactly bitsandbytes' values: ``code[nibble] * absmax`` in fp32, rounded once), or for ``fp8: true`` divided by
the weight's FP8 scale into e4m3, optionally transposed (the operand of the input-gradient GEMM). The 16-bit
intermediate of "dequantize, then cast" is never written.

:func:`dequantize_nf4_reference` is bitsandbytes' own dequantization (plus the PyTorch cast); the Triton kernel is
tested against it under ``TRITON_INTERPRET=1`` and on the GPU. Other formats (FP4, 8-bit) keep bitsandbytes' path.
"""

from __future__ import annotations

from typing import Any

import torch

from loraforge.kernels._triton import cdiv, jit, tl

_TILE = 64


def fused_nf4_supported(weight: Any) -> bool:
    """True for a bitsandbytes NF4 weight (``Params4bit``) whose data is on a device the Triton kernel runs on."""
    from loraforge.kernels import use_triton

    state = getattr(weight, "quant_state", None)
    return (type(weight).__name__ == "Params4bit" and state is not None and state.quant_type == "nf4"
            and use_triton(weight.data) and len(state.shape) == 2)


def dequantize_nf4_reference(packed: torch.Tensor, state: Any, dtype: torch.dtype, fp8_scale: torch.Tensor | None = None,
                             transpose: bool = False) -> torch.Tensor:
    """bitsandbytes' dequantization of ``packed`` to ``dtype`` (or, with ``fp8_scale``, to e4m3 after dividing by it;
    ``transpose`` gives the [in, out] transpose, contiguous)."""
    from bitsandbytes.functional import dequantize_4bit

    from loraforge.kernels.fp8 import cast_weight_reference

    w = dequantize_4bit(packed, state).to(dtype)
    if fp8_scale is not None:
        return cast_weight_reference(w, fp8_scale, transpose)
    return w.t().contiguous() if transpose else w


@jit
def _nf4_kernel(PACKED, ABSQ, CODE2, ABSMAX2, OFFSET, CODE, SCALE, Q, rows, cols, blocksize, blocksize2,
                NESTED: tl.constexpr, TO_FP8: tl.constexpr, TRANSPOSE: tl.constexpr, TILE: tl.constexpr):
    r = tl.program_id(0) * TILE + tl.arange(0, TILE)
    c = tl.program_id(1) * TILE + tl.arange(0, TILE)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    e = r[:, None].to(tl.int64) * cols + c[None, :]  # the element's index in the row-major [rows, cols] weight
    byte = tl.load(PACKED + e // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(e % 2 == 0, byte >> 4, byte & 15)  # the high nibble holds the even element
    value = tl.load(CODE + nibble, mask=mask, other=0.0)
    block = e // blocksize
    if NESTED:
        code = tl.load(ABSQ + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(CODE2 + code, mask=mask, other=0.0) * tl.load(ABSMAX2 + block // blocksize2, mask=mask,
                                                                        other=0.0)
        absmax = absmax + tl.load(OFFSET)
    else:
        absmax = tl.load(ABSQ + block, mask=mask, other=0.0)
    w = value * absmax
    if TO_FP8:  # bitsandbytes' bf16 value, then the FP8 cast of kernels.fp8
        w = w.to(tl.bfloat16).to(tl.float32)
        w = tl.minimum(tl.maximum(w / tl.load(SCALE), -448.0), 448.0)
    out = w.to(Q.dtype.element_ty)
    if TRANSPOSE:  # Q is [cols, rows]: element (r, c) goes to (c, r); the tile is transposed to store along rows
        tl.store(Q + c[:, None].to(tl.int64) * rows + r[None, :], tl.trans(out), mask=tl.trans(mask))
    else:
        tl.store(Q + e, out, mask=mask)


def dequantize_nf4_triton(packed: torch.Tensor, state: Any, dtype: torch.dtype,
                          fp8_scale: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
    """The one-kernel dequantization (no dispatch; tests call it under ``TRITON_INTERPRET=1``)."""
    from loraforge.kernels.fp8 import E4M3

    rows, cols = state.shape
    out_dtype = E4M3 if fp8_scale is not None else dtype
    q = torch.empty((cols, rows) if transpose else (rows, cols), dtype=out_dtype, device=packed.device)
    nested = bool(state.nested)
    if nested:
        absq, code2, absmax2, offset = state.absmax, state.state2.code, state.state2.absmax, state.offset
        blocksize2 = state.state2.blocksize
    else:
        absq = state.absmax
        code2 = absmax2 = offset = absq  # unused
        blocksize2 = 1
    offset = offset if isinstance(offset, torch.Tensor) else torch.tensor([offset], device=packed.device)
    scale = fp8_scale if fp8_scale is not None else absq  # unused without FP8
    if q.numel():
        _nf4_kernel[(cdiv(rows, _TILE), cdiv(cols, _TILE))](
            packed, absq, code2, absmax2, offset, state.code, scale, q, rows, cols, state.blocksize, blocksize2,
            NESTED=nested, TO_FP8=fp8_scale is not None, TRANSPOSE=transpose, TILE=_TILE)
    return q


def dequantize_nf4(weight: Any, dtype: torch.dtype, fp8_scale: torch.Tensor | None = None,
                   transpose: bool = False) -> torch.Tensor:
    """A bitsandbytes NF4 ``Params4bit`` as a [out, in] tensor in ``dtype`` (or e4m3 with ``fp8_scale``; or the
    [in, out] transpose): the one-kernel path where :func:`fused_nf4_supported`, else the reference."""
    if fused_nf4_supported(weight):
        return dequantize_nf4_triton(weight.data, weight.quant_state, dtype, fp8_scale, transpose)
    return dequantize_nf4_reference(weight.data, weight.quant_state, dtype, fp8_scale, transpose)
