"""What gets trained: LoRA adapters (peft), freeze tuning of some layers, or the full model.

``setup_finetuning`` is called by the loader once the base model is loaded; ``loraplus_param_groups`` is
called by the trainer to build the LoRA+ optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import ModelLoadError
from .hub import resolve_adapter_path
from .quantization import is_quantized

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig

logger = logging.getLogger(__name__)


def split_names(value: str | None) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (empty for None or blanks)."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _linear_types() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    types: list[type] = [torch.nn.Linear, Conv1D]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:
        pass
    return tuple(types)


def find_linear_modules(model: Any) -> list[str]:
    """Names for LoRA ``all``: every linear layer (also bitsandbytes 4/8-bit ones) except the output head.

    Returns short names (``q_proj``) in model order; when a short name is shared with the output head, the
    full module names are returned instead so the head can never be picked up by a suffix match.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear, heads, full = {}, set(), []
    for name, module in model.named_modules():
        if not isinstance(module, _linear_types()):
            continue
        parts = [p for p in name.split(".") if p not in ("base_layer", "original_module")]  # peft wrappers
        if any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
            continue
        name, leaf = ".".join(parts), parts[-1]
        if module is output or leaf == "lm_head":
            heads.add(leaf)
            continue
        linear.setdefault(leaf, None)
        full.append(name)
    if not linear:
        raise ModelLoadError(f"lora_target: all found no linear layers in {type(model).__name__}; give the "
                             "module names with lora_target (e.g. q_proj,v_proj)")
    return full if heads & set(linear) else list(linear)


def _check_targets(model: Any, targets: list[str]) -> None:
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]  # peft's matching
    if unknown:
        available = ",".join(find_linear_modules(model)[:16])
        raise ModelLoadError(f"lora_target: {','.join(unknown)} not found in {type(model).__name__}; its linear "
                             f"layers are {available} (or use lora_target: all)")


def _input_embedding_name(model: Any) -> str:
    wanted = model.get_input_embeddings()
    return next(name.split(".")[-1] for name, module in model.named_modules() if module is wanted)


def cast_trainable_to_fp32(model: Any) -> None:
    """Keep trainable weights in fp32 for mixed-precision training (the frozen base stays in 16 bits)."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)


def setup_finetuning(cfg: "RunConfig", model: Any, *, is_trainable: bool,
                     new_token_ids: list[int] | None = None) -> Any:
    """Apply ``finetuning_type``: load/merge adapters, add a new LoRA, or choose the trainable layers.

    ``new_token_ids`` (tokens added to the tokenizer) get trainable embedding rows with LoRA, saved in the adapter.
    """
    kind = cfg.finetuning.finetuning_type
    if kind == "lora" or cfg.model.adapter_name_or_path:
        model = _setup_lora(cfg, model, is_trainable=is_trainable, new_token_ids=new_token_ids or [])
    elif is_trainable and kind == "freeze":
        _setup_freeze(cfg, model)
        if new_token_ids and not model.get_input_embeddings().weight.requires_grad:
            logger.warning("freeze tuning: the %d added token(s) keep untrained embeddings; add embed_tokens to "
                           "freeze_extra_modules to train them", len(new_token_ids))
    elif is_trainable and kind == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    if is_trainable and not cfg.finetuning.pure_bf16:
        cast_trainable_to_fp32(model)
    return model


def _lora_config(cfg: "RunConfig", model: Any, new_token_ids: list[int]) -> Any:
    from peft import LoraConfig, TaskType

    f = cfg.finetuning
    targets = split_names(f.lora_target)
    if targets == ["all"]:
        targets = find_linear_modules(model)
    else:
        _check_targets(model, targets)
    modules_to_save = split_names(f.additional_target)
    embedding = _input_embedding_name(model)
    # Added tokens need learnt embedding rows: train just those rows (peft trainable tokens, tied head included),
    # unless the whole embedding is already trained through additional_target.
    token_rows = {embedding: sorted(set(new_token_ids))} if new_token_ids and embedding not in modules_to_save else None
    init: bool | str = True
    if f.pissa_init:
        init = "pissa" if f.pissa_iter == -1 else f"pissa_niter_{f.pissa_iter}"
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=f.lora_rank, lora_alpha=f.lora_alpha or 2 * f.lora_rank,
        lora_dropout=f.lora_dropout, target_modules=targets, use_rslora=f.use_rslora, use_dora=f.use_dora,
        modules_to_save=modules_to_save or None, init_lora_weights=init, trainable_token_indices=token_rows,
    )


def _setup_lora(cfg: "RunConfig", model: Any, *, is_trainable: bool, new_token_ids: list[int]) -> Any:
    from peft import PeftModel, get_peft_model

    f, m = cfg.finetuning, cfg.model
    adapters = [resolve_adapter_path(name, m) for name in split_names(m.adapter_name_or_path)]
    quantized = is_quantized(model)
    if quantized and len(adapters) > 1:
        raise ModelLoadError("adapter_name_or_path: a quantized (quantization_bit) model takes a single adapter; "
                             "merge the others first (loraforge export) or load without quantization_bit")
    if quantized and adapters and f.create_new_adapter:
        raise ModelLoadError("create_new_adapter: true merges adapter_name_or_path into the base weights, which "
                             "cannot be done on a quantized model; drop quantization_bit or create_new_adapter")
    if adapters and (quantized or (is_trainable and not f.create_new_adapter)):
        to_merge, to_resume = adapters[:-1], adapters[-1]
    else:
        to_merge, to_resume = adapters, None
    pissa = f.pissa_init if to_resume is None else False
    pissa = pissa or any(_is_pissa_adapter(path) for path in adapters)
    with warnings.catch_warnings(), _fixed_rng(enabled=pissa):
        # peft reads transformers 5's deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        for path in to_merge:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
            logger.info("merged adapter %s into the base weights", path)
        if to_resume is not None:
            model = PeftModel.from_pretrained(model, to_resume, is_trainable=is_trainable)
            logger.info("loaded adapter %s (%s)", to_resume, "training it further" if is_trainable else "inference")
        elif is_trainable:
            model = get_peft_model(model, _lora_config(cfg, model, new_token_ids))
    return model


PISSA_SEED = 1234


def _is_pissa_adapter(path: str) -> bool:
    import json
    import os

    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as handle:
            init = json.load(handle).get("init_lora_weights")
    except (OSError, ValueError):
        return False
    return isinstance(init, str) and init.startswith("pissa")


@contextlib.contextmanager
def _fixed_rng(*, enabled: bool) -> Iterator[None]:
    """Run PiSSA adapter creation/loading under a fixed RNG seed, leaving the caller's RNG state untouched.

    PiSSA with fast SVD (``pissa_niter_N``) uses a randomized SVD both when the adapter is created and when peft
    loads it again (it rebuilds the residual base weights); the same seed on both sides makes a saved PiSSA
    adapter reproduce its logits. Other LoRA weights are unaffected: their A matrices are saved and reloaded.
    """
    import torch

    if not enabled:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(PISSA_SEED)
        yield


def save_pissa_initial(model: Any, output_dir: str) -> str | None:
    """Save the untrained PiSSA adapter to ``output_dir/pissa_init`` (before training); None when not PiSSA.

    Saving the final adapter with ``model.save_pretrained(out, path_initial_model_for_weight_conversion=<that
    folder>)`` then converts it into a plain LoRA (rank 2r) that applies to the original base weights, which is
    what ``pissa_convert: true`` asks for.
    """
    import os

    config = getattr(model, "peft_config", {}).get("default")
    init = getattr(config, "init_lora_weights", None)
    if not (isinstance(init, str) and init.startswith("pissa")):
        return None
    folder = os.path.join(output_dir, "pissa_init")
    model.save_pretrained(folder)
    return folder


def _decoder_layers(model: Any) -> tuple[str, int]:
    """The qualified name and length of the model's stack of decoder blocks (``model.layers``, ``h``, ...)."""
    import torch

    n_layers = getattr(model.config, "num_hidden_layers", None)
    if n_layers is None and hasattr(model.config, "get_text_config"):
        n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and (n_layers is None or len(module) == n_layers):
            if best is None or len(module) > best[1]:
                best = (name, len(module))
    if best is None:
        raise ModelLoadError(f"finetuning_type: freeze cannot find the decoder layers of {type(model).__name__}; "
                             "use finetuning_type: lora or full")
    return best


