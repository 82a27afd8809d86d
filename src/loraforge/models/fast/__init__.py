"""The fast path: loraforge's own forward for the decoder blocks of the architectures it covers.

    plan = plan_fast_path(cfg)                      # before loading: is the model/method covered? why not?
    model = load_model(cfg, tok, is_trainable=True, fast_path=plan.enabled)
    fast = apply_fast_path(model, plan)             # swaps module instances; returns what it did
    ...train... ; fast.restore()                    # the standard modules back (e.g. before generate())

:func:`apply_fast_path` is the one function that changes a model: it replaces the attention, MLP and RMSNorm
*instances* of each decoder layer (and the final norm) with the modules of :mod:`.modules`, which adopt the
originals' children and parameters under the same names, and switches attention to the variable-length kernel.
No library source is patched; the peft adapter, its state dict and the saved files are unchanged. The loss
side (cross-entropy without full-vocabulary logits) is :func:`.loss.fused_causal_lm_loss`, which the Trainer
uses through its documented ``compute_loss_func`` hook.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

COVERED = ("qwen2", "qwen3", "llama", "mistral")
#: decoders whose layer ends ``residual + mlp(norm(h))``: the MLP output is read by nothing in backward, so a
#: replayed layer skips ``down_proj``'s base GEMM (:class:`~loraforge.models.fast.modules.FastMLP`). A decoder
#: added to COVERED that is not listed here replays it in full.
MLP_OUTPUT_UNREAD = ("qwen2", "qwen3", "llama", "mistral")


@dataclass
class FastPathPlan:
    """Whether the fast path runs, and the reason given to the user in the run summary."""

    enabled: bool
    reason: str
    setting: str = "auto"
    fused_loss: bool = False  # the chunked linear cross-entropy runs even where the modules are not swapped
    fp8: bool | str = False  # frozen-weight GEMMs in FP8: True (forward and input gradient), "backward", False
    fp8_auto: bool = False  # `fp8` came from `fp8: auto`

    def __post_init__(self) -> None:
        self.fused_loss = self.fused_loss or self.enabled


@dataclass
class FastPath:
    """What :func:`apply_fast_path` swapped; :meth:`restore` puts the original modules back."""

    plan: FastPathPlan
    swapped: dict[str, int] = field(default_factory=dict)
    _originals: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list, repr=False)
    _attention: str | None = None
    _use_cache: bool | None = None
    offloaded: int = 0
    _model: Any = field(default=None, repr=False)
    _stacked: list[Any] = field(default_factory=list, repr=False)  # 16-bit base weights laid out per group

    @property
    def enabled(self) -> bool:
        return self.plan.enabled

    def summary(self) -> str:
        if not self.plan.enabled:
            loss = "; the loss is still the fused linear cross-entropy (no full-vocabulary logits)" \
                if self.plan.fused_loss else ""
            return f"fast path: off ({self.plan.reason}){loss}"
        parts = ", ".join(f"{n} {k}" for k, n in self.swapped.items())
        ckpt = f"; {self.offloaded} checkpointed layers keep their inputs in host memory" if self.offloaded else ""
        fp8 = {True: "; FP8 base-weight matmuls",
               "backward": "; FP8 base-weight matmuls in backward (input gradients, replayed layers)",
               }.get(self.plan.fp8, "")
        if fp8 and self.plan.fp8_auto:
            fp8 += " (fp8: auto; `fp8: false` keeps them 16-bit)"
        return f"fast path: on ({parts}; variable-length attention; fused linear cross-entropy{fp8}{ckpt})"

    def restore(self) -> None:
        """Put every original module back (the adopted children are shared), give the 16-bit base weights laid
        out per group their own storage again, and free the kernels' per-run buffers (16-bit adapter copies, the
        last FP8-quantized input)."""
        from ...kernels.fp8 import LAST_ROWS
        from ...kernels.lora import COMPUTE_COPIES

        from .modules import unstack_base_weights

        for parent, name, original in reversed(self._originals):
            setattr(parent, name, original)
        self._originals.clear()
        unstack_base_weights(self._stacked)
        self._stacked.clear()
        COMPUTE_COPIES.invalidate()
        LAST_ROWS.clear()
        if self._model is not None and self._attention is not None:
            from ...kernels.varlen_attention import set_attention

            set_attention(self._model, self._attention)
            _base_config(self._model).use_cache = self._use_cache
        self.plan = FastPathPlan(False, "restored to the standard modules", self.plan.setting)


def _uncovered_reason(cfg: Any, config: Any) -> str | None:
    """Why ``cfg`` + the model ``config`` cannot take the fast path (None when they can)."""
    f, m = cfg.finetuning, cfg.model
    if f.finetuning_type != "lora":
        return f"finetuning_type: {f.finetuning_type} uses the standard path"
    if f.use_dora:
        return "use_dora: DoRA uses the standard path"
    if f.pissa_init:
        return "pissa_init: PiSSA uses the standard path"
    model_type = getattr(config, "model_type", None)
    if model_type not in COVERED:
        return f"model_type {model_type!r} is not covered (covered: {', '.join(COVERED)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (the fast MLP is SwiGLU)"
    if getattr(config, "attention_dropout", 0.0):
        return "attention_dropout > 0"
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", model_type == "mistral") and window and window < cfg.data.cutoff_len:
        return f"sliding-window attention ({window} < cutoff_len {cfg.data.cutoff_len})"
    if m.upcast_layernorm:
        return "upcast_layernorm: true keeps fp32 norms (the fast path keeps them 16-bit)"
    if m.flash_attn == "disabled":
        return "flash_attn: disabled asks for eager attention"
    args = cfg.training
    if args is not None and getattr(args, "deepspeed", None):
        return DEEPSPEED_REASON
    if args is not None and getattr(args, "fsdp", None):
        return "FSDP shards the weights; the fast path runs on single-GPU and DDP"
    if (args is not None and getattr(args, "ddp_find_unused_parameters", None) and not m.disable_gradient_checkpointing
            and getattr(args, "world_size", 1) > 1):
        return ("ddp_find_unused_parameters: true (DDP's search for unused weights cannot follow the fast path's "
                "checkpoint, which recomputes each layer inside backward; drop the key to take the fast path)")
    return None


DEEPSPEED_REASON = "DeepSpeed shards the weights; the fast path's modules run on single-GPU and DDP"


def _check_fp8(reason: str | None, fp16: bool, value: str = "true") -> None:
    """`fp8` needs the fast path, bf16 and, on a GPU, FP8 tensor cores with per-row scaling (Hopper+)."""
    import torch

    from ...errors import ConfigError
    from ...kernels import cuda_capability
    from ...kernels.fp8 import fp8_supported

    if reason is not None:
        raise ConfigError([f"`fp8: {value}` runs on the fast path, which cannot run this configuration: {reason}; "
                           "drop `fp8` or change what the reason names"])
    if fp16:
        raise ConfigError([f"`fp8: {value}` writes its matmul results in bf16 and cannot run with `fp16: true`; use "
                           "`bf16: true` (every GPU with FP8 has bf16)"])
    device = _current_gpu()
    if device is not None and not fp8_supported(device):
        name = torch.cuda.get_device_name(device)
        major, minor = cuda_capability(device)
        raise ConfigError([f"`fp8: {value}` needs FP8 matmuls with per-row scales (a Hopper GPU or newer, compute "
                           f"capability 9.0); {name} has {major}.{minor}: drop `fp8`"])


def _current_gpu() -> Any:
    """The current CUDA device, or None without one."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _fp8_backward_fits() -> bool:
    """`fp8: auto` (in bf16) takes `backward` on a GPU with FP8 per-row-scaled matmuls (Hopper+); never on a CPU
    (where ``torch._scaled_mm`` runs, but slower than 16-bit matmuls)."""
    from ...kernels.fp8 import fp8_supported

    device = _current_gpu()
    return device is not None and fp8_supported(device)


