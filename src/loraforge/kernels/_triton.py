"""Triton, when it imports, and stand-ins that let the kernel modules import without it.

The op modules define their ``@jit`` kernels at import time. On a machine without Triton (CPU builds of
PyTorch) ``jit`` leaves the function as plain Python and ``tl.constexpr`` is a placeholder, so the module
still imports and its reference path works; ``use_triton`` is then always False, so the kernels are never
launched.
"""

from __future__ import annotations

import functools
import types

import torch

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:
    triton = None
    tl = types.SimpleNamespace(constexpr=int)

    def jit(fn):
        """Leaves ``fn`` undecorated; it is never launched without Triton."""
        return fn


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """Ceil division, for grid sizes."""
    return -(-a // b)


def program_count(device) -> int:
    """How many persistent programs to launch for loops over rows: a few per SM on a GPU.

    On the CPU (the Triton interpreter in tests) a small fixed count still exercises the loop.
    """
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 3


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


__all__ = ["cdiv", "jit", "next_power_of_2", "program_count", "tl", "triton"]
