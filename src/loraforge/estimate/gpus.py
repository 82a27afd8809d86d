"""Known GPUs (memory as PyTorch reports it) and detection of the GPUs of this machine."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class GPU:
    """A GPU model: ``memory_gib`` is what ``torch.cuda.get_device_properties().total_memory`` reports."""

    name: str
    memory_gib: float
    bf16: bool
    description: str


# total_memory as PyTorch reports it (a little under the marketing size: the driver keeps a share).
KNOWN_GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("T4", 14.75, False, "NVIDIA T4, 16 GB GDDR6 (Turing: fp16, no bf16)"),
    GPU("T10", 14.75, False, "NVIDIA T10, 16 GB GDDR6 (Turing: fp16, no bf16)"),
    GPU("V100", 15.77, False, "NVIDIA V100 16 GB (Volta: fp16, no bf16)"),
    GPU("V100-32", 31.74, False, "NVIDIA V100 32 GB (Volta: fp16, no bf16)"),
    GPU("A10", 22.2, True, "NVIDIA A10 / A10G, 24 GB"),
    GPU("3090", 23.69, True, "GeForce RTX 3090, 24 GB"),
    GPU("4090", 23.65, True, "GeForce RTX 4090, 24 GB"),
    GPU("A100-40", 39.39, True, "NVIDIA A100 40 GB"),
    GPU("A100-80", 79.15, True, "NVIDIA A100 80 GB"),
    GPU("H100", 79.1, True, "NVIDIA H100 80 GB"),
    GPU("H200", 139.8, True, "NVIDIA H200 141 GB"),
)}
_ALIASES = {"RTX3090": "3090", "RTX4090": "4090", "A10G": "A10", "A100": "A100-80", "A100-80G": "A100-80",
            "A100-40G": "A100-40", "V100-16": "V100", "TESLA-T4": "T4"}


def gpu_names() -> list[str]:
    """Names accepted by ``--gpu``."""
    return list(KNOWN_GPUS)


def find_gpu(name: str) -> GPU:
    """The known GPU called ``name`` (case and separators ignored); :class:`ConfigError` lists the valid ones."""
    key = re.sub(r"[\s_]+", "-", name.strip().upper()).replace("GB", "")
    key = key.replace("RTX-", "RTX").replace("GEFORCE-", "")
    key = _ALIASES.get(key, key)
    for gpu in KNOWN_GPUS.values():
        if gpu.name.upper() == key:
            return gpu
    raise ConfigError([f"unknown GPU {name!r}; known: {', '.join(gpu_names())} (or give --gpu-mem in GiB)"])


@dataclass(frozen=True)
class DetectedGPU:
    """One CUDA device of this machine."""

    index: int
    name: str
    memory_gib: float
    bf16: bool
    known: GPU | None

    def as_gpu(self) -> GPU:
        """This device as a :class:`GPU` (its own memory size, the known model's description if matched)."""
        label = self.known.name if self.known else self.name
        return GPU(label, round(self.memory_gib, 2), self.bf16, f"{self.name} (detected, cuda:{self.index})")


def match_device_name(device_name: str, memory_gib: float) -> GPU | None:
    """The known GPU whose name appears in a CUDA device name such as 'NVIDIA A100-SXM4-80GB'."""
    upper = device_name.upper()
    if "A100" in upper:
        return KNOWN_GPUS["A100-80" if memory_gib > 60 else "A100-40"]
    if "V100" in upper:
        return KNOWN_GPUS["V100-32" if memory_gib > 20 else "V100"]
    for name in ("H200", "H100", "A10", "T10", "T4", "3090", "4090"):
        if re.search(rf"(?<![0-9A-Z]){name}(?![0-9])", upper):
            return KNOWN_GPUS[name]
    return None


def detect_gpus() -> list[DetectedGPU]:
    """The CUDA GPUs of this machine; an empty list on a CPU-only machine or without torch."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        memory_gib = props.total_memory / 2**30
        found.append(DetectedGPU(index, props.name, memory_gib, props.major >= 8,
                                 match_device_name(props.name, memory_gib)))
    return found
