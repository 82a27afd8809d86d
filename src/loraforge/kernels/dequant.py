"""4-bit weights dequantized by bitsandbytes' own CUDA kernels, called with less host work per call.

The fast path dequantizes every 4-bit weight three times per step (forward, recompute, backward: 756 calls per
step for Qwen3-8B). Through ``bitsandbytes.functional.dequantize_4bit`` each call crosses two registered torch
ops whose CUDA implementations are Python functions, plus checks and a device guard: about 240 us of host time
per call on an H200's host (cProfile of one training step, ``benchmarks/results/fastpath/peers_8b_s4call2.json``),
which left the GPU idle between kernels. :func:`dequantize_4bit` launches the same two bitsandbytes kernels
(the 8-bit nested absmax, then the 4-bit weight) through the library's own ctypes entry points, with the
argument types bitsandbytes itself declares for them.

It is used only where it is exactly bitsandbytes' computation: a CUDA weight on the current device, nf4 or fp4,
a 16/32-bit output, a nested absmax with an fp32 ``state2``, and a bitsandbytes whose entry points have the
signature this module was written against (checked once). Anything else takes ``bitsandbytes.functional``.
The GPU test ``tests/test_dequant.py`` holds the two bit-equal.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable

import torch

# (code, A, absmax, out, blocksize, numel, stream): the signature bitsandbytes 0.45+ declares for these symbols
_SIGNATURE = [ctypes.c_void_p] * 4 + [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@functools.cache
def _entry_points() -> dict[str, Callable] | None:
    """bitsandbytes' dequantization entry points by name, or None when they are not there as expected."""
    try:
        from bitsandbytes.cextension import lib
        import bitsandbytes.backends.cuda.ops  # noqa: F401  (declares the entry points' argument types)
    except (ImportError, RuntimeError, OSError, AttributeError):  # no CUDA library (a CPU-only bitsandbytes)
        return None
    raw = getattr(lib, "_lib", None)
    names = [f"cdequantize_blockwise_{d}_{q}" for d in _DTYPES.values() for q in ("nf4", "fp4")]
    names.append("cdequantize_blockwise_fp32")
    found = {}
    for name in names:
        fn = getattr(raw, name, None) if raw is not None else None
        if fn is None or list(getattr(fn, "argtypes", None) or []) != _SIGNATURE:
            return None
        found[name] = fn
    return found


def direct_ok(weight: Any, dtype: torch.dtype) -> bool:
    """Whether :func:`dequantize_4bit` computes ``weight`` exactly as bitsandbytes would, with its fast call."""
    data = getattr(weight, "data", None)
    qs = getattr(weight, "quant_state", None)
    if data is None or qs is None or not data.is_cuda or qs.dtype != dtype or dtype not in _DTYPES:
        return False
    if qs.quant_type not in ("nf4", "fp4"):
        return False
    if data.device.index != torch.cuda.current_device() or not data.is_contiguous():
        return False
    if qs.nested and (qs.state2.dtype != torch.float32 or not qs.state2.code.is_cuda):
        return False
    return _entry_points() is not None


#: the current CUDA stream's handle by device index, without building a Python stream object (a C function of
#: torch's CUDA builds; absent on CPU builds, where the direct path never runs)
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_handle(device: torch.device) -> int:
    if _RAW_STREAM is not None:
        return _RAW_STREAM(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def dequantize_4bit(weight: Any, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """A bitsandbytes ``Params4bit`` weight in ``dtype`` (call :func:`direct_ok` first); into ``out`` when given (a
    contiguous tensor of the weight's shape and ``dtype``, such as a row block of a q/k/v group's weight)."""
    fns = _entry_points()
    qs = weight.quant_state
    data = weight.data
    stream = _stream_handle(data.device)
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        nested, absmax = absmax, torch.empty(absmax.shape, dtype=torch.float32, device=data.device)
        fns["cdequantize_blockwise_fp32"](s2.code.data_ptr(), nested.data_ptr(), s2.absmax.data_ptr(),
                                          absmax.data_ptr(), s2.blocksize, nested.numel(), stream)
        absmax += qs.offset
    if out is None:
        out = torch.empty(qs.shape, dtype=dtype, device=data.device)
    elif out.shape != qs.shape or out.dtype != dtype or not out.is_contiguous() or out.device != data.device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(qs.shape)} on {data.device}; got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    fns[f"cdequantize_blockwise_{_DTYPES[dtype]}_{qs.quant_type}"](
        None, data.data_ptr(), absmax.data_ptr(), out.data_ptr(), qs.blocksize, out.numel(), stream)
    return out
