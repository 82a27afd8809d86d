"""One autograd function for a LoRA projection over a frozen base weight: ``x W^T + b + s (drop(x) A^T) B^T``.

The base weight may be bitsandbytes 4-bit (nf4/fp4, double quantization), 8-bit (LLM.int8), or a plain
16/32-bit tensor. A 4/8-bit weight is dequantized to the compute dtype for the forward GEMM, dropped, and
dequantized again in backward for the input gradient: nothing weight-sized is kept between the two, except
when a checkpointed layer is replayed right before its backward (``keep_weight``).
Compared with peft's module stack (quantized matmul, then the dropout / lora_A / lora_B modules, each its own
autograd node with fp32 adapter casts), this saves the input once, keeps the rank-r product ``x A^T`` (small)
for ``dB``, and runs the adapter GEMMs in the compute dtype.

:func:`lora_linear_reference` is the same computation in plain PyTorch autograd: the tests hold the two equal.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

from .dequant import dequantize_4bit, direct_ok


def dequantize_weight(base_layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of ``base_layer`` in ``dtype`` (a view when it is already a plain tensor)."""
    weight = base_layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit" and direct_ok(weight, dtype):  # bitsandbytes' kernels, less host work per call
        return dequantize_4bit(weight, dtype)
    if kind in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_bnb_weight

        weight = dequantize_bnb_weight(weight, state=getattr(base_layer, "state", None))
    return weight if weight.dtype == dtype else weight.to(dtype)


