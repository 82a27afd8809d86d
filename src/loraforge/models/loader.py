"""Load the tokenizer and the model the way a run needs them.

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg, tokenizer, is_trainable=True)   # dtype, attention, bitsandbytes, checkpointing, adapters
    print("\\n".join(summarize_model(model).lines()))
"""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError
from .adapters import setup_finetuning, split_names
from .hub import resolve_model_path, short_error
from .quantization import (
    build_quantization_config, enable_checkpointing, keep_loaded_layout, prepare_for_kbit_training,
    quiet_bitsandbytes_logs, upcast_norms,
)
from .summary import ModelSummary, summarize_model

if TYPE_CHECKING:
    import torch

    from ..config import ModelArguments, RunConfig

__all__ = ["ModelSummary", "compute_dtype", "load_model", "load_tokenizer", "resolve_model_path", "summarize_model"]

logger = logging.getLogger(__name__)
quiet_bitsandbytes_logs()  # before peft/transformers import bitsandbytes

ATTENTION = {"auto": None, "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager"}
_LOAD_ERRORS = (OSError, ValueError, ImportError, KeyError, RuntimeError)


def load_tokenizer(model_args: "ModelArguments") -> Any:
    """The model's tokenizer (right padding), with ``add_tokens`` / ``add_special_tokens`` added.

    Adding tokens turns ``resize_vocab`` on, so :func:`load_model` grows the embeddings to match.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(model_args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, use_fast=model_args.use_fast_tokenizer, split_special_tokens=model_args.split_special_tokens,
            padding_side="right", trust_remote_code=model_args.trust_remote_code)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {model_args.model_name_or_path} from {path} "
                             f"({short_error(exc)}); check the folder has tokenizer files, or set trust_remote_code: "
                             "true for custom tokenizers") from None
    added = 0
    normal = split_names(model_args.add_tokens)
    if normal:
        added += tokenizer.add_tokens(normal, special_tokens=False)
    special = split_names(model_args.add_special_tokens)
    if special:
        added += tokenizer.add_special_tokens({"extra_special_tokens": special}, replace_extra_special_tokens=False)
    if added:
        logger.info("added %d token(s) to the tokenizer; the embeddings will be resized", added)
        model_args.resize_vocab = True
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype(cfg: "RunConfig", *, is_trainable: bool) -> "torch.dtype":
    """Weights/compute dtype: from bf16/fp16/pure_bf16 when training, from infer_dtype otherwise; fp32 on CPU."""
    import torch

    if cfg.finetuning.pure_bf16 and is_trainable:
        return torch.bfloat16
    if not _has_cuda():
        explicit = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(cfg.model.infer_dtype)
        return explicit if (explicit is not None and not is_trainable) else torch.float32
    args = cfg.training
    if is_trainable and args is not None:
        return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    named = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if cfg.model.infer_dtype in named:
        return named[cfg.model.infer_dtype]
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _attention(model_args: "ModelArguments") -> str | None:
    impl = ATTENTION[model_args.flash_attn]
    if impl == "flash_attention_2":
        if not _has_cuda():
            raise ModelLoadError("flash_attn: fa2 needs a CUDA GPU; use flash_attn: sdpa (or auto) on this machine")
        if importlib.util.find_spec("flash_attn") is None:
            raise ModelLoadError("flash_attn: fa2 needs the flash-attn package (pip install flash-attn "
                                 "--no-build-isolation); or use flash_attn: sdpa")
    return impl


def _apply_rope_scaling(config: Any, cfg: "RunConfig", *, is_trainable: bool) -> None:
    kind = cfg.model.rope_scaling
    if not kind:
        return
    current = getattr(config, "max_position_embeddings", None)
    if not current:
        logger.warning("rope_scaling: %s ignored, the model config has no max_position_embeddings", kind)
        return
    target = cfg.data.cutoff_len
    if is_trainable and target <= current:
        logger.warning("rope_scaling: %s not applied: cutoff_len %d already fits the model's %d positions",
                       kind, target, current)
        return
    factor = float(math.ceil(target / current)) if is_trainable else 2.0
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update(rope_type=kind, factor=factor)
    if kind in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = current
    if kind == "llama3":
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    config.rope_parameters = params
    if kind != "dynamic":
        config.max_position_embeddings = int(current * factor)
    elif is_trainable:
        logger.warning("rope_scaling: dynamic NTK scaling is meant for inference; linear or yarn suits training")
    logger.info("rope scaling %s, factor %g: %d -> %d positions", kind, factor, current,
                config.max_position_embeddings)


def _sharded_training() -> bool:
    """DeepSpeed ZeRO-3 or FSDP: weights are partitioned, so no device_map and 4-bit storage in compute dtype."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return True
    except ImportError:
        pass
    try:
        from transformers.integrations.fsdp import is_fsdp_enabled

        return bool(is_fsdp_enabled())
    except ImportError:
        return False


def _device_map(model_args: "ModelArguments", quantized: bool, sharded: bool) -> Any:
    import os

    if sharded:
        return None
    if model_args.quantization_device_map:  # e.g. "auto": spread a large model over the visible GPUs
        return model_args.quantization_device_map
    if quantized:
        return {"": int(os.environ.get("LOCAL_RANK", "0"))} if _has_cuda() else {"": "cpu"}
    return None


