"""Fused ops for the training fast path.

Each op lives in its own module with a pure-PyTorch reference (``<op>_reference``) beside its Triton
version. The choice between them is made here, in :func:`use_triton`, and nowhere else: CPU tensors,
machines without Triton and ``LORAFORGE_KERNELS=reference`` take the reference, so any numeric doubt can be
settled by running both. ``linear_cross_entropy`` chunks its tokens on every device (its win is memory);
only the per-chunk softmax/gradient step switches between a Triton kernel and PyTorch ops.

The Triton kernels are proven against the references under ``TRITON_INTERPRET=1`` on CPU, compiled for
sm_90 without a GPU, and run in bf16 on a GPU by the ``gpu`` tests (``tests/test_kernels_*.py``).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    """True when ``triton`` imports (it ships with CUDA builds of PyTorch; CPU builds lack it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether the ops should run their Triton kernels for tensor ``t``.

    True when ``t`` is on a CUDA device, Triton imports, and the environment variable
    ``LORAFORGE_KERNELS`` is not ``reference`` (read on every call, so a test or a debugging session can
    flip it without re-importing).
    """
    return t.is_cuda and os.environ.get("LORAFORGE_KERNELS", "") != "reference" and triton_available()


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA ``device`` (its index, or the current one), asked once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in CAPABILITY:
        CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return CAPABILITY[index]


CAPABILITY: dict[int, tuple[int, int]] = {}


from loraforge.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402
from loraforge.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from loraforge.kernels.rope import apply_rope, apply_rope_reference  # noqa: E402
from loraforge.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

__all__ = [
    "CAPABILITY",
    "apply_rope",
    "apply_rope_reference",
    "cuda_capability",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "triton_available",
    "use_triton",
]