class _ComputeCopies:
    """16-bit copies of the fp32 adapter weights, made once per optimizer step instead of at every use.

    Between two optimizer steps the forward, the recompute and the backward of every micro-batch use the same
    copy (Qwen3-8B at r16: 87 MB, against ~1,500 small cast kernels per step). A copy is valid while three things
    hold: it was made for this very tensor (``id`` plus a weak reference: tensors are never compared with ``==``),
    no optimizer has stepped since (a global step hook counts optimizer steps: bitsandbytes' 8-bit optimizers
    write the weights from their own kernels without bumping the tensor's version counter), and the version
    counter is unchanged (any other in-place write, such as ``load_state_dict``)."""

    def __init__(self) -> None:
        self.generation = 0
        self.copies: dict[tuple[int, torch.dtype], tuple[weakref.ref, int, int, torch.Tensor]] = {}
        self.hooked = False

    def invalidate(self, *_args: Any) -> None:
        self.generation += 1
        self.copies.clear()

    def get(self, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if param.dtype == dtype:
            return param.detach()
        if not self.hooked:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            register_optimizer_step_post_hook(self.invalidate)
            self.hooked = True
        key = (id(param), dtype)
        hit = self.copies.get(key)
        if hit is not None and hit[0]() is param and hit[1] == self.generation and hit[2] == param._version:
            return hit[3]
        copy = param.detach().to(dtype)
        self.copies[key] = (weakref.ref(param), self.generation, param._version, copy)
        return copy


COMPUTE_COPIES = _ComputeCopies()


def compute_copy(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``param`` (an adapter weight) in the compute dtype, cast once per optimizer step (see :class:`_ComputeCopies`)."""
    return COMPUTE_COPIES.get(param, dtype)


def _bias(base_layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    bias = getattr(base_layer, "bias", None)
    return None if bias is None else bias.to(dtype)


class LoraLinearFunction(torch.autograd.Function):
    """Forward and backward of one LoRA projection; ``x_drop`` is ``x`` itself when there is no dropout."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_drop: torch.Tensor, base_layer: torch.nn.Module,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fp8: bool | str = False,
                unused_output: bool = False, keep_weight: bool = False) -> torch.Tensor:
        dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xd2 = x2 if x_drop is x else x_drop.reshape(-1, shape[-1])
        a, b = compute_copy(lora_a, dtype), compute_copy(lora_b, dtype)
        fp8 = fp8 if fp8 and _fp8_ok(base_layer, x2, dtype) else False
        if unused_output:  # a replayed forward whose output nobody reads: no base GEMM, no dequantization
            out = x2.new_zeros((x2.shape[0], lora_b.shape[0]))
        elif fp8 is True:  # (with fp8 "backward" the forward GEMM stays 16-bit; only the input gradient is FP8)
            from .fp8 import fp8_forward

            out = fp8_forward(x, x2, base_layer, dtype)
            bias = _bias(base_layer, dtype)
            if bias is not None:
                out.add_(bias)
        else:
            weight = dequantize_weight(base_layer, dtype)
            out = F.linear(x2, weight, _bias(base_layer, dtype))
            if keep_weight:  # the backward comes next: hand it this weight instead of dequantizing again
                if fp8 == "backward":
                    from .fp8 import cast_weight, weight_scale

                    ctx.kept = cast_weight(weight, weight_scale(base_layer, dtype), transpose=True)
                else:
                    ctx.kept = weight
        xa = xd2 @ a.t()  # [N, r], kept for dB
        if not unused_output:
            out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(xd2, xa, lora_a, lora_b)
        ctx.base_layer, ctx.scaling, ctx.same, ctx.fp8 = base_layer, scaling, x_drop is x, bool(fp8)
        ctx.shape = shape
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        xd2, xa, lora_a, lora_b = ctx.saved_tensors
        dtype = xd2.dtype
        s = ctx.scaling
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        if dy.dtype != dtype:
            dy = dy.to(dtype)
        a, b = compute_copy(lora_a, dtype), compute_copy(lora_b, dtype)
        # addmm with beta 0 ignores its input (NaN included): the scaling runs inside the GEMM, no extra kernel
        zero = dy.new_empty(())
        dxa = torch.addmm(zero, dy, b, beta=0, alpha=s)  # [N, r]
        grad_b = torch.addmm(zero, dy.t(), xa, beta=0, alpha=s) if lora_b.requires_grad else None
        grad_a = dxa.t() @ xd2 if lora_a.requires_grad else None
        grad_x = grad_xd = None
        kept, ctx.kept = getattr(ctx, "kept", None), None  # released here, used or not
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if ctx.fp8:
                from .fp8 import fp8_input_grad

                grad_x = fp8_input_grad(dy, ctx.base_layer, dtype, kept)
            else:
                grad_x = dy @ (dequantize_weight(ctx.base_layer, dtype) if kept is None else kept)
            if ctx.same:
                grad_x.addmm_(dxa, a)
            else:
                grad_xd = (dxa @ a).reshape(ctx.shape)
            grad_x = grad_x.reshape(ctx.shape)
        return (grad_x, grad_xd, None,
                None if grad_a is None else grad_a.to(lora_a.dtype),
                None if grad_b is None else grad_b.to(lora_b.dtype), None, None, None, None)


def _fp8_ok(base_layer: torch.nn.Module, x2: torch.Tensor, dtype: torch.dtype) -> bool:
    """FP8 runs on weights whose dimensions ``torch._scaled_mm`` takes (multiples of 16), into bf16 on a GPU
    (per-row scaling has bf16 outputs there; the config refuses `fp8` with fp16) and any dtype on the CPU."""
    from .fp8 import gemm_shapes_ok

    return ((dtype == torch.bfloat16 or not x2.is_cuda)
            and gemm_shapes_ok(base_layer.in_features, base_layer.out_features))


def lora_linear(x: torch.Tensor, base_layer: torch.nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dropout: torch.nn.Module | None = None, fp8: bool | str = False,
                unused_output: bool = False, keep_weight: bool = False) -> torch.Tensor:
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` in one autograd node; with ``fp8=True`` the two GEMMs
    with the frozen weight run in FP8, with ``fp8="backward"`` only the input-gradient one (see
    :mod:`loraforge.kernels.fp8`).

    ``unused_output=True`` is for a forward replayed inside backward whose result only roots the backward and is
    never read: the output is zeros of the right shape (no base GEMM, no dequantization), while everything the
    backward needs (the input, ``x A^T``) is kept as usual, so every gradient is unchanged.

    ``keep_weight=True`` is for a forward whose backward follows at once (a checkpointed layer replayed inside
    backward): the dequantized weight (or, with ``fp8="backward"``, its e4m3 transpose) is kept until the input
    gradient uses it, instead of being dequantized a second time. At most one layer's weights are held this way
    (Qwen3-8B: 285 MB in 16 bits, 142 MB in FP8; down_proj's are not, see ``unused_output``)."""
    x_drop = x if dropout is None or isinstance(dropout, torch.nn.Identity) else dropout(x)
    return LoraLinearFunction.apply(x, x_drop, base_layer, lora_a, lora_b, float(scaling), fp8, unused_output,
                                    keep_weight)


def lora_linear_reference(x: torch.Tensor, base_layer: torch.nn.Module, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: float, dropout: torch.nn.Module | None = None
                          ) -> torch.Tensor:
    """The same result through plain autograd ops (the numerical reference)."""
    dtype = x.dtype
    x_drop = x if dropout is None else dropout(x)
    base = F.linear(x, dequantize_weight(base_layer, dtype).detach(), _bias(base_layer, dtype))
    return base + F.linear(F.linear(x_drop, lora_a.to(dtype)), lora_b.to(dtype)) * scaling
