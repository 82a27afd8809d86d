"""Memory readings for `eval --compare`: process RSS, CUDA allocation and the bytes held by a model."""

from __future__ import annotations

import os
import resource
import sys
from typing import Any


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (peak RSS where /proc is unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def cuda_allocated_mb() -> float | None:
    """CUDA memory allocated by torch on all devices, in MiB; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20, 1)


def weights_mb(model: Any) -> float:
    """Bytes of the model's parameters and buffers (quantized weights count at their packed size), in MiB."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:  # tied weights are counted once
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total / 2**20
