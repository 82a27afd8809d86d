"""Merge LoRA adapters into their base model and save it as sharded safetensors with its tokenizer.

Adapters are merged one after the other into a base loaded in 16 or 32 bits, on the CPU or (``export_device:
auto``) the GPU. A QLoRA adapter (trained on a
4- or 8-bit base) is merged into the base *reloaded at 16 bits*: merging into quantized weights would either
fail or bake the quantization error into every weight, so the 4-bit base is never used here.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import ExportError, ModelLoadError

if TYPE_CHECKING:
    from ..config import RunConfig

logger = logging.getLogger(__name__)

DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def adapter_paths(cfg: "RunConfig") -> list[str]:
    """The adapters to merge, in order, resolved to local folders (hub ids are downloaded by models/)."""
    raw = cfg.model.adapter_name_or_path
    from ..models.hub import resolve_adapter_path

    names = [n.strip() for n in raw.split(",") if n.strip()] if raw else []
    out = []
    for name in names:
        path = resolve_adapter_path(name, cfg.model)
        if not (Path(path) / "adapter_config.json").is_file():
            raise ModelLoadError(f"adapter {name!r} has no adapter_config.json (looked in {path})",
                                 hint="point `adapter_name_or_path` at the output_dir of a LoRA training run")
        out.append(str(path))
    return out


def trained_quantization_bit(cfg: "RunConfig", adapters: list[str]) -> int | None:
    """The bits of the base an adapter was trained on (QLoRA), from the config or the run's run_config.yaml."""
    if cfg.model.quantization_bit:
        return int(cfg.model.quantization_bit)
    for adapter in adapters:
        for folder in (Path(adapter), Path(adapter).parent):
            run_config = folder / "run_config.yaml"
            if run_config.is_file():
                try:
                    bits = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("quantization_bit")
                except yaml.YAMLError:
                    bits = None
                if bits:
                    return int(bits)
                break
    return None


def resolve_dtype(export_dtype: str, base_config: dict[str, Any]) -> str:
    """``export_dtype`` as a torch dtype name; ``auto`` keeps the base's dtype (bfloat16 when it is unknown)."""
    if export_dtype != "auto":
        return DTYPES[export_dtype]
    found = str(base_config.get("dtype") or base_config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return DTYPES.get(found, "bfloat16")


def load_export_tokenizer(cfg: "RunConfig", adapters: list[str]) -> Any:
    """The tokenizer the model was trained with: the last adapter's saved tokenizer when it has one.

    A training run saves its tokenizer with the chat template it used; that is the template to export. Without
    one, the base tokenizer is used, with the config's ``template`` applied when one is set.
    """
    from transformers import AutoTokenizer

    for adapter in reversed(adapters):
        if all((Path(adapter) / f).is_file() for f in TOKENIZER_FILES):
            logger.info("tokenizer and chat template from the adapter folder %s", adapter)
            return AutoTokenizer.from_pretrained(adapter)
    from ..models.loader import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if cfg.data.template:
        from ..data.templates import resolve_template

        resolve_template(cfg.data, tokenizer).apply_to_tokenizer(tokenizer)
    return tokenizer


def merge_device(export_device: str) -> str:
    """Where merging runs: ``cpu``, or for ``auto`` the GPU when one is visible (faster for large models)."""
    import torch

    return "cuda" if export_device == "auto" and torch.cuda.is_available() else "cpu"


def load_base_model(cfg: "RunConfig", tokenizer: Any, dtype: str, quant_bits: int | None) -> Any:
    """The base model in ``dtype`` on the ``export_device``, never quantized, with no adapter attached."""
    import torch

    if quant_bits:
        logger.info("the adapter was trained with QLoRA on a %d-bit base: merging into the base reloaded in %s, "
                    "not into the %d-bit weights", quant_bits, dtype, quant_bits)
    base_cfg = copy.deepcopy(cfg)
    base_cfg.model.quantization_bit = None
    base_cfg.model.adapter_name_or_path = None
    base_cfg.model.infer_dtype = dtype
    from ..models.loader import load_model

    model = load_model(base_cfg, tokenizer, is_trainable=False)
    target = getattr(torch, dtype)
    if next(model.parameters()).dtype != target:
        model = model.to(target)
    device = merge_device(cfg.export.export_device)
    logger.info("merging on %s (export_device: %s)", device, cfg.export.export_device)
    return model.to(device).eval()


def merge_adapters(model: Any, adapters: list[str]) -> Any:
    """Apply each adapter in turn and fold it into the weights; returns a plain transformers model."""
    from peft import PeftModel

    for path in adapters:
        logger.info("merging adapter %s", path)
        try:
            peft_model = PeftModel.from_pretrained(model, path, is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as err:
            raise ExportError(f"adapter {path} does not fit the base model: {err}",
                              hint="check that `model_name_or_path` is the base the adapter was trained on") from None
        model = peft_model.merge_and_unload(safe_merge=True)
    return model


def save_merged(model: Any, tokenizer: Any, out_dir: Path, max_shard_size: str) -> None:
    """Sharded safetensors (``max_shard_size`` each, e.g. ``"5GB"``), config, generation config and tokenizer."""
    from transformers import GenerationConfig

    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if model.generation_config is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos = [e for e in eos if e is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.insert(0, tokenizer.eos_token_id)  # the template's end-of-turn token must stop generation
    gen.eos_token_id = eos if len(eos) != 1 else eos[0]
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "generation_config.json").is_file():
        gen.save_pretrained(str(out_dir))