def _load_weights(path: str, config: Any, cfg: "RunConfig", dtype: "torch.dtype", quant: Any, sharded: bool) -> Any:
    from transformers import AutoModelForCausalLM

    m = cfg.model
    kwargs = dict(dtype=dtype, attn_implementation=_attention(m), trust_remote_code=m.trust_remote_code)
    try:
        if m.train_from_scratch:
            return AutoModelForCausalLM.from_config(config, **kwargs)
        device_map = _device_map(m, quant is not None, sharded)
        if device_map is not None:
            kwargs["device_map"] = device_map
        if device_map == "auto":  # accelerate may put layers that fit in no memory on disk, in this folder
            kwargs["offload_folder"] = m.offload_folder
        if quant is not None:
            kwargs["quantization_config"] = quant
        return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load the model {m.model_name_or_path} from {path} ({short_error(exc)}); check "
                             "the folder holds config.json and *.safetensors, or set trust_remote_code: true for "
                             "custom architectures") from None


def _enable_checkpointing(model: Any, cfg: "RunConfig") -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        logger.warning("%s does not support gradient checkpointing; training without it", type(model).__name__)
        return
    enable_checkpointing(model, use_reentrant=cfg.model.use_reentrant_gc)
    if cfg.finetuning.finetuning_type != "full":  # frozen embeddings: checkpointed blocks still need input grads
        model.enable_input_require_grads()


def _fp32_head_output(model: Any) -> None:
    import torch

    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_hook(lambda _module, _args, output: output.to(torch.float32))


def _new_token_ids(tokenizer: Any, model_args: "ModelArguments") -> list[int]:
    """Ids of the tokens that ``add_tokens`` / ``add_special_tokens`` put into the tokenizer."""
    if tokenizer is None:
        return []
    names = split_names(model_args.add_tokens) + split_names(model_args.add_special_tokens)
    ids = tokenizer.convert_tokens_to_ids(names) if names else []
    return sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})


def load_model(cfg: "RunConfig", tokenizer: Any, *, is_trainable: bool, fast_path: bool = False) -> Any:
    """The model ready to train (``is_trainable``) or to run: weights, quantization, checkpointing, adapters.

    ``fast_path``: the run takes the fast path (:mod:`loraforge.models.fast`), which keeps norm weights in the
    model's 16-bit dtype (no fp32 residual stream)."""
    from transformers import AutoConfig

    m = cfg.model
    path = resolve_model_path(m)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot read the config of {m.model_name_or_path} ({short_error(exc)}); set "
                             "trust_remote_code: true for custom architectures, or update transformers") from None
    dtype = compute_dtype(cfg, is_trainable=is_trainable)
    _apply_rope_scaling(config, cfg, is_trainable=is_trainable)
    if is_trainable:
        config.use_cache = False
    quant = None
    if m.quantization_bit is not None:
        if getattr(config, "quantization_config", None) is not None:
            logger.warning("%s is already quantized (%s); quantization_bit: %s is ignored", m.model_name_or_path,
                           config.quantization_config.get("quant_method", "?")
                           if isinstance(config.quantization_config, dict) else "?", m.quantization_bit)
        else:
            quant = build_quantization_config(m, dtype, zero3_or_fsdp=_sharded_training())
    model = _load_weights(path, config, cfg, dtype, quant, _sharded_training())
    keep_loaded_layout(model)  # training, evaluation, chat and merges all read the weights as loaded

    new_token_ids = _new_token_ids(tokenizer, m)
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        new_token_ids = sorted(set(new_token_ids) | set(range(rows, len(tokenizer))))
        logger.info("resized the embeddings from %d to %d rows for %d tokens", rows,
                    model.get_input_embeddings().weight.shape[0], len(tokenizer))
    if m.upcast_layernorm:
        upcast_norms(model)
    if m.upcast_lmhead_output:
        _fp32_head_output(model)

    fsdp_qlora = is_trainable and quant is not None and bool(getattr(cfg.training, "fsdp", None))
    if is_trainable:
        gradient_checkpointing = not m.disable_gradient_checkpointing
        if quant is not None:
            prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing,
                                      use_reentrant=m.use_reentrant_gc, upcast=not (fast_path or fsdp_qlora))
        elif gradient_checkpointing:
            _enable_checkpointing(model, cfg)
    model = setup_finetuning(cfg, model, is_trainable=is_trainable, new_token_ids=new_token_ids)
    if fsdp_qlora:  # FSDP flattens each wrapped block into one tensor of one dtype: 4-bit storage, norms, LoRA
        cast_floating(model, dtype)
    if is_trainable:
        model.train()
    else:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    if m.print_param_status:
        for name, param in model.named_parameters():
            logger.info("%s: %s %s %s", name, tuple(param.shape), param.dtype,
                        "trainable" if param.requires_grad else "frozen")
    return model


def cast_floating(model: Any, dtype: Any) -> int:
    """Cast every floating-point parameter that is not ``dtype`` to it (FSDP-QLoRA: the 4-bit weights are stored
    in ``dtype`` and FSDP needs one dtype per wrapped block); returns how many were cast. The adapter trains in
    ``dtype`` then, as in the published FSDP-QLoRA recipes."""
    count = 0
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += 1
    return count
