"""bitsandbytes quantization for QLoRA: the load-time config, k-bit training preparation, and a description.

4-bit (nf4/fp4, optionally double-quantized) and 8-bit (LLM.int8) go through transformers'
``BitsAndBytesConfig``; bitsandbytes >= 0.48 runs both on CPU as well as CUDA.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError

if TYPE_CHECKING:
    import torch

    from ..config import ModelArguments

logger = logging.getLogger(__name__)


class _LimitFilter(logging.Filter):
    """Let a log message that starts with ``prefix`` through at most ``limit`` times."""

    def __init__(self, prefix: str, limit: int):
        super().__init__()
        self.prefix = prefix
        self.left = limit

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        self.left -= 1
        return self.left >= 0


def quiet_bitsandbytes_logs() -> None:
    """Show bitsandbytes' per-forward 8-bit cast warning once, and drop its CPU note about the optional
    ``kernels`` package (it fetches kernels from the hub, which offline machines cannot use)."""
    for name, prefix, limit in (("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast", 1),
                                ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward", 0)):
        target = logging.getLogger(name)
        if not any(isinstance(f, _LimitFilter) and f.prefix == prefix for f in target.filters):
            target.addFilter(_LimitFilter(prefix, limit))


def build_quantization_config(model_args: "ModelArguments", compute_dtype: "torch.dtype",
                              *, zero3_or_fsdp: bool = False) -> Any | None:
    """A ``BitsAndBytesConfig`` for ``quantization_bit`` (None when the model is not quantized).

    Under DeepSpeed ZeRO-3 or FSDP the 4-bit weights are stored in the compute dtype so they can be sharded
    like the other parameters.
    """
    bits = model_args.quantization_bit
    if bits is None:
        return None
    if model_args.quantization_method not in ("bitsandbytes", "bnb"):
        raise ModelLoadError(f"quantization_method: {model_args.quantization_method} is not supported; "
                             "use quantization_method: bitsandbytes")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"quantization_bit: {bits} needs bitsandbytes: pip install 'bitsandbytes>=0.45'")
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.quantization_type,
            bnb_4bit_use_double_quant=model_args.double_quantization,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype if zero3_or_fsdp else None,
        )
    raise ModelLoadError(f"quantization_bit: {bits} is not supported; use 4 or 8 (bitsandbytes)")


def is_quantized(model: Any) -> bool:
    """True when ``model`` (or the base model under a peft wrapper) holds bitsandbytes k-bit weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(base, "is_quantized", False))


def describe_quantization(model: Any) -> str:
    """One phrase such as ``bitsandbytes 4-bit nf4 + double quantization, compute bfloat16`` or ``none``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    qc = getattr(getattr(base, "config", None), "quantization_config", None)
    if qc is None:
        return "none"
    q = qc if isinstance(qc, dict) else qc.to_dict()
    method = q.get("quant_method", "unknown")
    method = str(getattr(method, "value", method))
    if method != "bitsandbytes":
        return method
    if q.get("load_in_4bit"):
        double = " + double quantization" if q.get("bnb_4bit_use_double_quant") else ""
        compute = str(q.get("bnb_4bit_compute_dtype", "float32")).replace("torch.", "")
        return f"bitsandbytes 4-bit {q.get('bnb_4bit_quant_type', 'fp4')}{double}, compute {compute}"
    if q.get("load_in_8bit"):
        return "bitsandbytes 8-bit (LLM.int8)"
    return "bitsandbytes"


def prepare_for_kbit_training(model: Any, *, gradient_checkpointing: bool, use_reentrant: bool,
                              upcast: bool = True) -> None:
    """Make a k-bit model trainable with adapters (what peft's ``prepare_model_for_kbit_training`` does).

    Freezes every base weight, keeps norm weights in fp32 for stability, and makes the embedding output require
    grad so checkpointed blocks get gradients. Unlike peft's helper it does not upcast the (large, frozen)
    embedding and lm_head weights to fp32, which would cost gigabytes on a 14B model for no training benefit.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if upcast:  # the fast path's fused RMSNorm computes in fp32 internally and keeps the weights 16-bit
        upcast_norms(model)
    if gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=use_reentrant)
        model.enable_input_require_grads()


def keep_loaded_layout(model: Any) -> int:
    """Keep every 4-bit weight in the layout it was loaded in (``load_model`` calls it on every model).

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place for its bf16 CPU kernel the first time
    the layer runs in eval mode on an input without gradients (an evaluation between training steps, a chat
    turn), and rounds the weight's block scales to bf16 on the way. Anything that dequantizes the weight
    afterwards (the fast path, a merge) would read the repacked bytes as the old layout, a training would go on
    with other base weights than it loaded, and the same adapter would give other outputs in ``predict`` than in
    training's evaluation. The switch is the layer's own attribute (``support_avx512bf16_for_cpu``); the price is
    bitsandbytes' faster bf16 kernel for 4-bit inference on such CPUs. Returns how many layers were switched."""
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def enable_checkpointing(model: Any, *, use_reentrant: bool) -> None:
    """Turn on activation (gradient) checkpointing; transformers 5 renamed the method, accept both names."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def upcast_norms(model: Any) -> int:
    """Cast the weights of normalisation layers to fp32; returns how many tensors were cast."""
    import torch

    count = 0
    for name, module in model.named_modules():
        if "norm" not in type(module).__name__.lower() and not name.split(".")[-1].endswith("norm"):
            continue
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(torch.float32)
                count += 1
    return count
