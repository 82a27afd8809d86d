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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from loraforge.errors import ModelLoadError
from .dequant import dequantize_4bit, direct_ok
from .fp8 import replays_in_fp8


def dequantize_weight(base_layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of ``base_layer`` in ``dtype`` (a view when it is already a plain tensor)."""
    weight = base_layer.weight
    kind = type(weight).__name__
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        raise ModelLoadError(
            "a 4-bit base weight was repacked by bitsandbytes for its CPU inference kernel (an eval-mode forward "
            "without gradients on a CPU with AVX512-BF16): its bytes no longer have the layout the fast path "
            "dequantizes", hint="load the model for training with loraforge's loader (it keeps the loaded layout), "
            "or set fast_path: off")
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
        self.copies: dict[tuple, tuple[tuple[weakref.ref, ...], int, tuple[int, ...], torch.Tensor]] = {}
        self.hooked = False

    def invalidate(self, *_args: Any) -> None:
        self.generation += 1
        self.copies.clear()

    def _hook(self) -> None:
        if not self.hooked:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            register_optimizer_step_post_hook(self.invalidate)
            self.hooked = True

    def get(self, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if param.dtype == dtype:
            return param.detach()
        return self.joined("copy", (param,), dtype, (), lambda: param.detach().to(dtype))

    def joined(self, kind: str, params: tuple[torch.Tensor, ...], dtype: torch.dtype, extra: tuple,
               build: Any) -> torch.Tensor:
        """A tensor built by ``build()`` from adapter weights (a 16-bit copy of one; a q/k/v group's stacked A's),
        cached under the rule above: valid for these very tensors, at these versions, until an optimizer step."""
        self._hook()
        key = (kind, tuple(id(p) for p in params), dtype, extra)
        hit = self.copies.get(key)
        if (hit is not None and hit[1] == self.generation and all(r() is p for r, p in zip(hit[0], params))
                and hit[2] == tuple(p._version for p in params)):
            return hit[3]
        joined = build()
        self.copies[key] = (tuple(weakref.ref(p) for p in params), self.generation,
                            tuple(p._version for p in params), joined)
        return joined


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
        else:
            weight = dequantize_weight(base_layer, dtype)
            if fp8 and replays_in_fp8(fp8, keep_weight):  # fp8 true; or fp8 "backward" replaying for backward
                from .fp8 import fp8_forward

                out = fp8_forward(x, x2, base_layer, dtype, weight, fast=fp8 is True)
                bias = _bias(base_layer, dtype)
                if bias is not None:
                    out.add_(bias)
            else:
                out = F.linear(x2, weight, _bias(base_layer, dtype))
            if keep_weight:  # the backward comes next: hand it this weight instead of dequantizing again
                if fp8:
                    from .fp8 import cast_weight, weight_scale

                    ctx.kept = cast_weight(weight, weight_scale(base_layer, dtype), transpose=True)
                else:
                    ctx.kept = weight
            del weight
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
        dy = _grad_rows(grad_out, dtype)
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


def _grad_rows(grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The output gradient as [tokens, out] rows in the compute dtype."""
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    return dy if dy.dtype == dtype else dy.to(dtype)


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
    with the frozen weight run in FP8, with ``fp8="backward"`` those that backward runs: the input gradient's, and
    the forward's when it is a replay for backward (``keep_weight``); see :mod:`loraforge.kernels.fp8`.

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


class LoraGroup(NamedTuple):
    """Projections that read the same input (q/k/v; gate/up), each ``(base layer, A, B, scaling)``: one autograd
    node, one base GEMM over their stacked weights, one GEMM for all their A's and one for all their B's."""

    bases: tuple[torch.nn.Module, ...]
    lora_a: tuple[torch.Tensor, ...]
    lora_b: tuple[torch.Tensor, ...]
    scalings: tuple[float, ...]

    @property
    def outs(self) -> tuple[int, ...]:
        return tuple(b.shape[0] for b in self.lora_b)


def joined_weight(bases: tuple[torch.nn.Module, ...], dtype: torch.dtype) -> torch.Tensor:
    """The group's base weights stacked into one [sum of outs, in] tensor in ``dtype``.

    - 4-bit weights that bitsandbytes' kernels dequantize directly: each into its row block of one buffer (no copy).
    - 16-bit weights that are consecutive row blocks of one tensor (``apply_fast_path`` lays a group's 16-bit
      weights out that way): a view of them (no copy).
    - Anything else (8-bit, the CPU's 4-bit): dequantized one by one and concatenated."""
    weights = [b.weight for b in bases]
    if all(type(w).__name__ == "Params4bit" and direct_ok(w, dtype) for w in weights):
        rows = [int(w.quant_state.shape[0]) for w in weights]
        out = torch.empty((sum(rows), int(weights[0].quant_state.shape[1])), dtype=dtype, device=weights[0].device)
        start = 0
        for w, n in zip(weights, rows):
            dequantize_4bit(w, dtype, out=out[start:start + n])
            start += n
        return out
    view = stacked_view(weights)
    if view is not None and view.dtype == dtype:
        return view
    return torch.cat([dequantize_weight(b, dtype) for b in bases])


def stacked_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """``torch.cat(weights)`` as a view, when the plain 2-D weights already lie one after the other in one storage."""
    first = weights[0]
    if type(first).__name__ in ("Params4bit", "Int8Params") or first.dim() != 2:
        return None
    cols, size = first.shape[1], first.element_size()
    end = first.data_ptr()
    storage = first.untyped_storage().data_ptr()
    for w in weights:
        if (type(w) is not type(first) or w.dtype != first.dtype or w.dim() != 2 or w.shape[1] != cols
                or not w.is_contiguous() or w.data_ptr() != end or w.untyped_storage().data_ptr() != storage):
            return None
        end += w.numel() * size
    rows = sum(w.shape[0] for w in weights)
    return first.detach().as_strided((rows, cols), (cols, 1))


def _stacked_a(group: LoraGroup, dtype: torch.dtype) -> torch.Tensor:
    """[sum of ranks, in]: the group's A weights stacked, in ``dtype`` (cached until the next optimizer step)."""
    return COMPUTE_COPIES.joined("a", group.lora_a, dtype, (),
                                 lambda: torch.cat([a.detach() for a in group.lora_a]).to(dtype))


def _block_b(group: LoraGroup, dtype: torch.dtype) -> torch.Tensor:
    """[sum of outs, sum of ranks]: each B times its scaling on the diagonal, zeros elsewhere, in ``dtype``, so
    ``(x A_all^T) B_block^T`` is every projection's adapter output at once (cached until the next optimizer step)."""
    def build() -> torch.Tensor:
        outs, ranks = group.outs, [b.shape[1] for b in group.lora_b]
        block = group.lora_b[0].new_zeros((sum(outs), sum(ranks)), dtype=dtype)
        row = col = 0
        for b, s, o, r in zip(group.lora_b, group.scalings, outs, ranks):
            block[row:row + o, col:col + r] = b.detach() * s
            row, col = row + o, col + r
        return block

    return COMPUTE_COPIES.joined("b", group.lora_b, dtype, group.scalings, build)


def _group_bias(bases: tuple[torch.nn.Module, ...], dtype: torch.dtype) -> torch.Tensor | None:
    biases = [getattr(b, "bias", None) for b in bases]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach() if b is not None else b_layer.weight.new_zeros(b_layer.out_features)
                      for b, b_layer in zip(biases, bases)]).to(dtype)


