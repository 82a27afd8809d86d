"""The token budget of token-budget batching (``micro_batch_tokens``), or the reason it stays off.

``auto`` on a GPU uses the memory model of :mod:`loraforge.estimate` (calibrated on real steps):

    per_token = (peak(8192 tokens) - peak(4096 tokens)) / 4096        # activations + logits, bytes per token
    pending   = peak(4096 tokens) - 4096 x per_token - weights - adapter  # optimizer states, gradients, buffers
    usable    = 0.85 x (free device memory + cached-but-unused memory, after the weights are loaded) - pending
    budget    = largest T with  per_token x T + mask x T^2 <= usable
    budget    = min(32768, max(budget, per_device_train_batch_size x cutoff_len)), rounded down to 256

``mask`` is 8 bytes for sdpa/flex attention (the T x T block-diagonal mask transformers builds from the restarting
position ids, and sdpa's additive copy of it), 0 for flash-attention and other variable-length kernels that read
``cu_seq_lens``. Eager attention keeps T x T scores per head, so its budget is what ``off`` would hold at most
(per_device_train_batch_size x cutoff_len). The floor is the same worst case ``off`` already allocates; the
32768 cap keeps the estimator's error (and the mask) small, and is far above a step of short samples.

On CPU (no GPU visible) the budget is a fixed 4096 tokens: enough to merge a step of short samples, and the sdpa
mask stays at 16 M elements.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from dataclasses import dataclass, replace

from ..config.finetuning import micro_batch_tokens_setting
from ..estimate.model import AUTO_MEMORY_SHARE as MEMORY_SHARE

logger = logging.getLogger(__name__)

CPU_BUDGET = 4096
AUTO_CAP = 32768
MASK_BYTES = {"sdpa": 8, "flex_attention": 8}
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn", "paged_attention",
                    "loraforge_varlen")  # the last: loraforge.kernels.varlen_attention (the fast path's)


@dataclass(frozen=True)
class TokenBatchingPlan:
    """The budget per packed micro-batch (None: off) and the line for the run summary."""

    budget: int | None
    line: str

    def largest_micro_batch(self, args, cutoff_len: int) -> int:
        """The most tokens one physical micro-batch can hold: the budget, but never more than one optimizer
        step's samples at full length (``per_device_train_batch_size x gradient_accumulation_steps x cutoff_len``)
        and never less than one full-length sample (which runs alone when longer than the budget). Off: one padded
        batch of ``per_device_train_batch_size`` rows."""
        if self.budget is None:
            return args.per_device_train_batch_size * cutoff_len
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * cutoff_len
        return min(max(self.budget, cutoff_len), per_step)


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def accepts_loss_kwargs(model) -> bool:
    """Whether the model's forward takes ``num_items_in_batch`` (the Trainer's own test)."""
    base = _base_model(model)
    if hasattr(base, "accepts_loss_kwargs"):
        return bool(base.accepts_loss_kwargs)
    params = inspect.signature(base.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def _model_problem(model) -> str | None:
    base = _base_model(model)
    config = getattr(base, "config", None)
    if config is None or any(hasattr(config, k) for k in ("vision_config", "audio_config")):
        return "multimodal models are not packed yet"
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "mrope_section" in rope:
        return "multimodal RoPE (mrope) position ids cannot restart per sample"
    if not hasattr(sys.modules.get(type(base).__module__), "create_causal_mask"):
        # models that build their own mask from attention_mask would let packed samples attend to each other
        return f"{type(base).__name__} does not build its mask from packed position ids (transformers masking_utils)"
    if not accepts_loss_kwargs(model):
        return "the model's forward does not take num_items_in_batch, so micro-batch losses could not be reweighted"
    return None


def incompatibility(cfg, model, args) -> str | None:
    """Why this run cannot regroup its steps exactly (None when it can)."""
    d = cfg.data
    # stage pt cuts its text stream into independent blocks (no position_ids): regrouping them stays exact
    if d.neat_packing or (d.packing and cfg.finetuning.stage != "pt"):
        return "`packing`/`neat_packing` already fill each sequence (their LLaMA-Factory meaning is kept)"
    if args.per_device_train_batch_size * args.gradient_accumulation_steps == 1:
        return "one sample per optimizer step: nothing to regroup"
    if args.deepspeed:
        return "DeepSpeed counts backward passes to find the accumulation boundary"
    if args.fsdp:
        return "FSDP reduces gradients per micro-batch on its own schedule"
    if args.n_gpu > 1:
        return "one process drives several GPUs (DataParallel would split the packed row)"
    if args.label_smoothing_factor:
        return "label smoothing averages each micro-batch on its own"
    if getattr(args, "neftune_noise_alpha", None):
        return "NEFTune scales its noise by the padded length"
    return _model_problem(model)


def _floor(cfg, args) -> int:
    return args.per_device_train_batch_size * cfg.data.cutoff_len


def _memory_model(cfg) -> tuple[float, float]:
    """(activation bytes per token, bytes still to be allocated after the weights) from the estimator."""
    from ..estimate import estimate_memory, scenario_from_config

    s = scenario_from_config(cfg)
    small = estimate_memory(replace(s, batch_size=1, seq_len=4096))
    large = estimate_memory(replace(s, batch_size=1, seq_len=8192))
    per_token = (large.allocated - small.allocated) / 4096
    pending = small.allocated - per_token * 4096 - small.weights - small.adapter
    return per_token, max(pending, 0.0)


def auto_budget(cfg, model, args) -> tuple[int, str]:
    """The budget for ``micro_batch_tokens: auto`` and how it was chosen (see the module docstring)."""
    import torch

    floor = _floor(cfg, args)
    if args.use_cpu or not torch.cuda.is_available():
        return CPU_BUDGET, f"auto: no GPU visible, a fixed {CPU_BUDGET}"
    impl = getattr(_base_model(model).config, "_attn_implementation", None) or "sdpa"
    if impl == "eager":
        return floor, "auto: eager attention keeps T x T scores, so per_device_train_batch_size x cutoff_len"
    try:
        per_token, pending = _memory_model(cfg)
    except Exception as err:  # noqa: BLE001 - an unknown architecture must not stop training
        return floor, f"auto: memory model unavailable ({err}), so per_device_train_batch_size x cutoff_len"
    usable = MEMORY_SHARE * free_device_memory(args.device) - pending
    mask = 0 if impl in VARLEN_ATTENTION else MASK_BYTES.get(impl, 0)
    if usable <= 0:
        tokens = 0
    elif mask:
        tokens = int((-per_token + math.sqrt(per_token**2 + 4 * mask * usable)) / (2 * mask))
    else:
        tokens = int(usable / per_token)
    budget = max(min(AUTO_CAP, tokens) // 256 * 256, floor)
    return budget, (f"auto: {usable / 2**30:.1f} GiB free for activations at {per_token / 1024:.0f} KiB per token"
                    f"{f' + {mask} B per token^2 ({impl} mask)' if mask else ''}")


def free_device_memory(device) -> float:
    """Bytes this process can still allocate on ``device``: free device memory plus what PyTorch's allocator holds
    unused (after the weights are loaded, before the optimizer states exist)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def plan_token_batching(cfg, model, args) -> TokenBatchingPlan:
    """Decide ``micro_batch_tokens`` for this run after the model is loaded."""
    setting = micro_batch_tokens_setting(cfg.finetuning.micro_batch_tokens)
    if setting is None:
        return TokenBatchingPlan(None, "token batching: off (micro_batch_tokens: off)")
    reason = incompatibility(cfg, model, args)
    if reason:
        return TokenBatchingPlan(None, f"token batching: off, {reason}")
    if isinstance(setting, int):
        budget, how = setting, "micro_batch_tokens"
    else:
        budget, how = auto_budget(cfg, model, args)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    where = " on each process" if args.world_size > 1 else ""
    return TokenBatchingPlan(budget, f"token batching: the {per_step} samples of each optimizer step{where} run packed "
                                     f"in micro-batches of <= {budget} tokens ({how})")
