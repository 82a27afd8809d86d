"""Which GGML type each tensor gets, the Python encoders, and K-quants through llama-cpp-python.

f32, f16, bf16, q8_0 and q4_0 are produced here in Python (``gguf.quants``), with the same rules llama.cpp's
converter follows: 1-D tensors (norms, biases) stay f32, and a matrix whose rows are not a multiple of the
block size (32) falls back to f16. For q4_0 the token embedding and the output matrix are kept at q8_0,
because 4-bit errors there are paid on every token (llama.cpp's own quantizer also gives them more bits).

K-quants (q4_k_m, q5_k_m, q6_k) need llama.cpp's importance-aware block search, so they are made from an
f16/bf16 GGUF by ``llama_cpp.llama_model_quantize`` when llama-cpp-python is installed.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ExportError

logger = logging.getLogger(__name__)

PYTHON_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
KQUANT_TYPES = ("q4_k_m", "q5_k_m", "q6_k")
GGUF_TYPES = PYTHON_TYPES + KQUANT_TYPES

# Average bits per weight of the big matrices, used to estimate file sizes before writing.
BITS_PER_WEIGHT = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q4_0": 4.5,
                   "q4_k_m": 4.9, "q5_k_m": 5.7, "q6_k": 6.6}

CHUNK_BYTES = 32 * 2**20  # float32 rows quantized at once

LLAMA_CPP_HINT = ("install llama-cpp-python, which compiles llama.cpp (about 10 minutes on 2 cores): "
                  "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'loraforge[llamacpp]'; or export "
                  "`export_quantization: q8_0` / `q4_0`, which need no compiler")


def ggml_type(name: str) -> Any:
    """``"q8_0"`` -> ``gguf.GGMLQuantizationType.Q8_0`` (for the Python-made types)."""
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[name]


def file_type(name: str) -> Any:
    """The ``general.file_type`` value that describes a whole file quantized as ``name``."""
    import gguf

    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0,
            "q4_0": t.MOSTLY_Q4_0, "q4_k_m": t.MOSTLY_Q4_K_M, "q5_k_m": t.MOSTLY_Q5_K_M, "q6_k": t.MOSTLY_Q6_K}[name]


def tensor_type(gguf_name: str, shape: tuple[int, ...], target: str) -> Any:
    """The GGML type of one tensor when the file is quantized as ``target`` (one of PYTHON_TYPES)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or gguf_name.endswith("_norm.weight") or gguf_name.startswith("rope_freqs"):
        return q.F32
    wanted = ggml_type(target)
    if target == "q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
        wanted = q.Q8_0
    if wanted in (q.F32, q.F16, q.BF16):
        return wanted
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else q.F16


def stored_layout(shape: tuple[int, ...], qtype: Any) -> tuple[tuple[int, ...], Any, int]:
    """(shape given to GGUFWriter.add_tensor_info, numpy dtype of the data, number of bytes) for one tensor."""
    import gguf

    q = gguf.GGMLQuantizationType
    n = int(np.prod(shape))
    if qtype == q.F32:
        return tuple(shape), np.float32, 4 * n
    if qtype == q.F16:
        return tuple(shape), np.float16, 2 * n
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return tuple(byte_shape), np.uint8, int(np.prod(byte_shape))


def encode(tensor: Any, qtype: Any) -> np.ndarray:
    """A torch tensor -> the numpy array GGUFWriter writes for ``qtype`` (one tensor at a time)."""
    import gguf
    import torch

    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if qtype == q.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if qtype == q.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    # Quantize a block of rows at a time, so the float32 copy never exceeds CHUNK_BYTES (the embedding of a
    # 150k-token vocabulary would otherwise be copied whole to float32 first).
    rows = tensor.reshape(-1, tensor.shape[-1])
    out = np.empty(stored_layout((rows.shape[0], rows.shape[1]), qtype)[0], dtype=np.uint8)
    step = max(1, CHUNK_BYTES // (4 * rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step].to(torch.float32).contiguous().numpy()
        out[start:start + step] = gguf.quants.quantize(block, qtype)
    return out.reshape(stored_layout(tuple(tensor.shape), qtype)[0])


def require_llama_cpp(what: str) -> Any:
    """Import llama_cpp or raise an :class:`ExportError` that says how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"{what} needs llama-cpp-python, which is not installed", hint=LLAMA_CPP_HINT) from None
    return llama_cpp


def kquantize(src: Path, dst: Path, kind: str, threads: int | None = None) -> None:
    """Quantize the f16/bf16 GGUF ``src`` into ``dst`` as ``kind`` (q4_k_m, q5_k_m, q6_k) with llama.cpp."""
    llama_cpp = require_llama_cpp(f"`export_quantization: {kind}`")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(kind))
    params.nthread = threads or os.cpu_count() or 1
    logger.info("quantizing to %s with llama.cpp (llama_model_quantize)", kind)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp could not quantize {src.name} to {kind} (return code {rc})",
                          hint="check the log above; `export_quantization: q8_0` works without llama.cpp")
