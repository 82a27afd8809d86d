"""Stream a Hugging Face model folder (config, tokenizer, safetensors shards) into one GGUF file.

The file is written in two passes over the tensor *headers* and one pass over the data: the GGUF header needs
every tensor's name, type and size up front, which safetensors gives without reading any weights; then each
tensor is read from its shard, converted, quantized and written before the next one is touched. Converting a
model therefore needs little more memory than its largest tensor.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ExportError
from .arch import HParams, gguf_tensor_name, llama3_rope_factors, read_hparams, to_gguf_layout, write_hparams
from .quantize import (GGUF_TYPES, KQUANT_TYPES, encode, file_type, kquantize, stored_layout,
                       tensor_type)
from .tokenizer import build_vocab, write_vocab

logger = logging.getLogger(__name__)


@dataclass
class GGUFReport:
    """What was written: path, size, tensor count per GGML type, the pre-tokenizer and the time taken."""

    path: Path
    quantization: str
    n_tensors: int
    n_bytes: int
    seconds: float
    pre_tokenizer: str
    types: dict[str, int] = field(default_factory=dict)


@dataclass
class _Planned:
    gguf_name: str
    hf_name: str | None      # None for tensors computed here (rope_freqs)
    shard: Path | None
    qtype: Any
    stored_shape: tuple[int, ...]
    np_dtype: Any
    nbytes: int


def read_config(model_dir: Path) -> dict[str, Any]:
    """The model's ``config.json`` as a dict; an :class:`ExportError` names the folder when it is missing."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir} has no config.json; it is not a Hugging Face model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def tensor_shards(model_dir: Path) -> dict[str, Path]:
    """Every tensor name -> the safetensors file holding it (from the index when the model is sharded)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {name: model_dir / shard for name, shard in weight_map.items()}
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise ExportError(f"{model_dir} holds no .safetensors weights",
                          hint="GGUF export reads safetensors; re-save the model with save_pretrained")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            out.update({name: shard for name in f.keys()})
    return out


def tensor_shapes(shards: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(shards.values())):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _order_key(gguf_name: str) -> tuple[int, int, str]:
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    if m:
        return (1, int(m.group(1)), gguf_name)
    return (0 if gguf_name in ("rope_freqs.weight", "token_embd.weight") else 2, 0, gguf_name)


def _plan(model_dir: Path, hp: HParams, target: str) -> list[_Planned]:
    shards = tensor_shards(model_dir)
    shapes = tensor_shapes(shards)
    plans: list[_Planned] = []
    for hf_name in shards:
        gguf_name = gguf_tensor_name(hf_name, hp)
        if gguf_name is None:
            continue
        shape = shapes[hf_name]
        qtype = tensor_type(gguf_name, shape, target)
        plans.append(_Planned(gguf_name, hf_name, shards[hf_name], qtype, *stored_layout(shape, qtype)))
    names = {p.gguf_name for p in plans}
    if "token_embd.weight" not in names:
        raise ExportError(f"{model_dir} has no model.embed_tokens.weight; the weights are incomplete")
    if not hp.tie_word_embeddings and "output.weight" not in names:
        raise ExportError(f"{model_dir}: config.json says the embeddings are not tied, but there is no "
                          "lm_head.weight", hint="set `tie_word_embeddings: true` in config.json if they are tied")
    factors = llama3_rope_factors(hp)
    if factors is not None:
        qtype = tensor_type("rope_freqs.weight", factors.shape, target)
        plans.append(_Planned("rope_freqs.weight", None, None, qtype, *stored_layout(factors.shape, qtype)))
    return sorted(plans, key=lambda p: _order_key(p.gguf_name))


def _write(model_dir: Path, out_path: Path, target: str, name: str, file_kind: str) -> GGUFReport:
    import gguf
    import torch
    from safetensors import safe_open

    start = time.perf_counter()
    config = read_config(model_dir)
    hp = read_hparams(config, str(model_dir / "config.json"))
    vocab = build_vocab(model_dir, hp.vocab_size, config)
    plans = _plan(model_dir, hp, target)

    writer = gguf.GGUFWriter(path=None, arch=hp.spec.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    write_hparams(writer, hp)
    writer.add_file_type(int(file_type(file_kind)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, vocab)
    for p in plans:
        writer.add_tensor_info(p.gguf_name, p.stored_shape, np.dtype(p.np_dtype), p.nbytes,
                               raw_dtype=None if p.np_dtype is not np.uint8 else p.qtype)
    writer.write_header_to_file(path=out_path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    types: dict[str, int] = {}
    try:
        for i, p in enumerate(plans):
            if p.hf_name is None:
                tensor = torch.from_numpy(llama3_rope_factors(hp))
            else:
                # Open the shard per tensor: its memory map (and the pages it touched) goes away right after.
                with safe_open(str(p.shard), framework="pt") as f:
                    tensor = f.get_tensor(p.hf_name)
            data = encode(to_gguf_layout(p.gguf_name, tensor, hp), p.qtype)
            writer.write_tensor_data(data)
            types[p.qtype.name] = types.get(p.qtype.name, 0) + 1
            del tensor, data
            if (i + 1) % 50 == 0:
                logger.info("  %d/%d tensors written", i + 1, len(plans))
    finally:
        writer.close()
    return GGUFReport(path=out_path, quantization=file_kind, n_tensors=len(plans),
                      n_bytes=out_path.stat().st_size, seconds=time.perf_counter() - start,
                      pre_tokenizer=vocab.pre, types=types)


def convert_to_gguf(model_dir: str | Path, out_path: str | Path, quantization: str = "f16", *,
                    name: str | None = None) -> GGUFReport:
    """Write the Hugging Face model in ``model_dir`` as a GGUF file quantized as ``quantization``.

    ``quantization`` is one of f32, f16, bf16, q8_0, q4_0 (made in Python) or q4_k_m, q5_k_m, q6_k (made by
    llama.cpp from an intermediate 16-bit GGUF, which is deleted afterwards).
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if quantization not in GGUF_TYPES:
        raise ExportError(f"`export_quantization: {quantization}` is not one of {', '.join(GGUF_TYPES)}")
    name = name or model_dir.name
    logger.info("writing GGUF %s (%s) from %s", out_path.name, quantization, model_dir)
    if quantization not in KQUANT_TYPES:
        try:
            report = _write(model_dir, out_path, quantization, name, quantization)
        except BaseException:
            out_path.unlink(missing_ok=True)  # never leave a truncated GGUF behind
            raise
    else:
        from .quantize import require_llama_cpp

        require_llama_cpp(f"`export_quantization: {quantization}`")  # fail before the long 16-bit pass
        config = read_config(model_dir)
        base = "bf16" if str(config.get("dtype") or config.get("torch_dtype")) == "bfloat16" else "f16"
        tmp = out_path.with_name(f".{out_path.stem}.{base}.tmp.gguf")
        try:
            report = _write(model_dir, tmp, base, name, base)
            start = time.perf_counter()
            kquantize(tmp, out_path, quantization)
            report.seconds += time.perf_counter() - start
        except BaseException:
            out_path.unlink(missing_ok=True)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        report.path, report.quantization, report.n_bytes = out_path, quantization, out_path.stat().st_size
        report.types = {}
    logger.info("wrote %s: %d tensors, %.1f MiB in %.1f s (pre-tokenizer %s)", out_path.name, report.n_tensors,
                report.n_bytes / 2**20, report.seconds, report.pre_tokenizer)
    return report
