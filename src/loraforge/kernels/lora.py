"""One autograd function for a LoRA projection over a frozen base weight: ``x W^T + b + s (drop(x) A^T) B^T``.

The base weight may be bitsandbytes 4-bit (nf4/fp4, double quantization), 8-bit (LLM.int8), or a plain
16/32-bit tensor. A 4/8-bit weight is dequantized to the compute dtype for the forward GEMM, dropped, and
dequantized again in backward for the input gradient: nothing weight-sized is kept between the two.
Compared with peft's module stack (quantized matmul, then the dropout / lora_A / lora_B modules, each its own
autograd node with fp32 adapter casts), this saves the input once, keeps the rank-r product ``x A^T`` (small)
for ``dB``, and runs the adapter GEMMs in the compute dtype.

:func:`lora_linear_reference` is the same computation in plain PyTorch autograd: the tests hold the two equal.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def dequantize_weight(base_layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of ``base_layer`` in ``dtype`` (a view when it is already a plain tensor)."""
    weight = base_layer.weight
    kind = type(weight).__name__
    if kind in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_bnb_weight

        weight = dequantize_bnb_weight(weight, state=getattr(base_layer, "state", None))
    return weight if weight.dtype == dtype else weight.to(dtype)


def _bias(base_layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    bias = getattr(base_layer, "bias", None)
    return None if bias is None else bias.to(dtype)


class LoraLinearFunction(torch.autograd.Function):
    """Forward and backward of one LoRA projection; ``x_drop`` is ``x`` itself when there is no dropout."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_drop: torch.Tensor, base_layer: torch.nn.Module,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xd2 = x2 if x_drop is x else x_drop.reshape(-1, shape[-1])
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        out = F.linear(x2, dequantize_weight(base_layer, dtype), _bias(base_layer, dtype))
        xa = xd2 @ a.t()  # [N, r], kept for dB
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(xd2, xa, lora_a, lora_b)
        ctx.base_layer, ctx.scaling, ctx.same = base_layer, scaling, x_drop is x
        ctx.shape = shape
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        xd2, xa, lora_a, lora_b = ctx.saved_tensors
        dtype = xd2.dtype
        s = ctx.scaling
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        dxa = (dy @ b) * s  # [N, r]
        grad_b = (dy.t() @ xa).mul_(s) if lora_b.requires_grad else None
        grad_a = dxa.t() @ xd2 if lora_a.requires_grad else None
        grad_x = grad_xd = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x = dy @ dequantize_weight(ctx.base_layer, dtype)
            if ctx.same:
                grad_x.addmm_(dxa, a)
            else:
                grad_xd = (dxa @ a).reshape(ctx.shape)
            grad_x = grad_x.reshape(ctx.shape)
        return (grad_x, grad_xd, None,
                None if grad_a is None else grad_a.to(lora_a.dtype),
                None if grad_b is None else grad_b.to(lora_b.dtype), None)


def lora_linear(x: torch.Tensor, base_layer: torch.nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dropout: torch.nn.Module | None = None) -> torch.Tensor:
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`` in one autograd node."""
    x_drop = x if dropout is None or isinstance(dropout, torch.nn.Identity) else dropout(x)
    return LoraLinearFunction.apply(x, x_drop, base_layer, lora_a, lora_b, float(scaling))


def lora_linear_reference(x: torch.Tensor, base_layer: torch.nn.Module, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: float, dropout: torch.nn.Module | None = None
                          ) -> torch.Tensor:
    """The same result through plain autograd ops (the numerical reference)."""
    dtype = x.dtype
    x_drop = x if dropout is None else dropout(x)
    base = F.linear(x, dequantize_weight(base_layer, dtype).detach(), _bias(base_layer, dtype))
    return base + F.linear(F.linear(x_drop, lora_a.to(dtype)), lora_b.to(dtype)) * scaling
