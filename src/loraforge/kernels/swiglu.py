"""SwiGLU, ``silu(gate) * up``, the activation of the Qwen/Llama/Mistral MLP, with a fused Triton kernel.

Eager PyTorch runs two kernels and autograd keeps ``silu(gate)`` besides ``gate`` and ``up``; the fused
backward recomputes the sigmoid from ``gate`` instead, so only the two inputs are saved, and forward and
backward each read and write every element once.

``gate`` and ``up`` may be column slices of one fused gate/up projection output ([..., 2I] split in two):
the kernels take a row stride, so such views are used in place without a copy. :func:`swiglu_packed` takes that
[..., 2I] output itself and returns its gradient as one [..., 2I] tensor, so autograd never splits it (a split's
backward concatenates the two gradients: one more copy of the widest activation of the layer).
"""

import torch
import torch.nn.functional as F

from loraforge.kernels._triton import cdiv, jit, tl


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The eager computation of the HF MLP (``act_fn(gate_proj(x)) * up_proj(x)`` with ``act_fn = silu``)."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; the Triton kernel where ``use_triton(gate)``, else the reference."""
    from loraforge.kernels import use_triton

    if use_triton(gate) and gate.shape == up.shape:
        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = cat([gate, up], -1)`` (a grouped gate/up projection's output)."""
    from loraforge.kernels import use_triton

    if use_triton(gate_up) and gate_up.shape[-1] % 2 == 0:
        return _SwiGLUPackedFunction.apply(gate_up)
    return swiglu_packed_reference(gate_up)


def swiglu_packed_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_reference(gate, up)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Triton autograd Function without dispatch (tests call it under ``TRITON_INTERPRET=1``)."""
    return _SwiGLUFunction.apply(gate, up)


_BLOCK = 1024


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, cols] with unit column stride; a column slice keeps its row stride (no copy)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@jit
def _swiglu_fwd(G, U, Y, n_cols, stride_g, stride_u, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    # Round silu(gate) to the input dtype before the product, as the two eager kernels do.
    act = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd(DY, G, U, DG, DU, n_cols, stride_dy, stride_g, stride_u, stride_dg, stride_du,
                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = g * sig
    # silu'(g) = sig * (1 + g * (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (dy * act).to(DU.dtype.element_ty), mask=mask)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g2, u2 = _rows_view(gate), _rows_view(up)
        n_rows, n_cols = g2.shape
        y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        if y.numel():
            _swiglu_fwd[(n_rows, cdiv(n_cols, _BLOCK))](
                g2, u2, y, n_cols, g2.stride(0), u2.stride(0), y.stride(0), BLOCK=_BLOCK,
            )
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        n_rows, n_cols = g2.shape
        dy2 = _rows_view(dy)
        dg = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
        du = torch.empty((n_rows, n_cols), dtype=u2.dtype, device=u2.device)
        if dg.numel():
            _swiglu_bwd[(n_rows, cdiv(n_cols, _BLOCK))](
                dy2, g2, u2, dg, du, n_cols,
                dy2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0), BLOCK=_BLOCK,
            )
        return dg.view(ctx.shape), du.view(ctx.shape)


class _SwiGLUPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gu = _rows_view(gate_up)
        n_rows, width = gu.shape
        n_cols = width // 2
        y = torch.empty((n_rows, n_cols), dtype=gu.dtype, device=gu.device)
        if y.numel():
            _swiglu_fwd[(n_rows, cdiv(n_cols, _BLOCK))](
                gu, gu[:, n_cols:], y, n_cols, gu.stride(0), gu.stride(0), y.stride(0), BLOCK=_BLOCK,
            )
        ctx.save_for_backward(gu)
        ctx.shape = gate_up.shape
        return y.view(*gate_up.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy):
        (gu,) = ctx.saved_tensors
        n_rows, width = gu.shape
        n_cols = width // 2
        dy2 = _rows_view(dy)
        dgu = torch.empty((n_rows, width), dtype=gu.dtype, device=gu.device)
        if dgu.numel():
            _swiglu_bwd[(n_rows, cdiv(n_cols, _BLOCK))](
                dy2, gu, gu[:, n_cols:], dgu, dgu[:, n_cols:], n_cols,
                dy2.stride(0), gu.stride(0), gu.stride(0), dgu.stride(0), dgu.stride(0), BLOCK=_BLOCK,
            )
        return dgu.view(ctx.shape)