def plan_fast_path(cfg: Any, config: Any = None) -> FastPathPlan:
    """Decide, before any weight loads, whether this run takes the fast path (``fast_path: auto|on|off``)."""
    from ...config.finetuning import fp8_setting
    from ...errors import ConfigError

    setting = cfg.finetuning.fast_path
    fp8 = fp8_setting(getattr(cfg.finetuning, "fp8", False))
    auto = fp8 == "auto"
    if auto:
        fp8 = False
    value = "backward" if fp8 == "backward" else "true"
    if setting == "off":
        if fp8:
            raise ConfigError([f"`fp8: {value}` runs on the fast path, and this config sets `fast_path: off`; "
                               "drop one of the two"])
        return FastPathPlan(False, "fast_path: off", setting)
    if config is None:
        from transformers import AutoConfig

        from ..hub import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(cfg.model), trust_remote_code=cfg.model.trust_remote_code)
    reason = _uncovered_reason(cfg, config)
    if fp8:
        _check_fp8(reason, getattr(cfg.training, "fp16", False), value)
    if reason is None:
        bf16 = bool(getattr(cfg.training, "bf16", False) or getattr(cfg.finetuning, "pure_bf16", False))
        if auto and bf16 and _fp8_backward_fits():
            return FastPathPlan(True, "covered", setting, fp8="backward", fp8_auto=True)
        return FastPathPlan(True, "covered", setting, fp8=fp8)
    if setting == "on":
        raise ConfigError([f"`fast_path: on` cannot run this configuration: {reason}; use `fast_path: auto` "
                           "(falls back to the standard path) or change what the reason names"])
    # Under DeepSpeed the decoder stays standard, but the loss still needs no full-vocabulary logits (ZeRO-3's
    # partitioned output weight is gathered for it): at 2 x 2048 tokens that is 2-3.5 GiB less per GPU.
    return FastPathPlan(False, reason, setting, fused_loss=reason == DEEPSPEED_REASON)


