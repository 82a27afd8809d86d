"""A PEFT LoRA adapter alone as a GGUF adapter, for ``llama-cli --lora`` / ``llama_cpp.Llama(lora_path=...)``.

llama.cpp adds ``scale * B @ A`` to each weight with ``scale = alpha / rank``, which is PEFT's default scaling;
rsLoRA (``alpha / sqrt(rank)``) is written as an equivalent alpha. Things llama.cpp adapters cannot express —
DoRA magnitudes, per-module ranks or alphas, fully trained modules (``modules_to_save``), embedding LoRA — are
refused with a pointer to the merged export, which handles all of them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from ...errors import ExportError
from .arch import gguf_tensor_name, read_hparams, to_gguf_layout

logger = logging.getLogger(__name__)

_PREFIX = "base_model.model."
_MERGED_HINT = "export the merged model instead (`export_lora_gguf: false`), which supports every adapter"


def _effective_alpha(adapter_config: dict, source: Path) -> float:
    if adapter_config.get("use_dora"):
        raise ExportError(f"{source}: DoRA adapters cannot be written as a llama.cpp LoRA adapter", hint=_MERGED_HINT)
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ExportError(f"{source}: per-module ranks or alphas (rank_pattern/alpha_pattern) cannot be written as "
                          "a llama.cpp LoRA adapter", hint=_MERGED_HINT)
    if adapter_config.get("modules_to_save"):
        raise ExportError(f"{source}: the adapter also trains whole modules ({adapter_config['modules_to_save']}), "
                          "which a llama.cpp LoRA adapter cannot carry", hint=_MERGED_HINT)
    rank = float(adapter_config["r"])
    alpha = float(adapter_config.get("lora_alpha") or rank)
    return alpha * math.sqrt(rank) if adapter_config.get("use_rslora") else alpha


def convert_lora_to_gguf(adapter_dir: str | Path, base_config: dict, out_path: str | Path) -> Path:
    """Write the adapter in ``adapter_dir`` (PEFT format) as a GGUF adapter for the base described by ``base_config``."""
    import gguf
    import torch
    from safetensors.torch import load_file

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    cfg_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise ExportError(f"{adapter_dir} is not a PEFT LoRA adapter (adapter_config.json and "
                          "adapter_model.safetensors are needed)")
    adapter_config = json.loads(cfg_path.read_text(encoding="utf-8"))
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{cfg_path}: `peft_type: {adapter_config.get('peft_type')}` is not LoRA", hint=_MERGED_HINT)
    alpha = _effective_alpha(adapter_config, cfg_path)
    hp = read_hparams(base_config)
    tensors = load_file(str(weights))

    writer = gguf.GGUFWriter(path=None, arch=hp.spec.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(adapter_dir.name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    count = 0
    for key in sorted(tensors):
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for hf_part, gguf_part in ((".lora_A.weight", ".lora_a"), (".lora_B.weight", ".lora_b")):
            if name.endswith(hf_part):
                module = name[: -len(hf_part)]
                break
        else:
            raise ExportError(f"{weights}: tensor {key!r} is not a LoRA A/B matrix of a linear layer", hint=_MERGED_HINT)
        base_name = gguf_tensor_name(module + ".weight", hp)
        if base_name is None:  # lm_head with tied embeddings: llama.cpp has no separate matrix to adapt
            raise ExportError(f"{weights}: the adapter changes {module}, which the GGUF model shares with the "
                              "token embedding (tied embeddings)", hint=_MERGED_HINT)
        data = tensors[key].to(torch.float32)
        if gguf_part == ".lora_b":  # B's rows are the weight's rows: same layout change as the weight
            data = to_gguf_layout(base_name, data, hp)
        writer.add_tensor(base_name + gguf_part, np.ascontiguousarray(data.numpy()))
        count += 1
    if count == 0:
        raise ExportError(f"{weights} holds no LoRA matrices")
    writer.write_header_to_file(path=out_path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("wrote LoRA adapter %s: %d tensors, alpha %g", out_path.name, count, alpha)
    return out_path
