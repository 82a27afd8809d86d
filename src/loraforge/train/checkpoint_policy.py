"""Which decoder layers recompute in backward: ``checkpoint_layers: all | auto | <int>``.

A checkpointed layer keeps only its input between forward and backward and runs its forward again in backward
(on the fast path the input even waits in pinned host memory). A layer that does not checkpoint keeps all its
activations on the GPU and skips that second forward. ``all`` checkpoints every layer (the smallest memory);
an integer N checkpoints the first N layers; ``auto`` checkpoints as few as the GPU's memory allows, from the
memory model of :mod:`loraforge.estimate` (the one ``micro_batch_tokens: auto`` uses):

    tokens    = the largest micro-batch a step can form (TokenBatchingPlan.largest_micro_batch: the token budget,
                capped at one step's samples at full length; without token batching, batch size x cutoff_len)
    per_layer = (peak without checkpointing - peak with it) / layers, for a micro-batch of `tokens`
    usable    = 0.85 x (free device memory + cached-but-unused memory, after the weights are loaded)
                - (peak with checkpointing - weights - adapter)          # loraforge.estimate.model.auto_kept_layers
    kept      = min(layers, floor(usable / per_layer))       # these, the last ones, keep their activations

The last layers are the ones kept: backward reaches them first, which leaves time for the offloaded inputs of the
checkpointed layers to come back. On a CPU, under DeepSpeed or FSDP, or when the memory model does not know the
model, ``auto`` keeps checkpointing every layer and says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from ..config.model import checkpoint_layers_setting
from ..errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class CheckpointPlan:
    """How many of the decoder's layers recompute (``checkpointed``) and keep their activations (``kept``)."""

    checkpointed: int
    kept: int
    line: str


def _layers(model: Any) -> Any:
    from ..models.fast import decoder_of

    return getattr(decoder_of(model), "layers", None)


def _auto_kept(cfg: Any, args: Any, tokens: int) -> tuple[int, str]:
    import torch

    from ..estimate import scenario_from_config
    from ..estimate.model import auto_kept_layers
    from .token_budget import free_device_memory

    if args.use_cpu or not torch.cuda.is_available():
        return 0, "auto: no GPU visible, every layer recomputes"
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        return 0, "auto: DeepSpeed/FSDP shard the model, every layer recomputes"
    try:
        s = replace(scenario_from_config(cfg), batch_size=1, seq_len=max(int(tokens), 1))
        kept, per_layer, usable = auto_kept_layers(s, free_device_memory(args.device))
    except Exception as err:  # noqa: BLE001 - an unknown architecture must not stop training
        return 0, f"auto: memory model unavailable ({err}), every layer recomputes"
    return kept, (f"auto: {max(usable, 0) / 2**30:.1f} GiB to spare at {tokens} tokens per micro-batch, "
                  f"{per_layer / 2**30:.2f} GiB per layer that keeps its activations")


def plan_checkpointing(cfg: Any, model: Any, args: Any, tokens: int) -> CheckpointPlan:
    """Decide, after the model is loaded (and the token budget chosen), which layers recompute."""
    setting = checkpoint_layers_setting(cfg.model.checkpoint_layers)
    layers = _layers(model)
    checkpointing = [layer for layer in (layers or []) if getattr(layer, "gradient_checkpointing", False)]
    if cfg.model.disable_gradient_checkpointing or not checkpointing:
        return CheckpointPlan(0, len(layers or []), "gradient checkpointing: off")
    total = len(layers)
    if setting == "all":
        return CheckpointPlan(total, 0, f"gradient checkpointing: all {total} layers recompute in backward")
    if isinstance(setting, int):
        if setting > total:
            raise ConfigError([f"`checkpoint_layers: {setting}` is more than the model's {total} decoder layers; "
                               f"use a number from 0 to {total}, `all` or `auto`"])
        kept, how = total - setting, "checkpoint_layers"
    else:
        kept, how = _auto_kept(cfg, args, tokens)
    return CheckpointPlan(total - kept, kept, f"gradient checkpointing: {total - kept} of {total} layers recompute "
                                              f"in backward, the last {kept} keep their activations ({how})")


def apply_checkpoint_plan(model: Any, plan: CheckpointPlan) -> int:
    """Turn checkpointing off for the last ``plan.kept`` layers; returns how many layers still checkpoint."""
    layers = list(_layers(model) or [])
    for layer in layers[len(layers) - plan.kept:] if plan.kept else []:
        layer.gradient_checkpointing = False
    return sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)
