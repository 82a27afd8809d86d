"""RMSNorm as Qwen2/Qwen3/Llama/Mistral compute it, with a fused Triton forward and backward.

Hugging Face's ``Qwen3RMSNorm.forward`` (and ``LlamaRMSNorm``, identical) does, in this order:
normalise in fp32, cast the normalised tensor back to the input dtype, then multiply by the weight, so the
output dtype is the promotion of the two (bf16 input with fp32 weights gives fp32). The kernel reproduces
that rounding step, so in bf16 it matches the eager module up to the last bit of the row statistics.

The backward saves the input and one fp32 ``rstd`` per row. Eager autograd keeps the fp32 upcast of the
input (twice the bytes of a bf16 activation), plus the bf16 normalised tensor when the weight trains.
"""

import torch

from loraforge.kernels._triton import cdiv, jit, next_power_of_2, program_count, tl


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The exact eager computation of ``transformers`` Qwen3RMSNorm/LlamaRMSNorm (``weight`` of shape [H])."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension; the Triton kernel where ``use_triton(x)``, else the reference."""
    from loraforge.kernels import use_triton

    if use_triton(x) and x.shape[-1] <= _MAX_COLS:
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton autograd Function without dispatch (tests call it under ``TRITON_INTERPRET=1``)."""
    return _RMSNormFunction.apply(x, weight, eps)


# One program holds whole rows in registers; wider rows (no covered model has them) take the reference.
_MAX_COLS = 32768


def _launch_shape(n_cols: int, backward: bool = False) -> tuple[int, int, int]:
    """(block of columns, rows per program, warps) for one program.

    Narrow rows (q/k norms, head_dim 128) are batched so a program still moves a few thousand elements;
    wide rows (hidden 4096+) take one row per program. The backward holds five fp32 values per element:
    at 16 elements per thread it needs ~130 registers (one 8-warp program per SM on Hopper), so it gets
    8 elements per thread (~64-80 registers, checked by the sm_90 compile test).
    """
    block = next_power_of_2(n_cols)
    if not backward:
        rows = max(1, min(16, 4096 // block))
        return block, rows, (4 if block <= 2048 else 8 if block <= 8192 else 16)
    rows = max(1, min(16, 2048 // block))
    return block, rows, min(32, max(4, rows * block // 256))


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, cols] with unit column stride (a copy only when the layout forces one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _head_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``t`` as rows the kernels address in place: ``(view, rows, token stride, heads, head stride)``.

    A plain tensor is [rows, cols] (one "head"). Per-head q/k of a grouped q/k/v projection ([.., H, D] column
    slices of one wider output) cannot be viewed as [rows, D]; they are addressed as [tokens, H, D], row ``r``
    at ``(r // H) * token_stride + (r % H) * head_stride``, instead of copied."""
    if t.dim() >= 3 and t.stride(-1) == 1:
        try:
            t.view(-1, t.shape[-1])
        except RuntimeError:
            try:
                t3 = t.view(-1, t.shape[-2], t.shape[-1])
            except RuntimeError:
                pass
            else:
                return t3, t3.shape[0] * t3.shape[1], t3.stride(0), t3.shape[1], t3.stride(1)
    t2 = _rows_view(t)
    return t2, t2.shape[0], t2.stride(0), 1, 0


@jit
def _rms_norm_fwd(X, W, Y, RSTD, n_rows, n_cols, stride_x, heads, stride_xh, stride_y, eps,
                  ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x_rows = (rows // heads) * stride_x + (rows % heads) * stride_xh  # see _head_rows
    x = tl.load(X + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    # Round the normalised row to the input dtype before the weight multiply, as the eager module does.
    normed = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = normed * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, stride_dy, stride_x, heads, stride_xh, stride_dx,
                  HAS_DW: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # Persistent programs: each walks every nprog-th block of rows and keeps its share of dW in registers,
    # so the partial-dW buffer is [programs, H] rather than [rows, H].
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for block_id in range(pid, tl.cdiv(n_rows, ROWS), nprog):
        rows = (block_id * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        x_rows = (rows // heads) * stride_x + (rows % heads) * stride_xh
        x = tl.load(X + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        dn = dy * w[None, :]
        # d/dx of x * rstd(x): rstd * (dn - xhat * mean(dn * xhat)).
        c = tl.sum(dn * xhat, axis=1) / n_cols
        dx = (dn - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            normed = xhat.to(X.dtype.element_ty).to(tl.float32)
            dw_acc += tl.sum(dy * normed, axis=0)
    if HAS_DW:
        tl.store(DW_PART + pid * n_cols + cols, dw_acc, mask=col_ok)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xr, n_rows, stride_x, heads, stride_xh = _head_rows(x)
        n_cols = x.shape[-1]
        y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, rows, warps = _launch_shape(n_cols)
        ctx.save_for_backward(xr, weight, rstd)
        ctx.x_shape, ctx.layout = x.shape, (n_rows, stride_x, heads, stride_xh)
        if n_rows == 0:
            return y.view(x.shape)
        _rms_norm_fwd[(cdiv(n_rows, rows),)](
            xr, weight, y, rstd, n_rows, n_cols, stride_x, heads, stride_xh, y.stride(0), eps,
            ROWS=rows, BLOCK=block, num_warps=warps,
        )
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, stride_x, heads, stride_xh = ctx.layout
        n_cols = x2.shape[-1]
        dy2 = _rows_view(dy)
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        has_dw = ctx.needs_input_grad[1]
        block, rows, warps = _launch_shape(n_cols, backward=True)
        nprog = max(1, min(program_count(x2.device), cdiv(n_rows, rows)))
        dw_part = torch.zeros((nprog, n_cols), dtype=torch.float32, device=x2.device) if has_dw else dx
        if n_rows == 0:
            return dx.view(ctx.x_shape), (dw_part.sum(0).to(weight.dtype) if has_dw else None), None
        _rms_norm_bwd[(nprog,)](
            dy2, x2, weight, rstd, dx, dw_part, n_rows, n_cols, dy2.stride(0), stride_x, heads, stride_xh, dx.stride(0),
            HAS_DW=has_dw, ROWS=rows, BLOCK=block, num_warps=warps,
        )
        dw = dw_part.sum(0).to(weight.dtype) if has_dw else None
        return dx.view(ctx.x_shape), dw, None