def group_fp8_scale(bases: tuple[torch.nn.Module, ...], dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """One FP8 scale for the stacked weight (the largest of its weights' scales, so none of them saturates) and
    the cache of its per-column vectors; kept on the first base layer."""
    from .fp8 import weight_scale

    cache = bases[0].__dict__.setdefault("_loraforge_fp8_groups", {})
    key = tuple(id(b) for b in bases)
    hit = cache.get(key)
    if hit is None:
        scale = weight_scale(bases[0], dtype)
        for b in bases[1:]:
            scale = torch.maximum(scale, weight_scale(b, dtype))
        hit = cache[key] = (scale, {})
    return hit


class LoraGroupFunction(torch.autograd.Function):
    """Forward and backward of a :class:`LoraGroup`: ``x W_all^T + (x A_all^T) B_block^T``, one output of the
    stacked width, which the caller splits (q, k, v)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: LoraGroup, fp8: bool | str, keep_weight: bool,
                *adapters: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a_all, b_block = _stacked_a(group, dtype), _block_b(group, dtype)
        fp8 = fp8 if fp8 and all(_fp8_ok(b, x2, dtype) for b in group.bases) else False
        weight = joined_weight(group.bases, dtype)
        if fp8:
            from .fp8 import LAST_ROWS, cast_weight, scale_vector, scaled_mm

            scale, vectors = group_fp8_scale(group.bases, dtype)
        if fp8 and replays_in_fp8(fp8, keep_weight):  # fp8 true; or fp8 "backward" replaying for backward
            xq, xs = LAST_ROWS.get(x, x2)
            w8 = cast_weight(weight, scale)
            out = scaled_mm(xq, xs, w8.t(), scale_vector(vectors, scale, w8.shape[0]), dtype, fast=fp8 is True)
            del w8
            bias = _group_bias(group.bases, dtype)
            if bias is not None:
                out.add_(bias)
        else:
            out = F.linear(x2, weight, _group_bias(group.bases, dtype))
        if keep_weight:
            ctx.kept = cast_weight(weight, scale, transpose=True) if fp8 else weight
        del weight
        xa = x2 @ a_all.t()  # [N, sum of ranks], kept for the B gradients
        out.addmm_(xa, b_block.t())
        ctx.save_for_backward(x2, xa, *adapters)
        ctx.group, ctx.fp8, ctx.shape = group, bool(fp8), shape
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x2, xa, *_ = ctx.saved_tensors
        group = ctx.group
        dtype = x2.dtype
        dy = _grad_rows(grad_out, dtype)
        a_all, b_block = _stacked_a(group, dtype), _block_b(group, dtype)
        dxa = dy @ b_block  # [N, sum of ranks], the scalings included
        zero = dy.new_empty(())
        grads_a, grads_b = [], []
        grad_a_all = dxa.t() @ x2 if any(a.requires_grad for a in group.lora_a) else None
        row = col = 0
        for a, b, s in zip(group.lora_a, group.lora_b, group.scalings):
            o, r = b.shape
            grads_a.append(None if grad_a_all is None or not a.requires_grad else grad_a_all[col:col + r].to(a.dtype))
            # addmm with beta 0 ignores its input: the scaling runs inside the GEMM
            grads_b.append(torch.addmm(zero, dy[:, row:row + o].t(), xa[:, col:col + r], beta=0, alpha=s)
                           .to(b.dtype) if b.requires_grad else None)
            row, col = row + o, col + r
        grad_x = None
        kept, ctx.kept = getattr(ctx, "kept", None), None  # released here, used or not
        if ctx.needs_input_grad[0]:
            if ctx.fp8:
                from .fp8 import cast_weight, quantize_rows, scale_vector, scaled_mm

                scale, vectors = group_fp8_scale(group.bases, dtype)
                if kept is None:
                    kept = cast_weight(joined_weight(group.bases, dtype), scale, transpose=True)
                dq, ds = quantize_rows(dy)
                grad_x = scaled_mm(dq, ds, kept.t(), scale_vector(vectors, scale, kept.shape[0]), dtype, fast=False)
            else:
                grad_x = dy @ (joined_weight(group.bases, dtype) if kept is None else kept)
            grad_x.addmm_(dxa, a_all)
            grad_x = grad_x.reshape(ctx.shape)
        return (grad_x, None, None, None, *grads_a, *grads_b)


def lora_group(x: torch.Tensor, group: LoraGroup, fp8: bool | str = False, keep_weight: bool = False) -> torch.Tensor:
    """The projections of ``group`` applied to ``x`` (no dropout), stacked along the last dimension in the group's
    order; ``fp8`` and ``keep_weight`` as in :func:`lora_linear`. Split the result with ``group.outs``."""
    return LoraGroupFunction.apply(x, group, fp8, keep_weight, *group.lora_a, *group.lora_b)