def _setup_freeze(cfg: "RunConfig", model: Any) -> None:
    f = cfg.finetuning
    prefix, n_layers = _decoder_layers(model)
    k = f.freeze_trainable_layers
    layer_ids = list(range(max(0, n_layers - k), n_layers)) if k > 0 else list(range(min(-k, n_layers)))
    modules = split_names(f.freeze_trainable_modules)
    layer0 = {part for name, _ in model.named_modules() if name.startswith(f"{prefix}.0.")
              for part in name[len(prefix) + 3:].split(".")}
    unknown = [mod for mod in modules if mod != "all" and mod not in layer0]
    if unknown:
        raise ModelLoadError(f"freeze_trainable_modules: {','.join(unknown)} not found in the decoder layers; "
                             f"they contain {','.join(sorted(p for p in layer0 if not p.isdigit()))} (or use all)")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, param in model.named_parameters():
        for i in layer_ids:
            start = f"{prefix}.{i}."
            if name.startswith(start):
                parts = name[len(start):].split(".")
                if "all" in modules or any(mod in parts for mod in modules):
                    param.requires_grad_(True)
    for extra in split_names(f.freeze_extra_modules):
        hits = [module for name, module in model.named_modules() if extra in name.split(".")]
        if not hits:
            top = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n and not n.startswith(prefix)})
            raise ModelLoadError(f"freeze_extra_modules: {extra} not found in {type(model).__name__}; modules "
                                 f"outside the layers are {','.join(top)}")
        for module in hits:
            for param in module.parameters():
                param.requires_grad_(True)
    logger.info("freeze tuning: layers %s of %d trainable (%s)", _span(layer_ids), n_layers, ",".join(modules))


def _span(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0]) if ids else "none"


def loraplus_param_groups(model: Any, lr: float, ratio: float, weight_decay: float,
                          embedding_lr: float) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024): ``lora_B`` learns ``ratio`` times faster.

    Groups: LoRA A and other trainable weights at ``lr``; LoRA B at ``lr * ratio``; LoRA embedding adapters at
    ``embedding_lr``. Biases, norms and other 1-D tensors get no weight decay.
    """
    buckets: dict[tuple[str, bool], list["torch.nn.Parameter"]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_embedding_" in name:
            kind = "embedding"
        elif "lora_B" in name:
            kind = "lora_B"
        else:
            kind = "other"
        decay = param.ndim >= 2 and not name.endswith("bias") and "norm" not in name.lower()
        buckets.setdefault((kind, decay), []).append(param)
    rates = {"other": lr, "lora_B": lr * ratio, "embedding": embedding_lr}
    return [
        {"params": params, "lr": rates[kind], "weight_decay": weight_decay if decay else 0.0, "name": kind}
        for (kind, decay), params in sorted(buckets.items())
    ]