def _base_config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def decoder_of(model: Any) -> Any:
    """The decoder (embeddings, layers, final norm) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder() if hasattr(base, "get_decoder") else base.model


def apply_fast_path(model: Any, plan: FastPathPlan) -> FastPath:
    """Swap the covered module instances of ``model`` (a peft-wrapped or plain causal LM) for the fast ones."""
    from ...kernels.varlen_attention import attention_of, use_varlen_attention
    from .checkpointing import use_offloaded_checkpointing
    from .modules import FastAttention, FastMLP, FastRMSNorm, stack_base_weights

    fast = FastPath(plan)
    if not plan.enabled:
        return fast
    decoder = decoder_of(model)

    def swap(parent: nn.Module, name: str, new_cls: type, kind: str) -> None:
        original = getattr(parent, name)
        setattr(parent, name, new_cls(original))
        fast._originals.append((parent, name, original))
        fast.swapped[kind] = fast.swapped.get(kind, 0) + 1

    for layer in decoder.layers:
        swap(layer, "self_attn", FastAttention, "attention")
        swap(layer, "mlp", FastMLP, "MLP")
        swap(layer, "input_layernorm", FastRMSNorm, "RMSNorm")
        swap(layer, "post_attention_layernorm", FastRMSNorm, "RMSNorm")
    swap(decoder, "norm", FastRMSNorm, "RMSNorm")
    unread = getattr(_base_config(model), "model_type", None) in MLP_OUTPUT_UNREAD
    for module in decoder.modules():
        if isinstance(module, (FastAttention, FastMLP)):
            module.fp8 = plan.fp8
        if isinstance(module, FastMLP):
            module.output_read_in_backward = not unread
            fast._stacked += stack_base_weights((module.gate_proj, module.up_proj))
        if isinstance(module, FastAttention):
            fast._stacked += stack_base_weights((module.q_proj, module.k_proj, module.v_proj))
    dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    fast.offloaded = use_offloaded_checkpointing(decoder.layers, keep_rng=dropout)
    fast._attention, fast._model = attention_of(model), model
    config = _base_config(model)
    fast._use_cache, config.use_cache = config.use_cache, False  # training forwards build no KV cache
    use_varlen_attention(model)
    return fast
