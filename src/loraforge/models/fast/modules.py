"""The fast path's modules for Llama-family decoders (Qwen2/Qwen2.5, Qwen3, Llama 3.x, Mistral).

Each replaces one Hugging Face module *instance* and adopts that module's children and parameters under the same
names (``q_proj``, ``gate_proj``, ``weight``, ...), so parameter names, the peft adapter state dict and the saved
adapter are exactly those of the standard path. Only the forward differs:

- :class:`FastRMSNorm`: the fused RMSNorm kernel; the norm weight stays in the model's dtype, so the residual
  stream stays 16-bit (the standard QLoRA preparation upcasts it to fp32).
- :class:`FastAttention`: Q/K/V/O through the fused LoRA function, the RoPE kernel, and the variable-length
  attention (packed samples never attend to each other; no [T, T] mask).
- :class:`FastMLP`: gate/up/down through the fused LoRA function and the fused SwiGLU kernel; replayed in
  backward, ``down_proj`` skips the base GEMM whose output nothing reads.

A projection whose peft layer is in any state the fused function does not cover (adapters disabled or merged,
several active adapters, DoRA, LoRA bias, or no adapter at all) is simply called as the module it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...kernels.lora import LoraGroup, lora_group, lora_linear
from ...kernels.rms_norm import rms_norm
from ...kernels.rope import apply_rope
from ...kernels.swiglu import swiglu, swiglu_packed
from ...kernels.varlen_attention import attention_forward
from .checkpointing import recomputing

_BASE_KINDS = ("Linear", "Linear4bit", "Linear8bitLt")


def lora_parts(layer: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float, nn.Module] | None:
    """(base layer, A, B, scaling, dropout) when ``layer`` is a peft LoRA layer the fused function covers."""
    lora_a = getattr(layer, "lora_A", None)
    if lora_a is None or getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in lora_a:
        return None
    name = active[0]
    if layer.use_dora.get(name, False) or getattr(layer, "lora_bias", {}).get(name, False):
        return None
    if getattr(layer, "lora_variant", {}).get(name) is not None:
        return None
    base = layer.get_base_layer()
    if type(base).__name__ not in _BASE_KINDS:
        return None
    return base, lora_a[name].weight, layer.lora_B[name].weight, layer.scaling[name], layer.lora_dropout[name]


def _active(dropout: nn.Module) -> bool:
    """Whether a LoRA dropout drops anything in this call."""
    return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0


def project(layer: nn.Module, x: torch.Tensor, fp8: bool | str = False, unused_output: bool = False) -> torch.Tensor:
    """``layer(x)`` for a LoRA projection, through the fused function when it covers the layer (with ``fp8``, its
    frozen-weight GEMMs in FP8: True both, ``"backward"`` the input gradient's; ``unused_output``: see
    :func:`~loraforge.kernels.lora.lora_linear`)."""
    parts = lora_parts(layer)
    if parts is None:
        return layer(x)
    base, a, b, scaling, dropout = parts
    return lora_linear(x, base, a, b, scaling, dropout if _active(dropout) else None,
                       fp8=fp8 if layer.training else False, unused_output=unused_output, keep_weight=recomputing())


#: whether projections that read the same input (q/k/v, gate/up) run as one group (the benchmarks' A/B switch)
GROUPED = {"on": True}


def group_of(layers: tuple[nn.Module, ...]) -> LoraGroup | None:
    """The projections ``layers`` (reading one input) as a :class:`~loraforge.kernels.lora.LoraGroup`, when the
    fused function covers each, none applies an active dropout (each has its own mask), and their adapters share
    a dtype and device; None otherwise (each is then projected on its own)."""
    if not GROUPED["on"]:
        return None
    bases, lora_a, lora_b, scalings = [], [], [], []
    for layer in layers:
        parts = lora_parts(layer)
        if parts is None:
            return None
        base, a, b, scaling, dropout = parts
        if _active(dropout):
            return None
        bases.append(base)
        lora_a.append(a)
        lora_b.append(b)
        scalings.append(float(scaling))
    first = lora_a[0]
    if any(t.dtype != first.dtype or t.device != first.device for t in (*lora_a, *lora_b)):
        return None
    return LoraGroup(tuple(bases), tuple(lora_a), tuple(lora_b), tuple(scalings))


def project_stacked(layers: tuple[nn.Module, ...], x: torch.Tensor, fp8: bool | str = False
                    ) -> tuple[torch.Tensor | None, LoraGroup | None]:
    """``torch.cat([layer(x) for layer in layers], -1)`` in one fused call, and the group, where :func:`group_of`
    allows it; ``(None, None)`` where it does not (then project each on its own)."""
    group = group_of(layers)
    if group is None:
        return None, None
    return lora_group(x, group, fp8=fp8 if layers[0].training else False, keep_weight=recomputing()), group


def project_group(layers: tuple[nn.Module, ...], x: torch.Tensor, fp8: bool | str = False) -> tuple[torch.Tensor, ...]:
    """``tuple(layer(x) for layer in layers)``: one fused call for the group where :func:`group_of` allows it (the
    outputs are then column slices of one tensor), else one :func:`project` each."""
    out, group = project_stacked(layers, x, fp8)
    if out is None:
        return tuple(project(layer, x, fp8) for layer in layers)
    return out.split(group.outs, dim=-1)


def stack_base_weights(layers: tuple[nn.Module, ...]) -> list[nn.Parameter]:
    """Lay the 16-bit base weights of a group (q/k/v, gate/up) out as consecutive row blocks of one tensor, so the
    group's GEMM reads them as one [sum of outs, in] view (:func:`~loraforge.kernels.lora.stacked_view`) instead of
    concatenating them at every pass. Values, names and shapes are unchanged: each parameter's data becomes a
    view. Returns the parameters laid out (empty when the bases are quantized, trainable, or differ)."""
    from ...kernels.lora import stacked_view

    weights = []
    for layer in layers:
        parts = lora_parts(layer)
        if parts is None or type(parts[0]) is not nn.Linear:
            return []
        weights.append(parts[0].weight)
    first = weights[0]
    if any(w.requires_grad or w.dim() != 2 or w.is_meta or w.dtype != first.dtype or w.device != first.device
           or w.shape[1] != first.shape[1] for w in weights):
        return []
    if stacked_view(weights) is None:
        joined = torch.cat([w.detach() for w in weights])
        row = 0
        for w in weights:
            w.data = joined[row:row + w.shape[0]]
            row += w.shape[0]
    return weights


def unstack_base_weights(weights: list[nn.Parameter]) -> None:
    """Give each weight laid out by :func:`stack_base_weights` its own storage again (for saving and merging)."""
    for w in weights:
        w.data = w.data.clone()


class FastRMSNorm(nn.Module):
    """RMSNorm with the fused kernel; adopts the original module's ``weight`` and epsilon."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.weight = original.weight
        self.variance_epsilon = getattr(original, "variance_epsilon", getattr(original, "eps", 1e-6))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"


class FastMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with fused LoRA projections and the fused SwiGLU kernel.

    In the decoders the fast path covers, the MLP's output is added to the residual stream and becomes the layer's
    output, which nothing in backward reads. So when a checkpointed layer is replayed inside backward
    (:func:`~loraforge.models.fast.checkpointing.recomputing`), ``down_proj`` skips its base GEMM: at Qwen3-8B's
    shapes a quarter of the replay's GEMM work. ``output_read_in_backward`` turns that off for a decoder whose
    layer reads the MLP output again (a post-MLP norm, say)."""

    fp8: bool | str = False  # set by apply_fast_path from `fp8`
    output_read_in_backward = True  # apply_fast_path clears it for the decoders in MLP_OUTPUT_UNREAD

    def __init__(self, original: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = original.gate_proj, original.up_proj, original.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fp8
        unused = not self.output_read_in_backward and recomputing()
        gate_up, _ = project_stacked((self.gate_proj, self.up_proj), x, f)
        if gate_up is None:
            act = swiglu(project(self.gate_proj, x, f), project(self.up_proj, x, f))
        else:  # one [.., 2I] tensor in, its gradient one [.., 2I] tensor out: no split, no concatenation
            act = swiglu_packed(gate_up)
        return project(self.down_proj, act, f, unused_output=unused)


class FastAttention(nn.Module):
    """Self-attention of the Llama family (optional Qwen3 q/k norms, optional Q/K/V bias) on the fast kernels."""

    fp8: bool | str = False  # set by apply_fast_path from `fp8`

    def __init__(self, original: nn.Module):
        super().__init__()
        self.config = original.config
        self.layer_idx = original.layer_idx
        self.head_dim = original.head_dim
        self.scaling = original.scaling
        self.is_causal = True
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, getattr(original, name))
        for name in ("q_norm", "k_norm"):  # Qwen3 normalises each head of q and k
            norm = getattr(original, name, None)
            if norm is not None:
                setattr(self, name, FastRMSNorm(norm))
            else:
                setattr(self, name, None)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise RuntimeError("the fast path's attention is for training; restore the standard modules "
                               "(FastPath.restore()) before generating")
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        f = self.fp8
        q, k, v = (t.view(hidden_shape) for t in project_group((self.q_proj, self.k_proj, self.v_proj),
                                                                 hidden_states, f))
        v = v.contiguous()  # a column slice of the group's output: attention kernels get the usual [B, S, H, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        out, _ = attention_forward(self, q, k, v.transpose(1, 2), None, scaling=self.scaling, **kwargs)
        return project(self.o_proj, out.reshape(*input_shape, -1), f), None
