"""Linear + cross-entropy without the full-vocabulary logits.

The plain loss builds ``hidden @ weight.T`` as [tokens, vocab] logits, upcasts them to fp32 and keeps them
for the backward: for 8192 tokens and Qwen's 151,936 words that is ~12 bytes per token and word, ~14 GiB.
Here the tokens are processed in chunks: each chunk's logits (~256 MiB) give that chunk's loss and, right
away, its gradient with respect to ``hidden`` (and ``weight`` when it is trained), and are freed before the
next chunk. The backward only scales the stored gradients by the incoming one, so the op keeps one
[N, H] gradient instead of [N, V] logits.

The chunking itself is pure PyTorch and runs on every device. Per chunk, the reference path upcasts the
logits to fp32 and takes ~8 element-wise passes over them (logsumexp, exp, one-hot, scaling, downcast);
on CUDA with Triton one kernel (``_ce_kernel``) instead reads the logits in their own dtype twice and
overwrites them with their gradient, so no fp32 copy exists and the chunk can hold twice the tokens.
``LORAFORGE_KERNELS=reference`` keeps the PyTorch chunk path; ``bench_kernels.py`` measures both.
"""

import torch
import torch.nn.functional as F

from loraforge.kernels._triton import jit, tl

# Budget for one chunk's logits buffer (fp32 on the PyTorch path, which also briefly holds a copy in the
# weight dtype for the gradient GEMMs, so its peak is ~1.5x this; the weight dtype on the fused path).
_CHUNK_BYTES = 256 * 2**20
_REDUCTIONS = ("sum", "mean")


def _logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "sum",
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """``F.cross_entropy((hidden @ weight.T).float(), labels)``, materialising the logits (the eager loss)."""
    _check(hidden, weight, labels, reduction)
    return F.cross_entropy(
        _logits(hidden, weight, logit_softcap), labels, ignore_index=ignore_index, reduction=reduction
    )


def default_chunk_tokens(vocab_size: int, bytes_per_logit: int = 4) -> int:
    """Tokens per chunk so that the chunk's logits take about ``_CHUNK_BYTES`` (a multiple of 32)."""
    tokens = _CHUNK_BYTES // (bytes_per_logit * max(1, vocab_size))
    return max(32, tokens // 32 * 32)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    reduction: str = "sum",
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, chunked over tokens; a 0-dim fp32 tensor.

    ``hidden`` is [N, H] (already shifted and flattened by the caller), ``weight`` [V, H], ``labels`` [N]
    with ``ignore_index`` for tokens that carry no loss. ``reduction="mean"`` divides by the number of
    labelled tokens (NaN when there is none, like ``F.cross_entropy``). ``logit_softcap`` applies
    ``cap * tanh(logits / cap)`` first (Gemma 2 style). Gradients reach ``hidden`` and, only when it
    requires grad, ``weight``. Labels must lie in [0, V) or equal ``ignore_index`` (not checked on the
    device: that would cost a host sync per step).
    """
    from loraforge.kernels import use_triton

    return _run(hidden, weight, labels, ignore_index, chunk_tokens, reduction, logit_softcap,
                fused=use_triton(hidden))


def linear_cross_entropy_triton(hidden, weight, labels, *, ignore_index=-100, chunk_tokens=None, reduction="sum",
                                logit_softcap=None) -> torch.Tensor:
    """``linear_cross_entropy`` with the fused Triton chunk kernel, without dispatch (tests call it under
    ``TRITON_INTERPRET=1``)."""
    return _run(hidden, weight, labels, ignore_index, chunk_tokens, reduction, logit_softcap, fused=True)


def _run(hidden, weight, labels, ignore_index, chunk_tokens, reduction, softcap, *, fused):
    _check(hidden, weight, labels, reduction)
    labels = labels.long()  # gather and the kernel index with int64 (a no-op for the usual int64 labels)
    bytes_per_logit = weight.element_size() if fused else 4
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], bytes_per_logit)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, chunk, reduction, softcap,
                                                 fused)
    with torch.no_grad():
        loss, _, _ = _chunked(hidden, weight, labels, ignore_index, chunk, reduction, softcap,
                              grad_hidden=False, grad_weight=False, fused=fused)
    return loss


def _check(hidden, weight, labels, reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            "expected hidden [N, H], weight [V, H] and labels [N]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(labels.shape)} "
            "(flatten the shifted hidden states and labels first)"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"shapes do not match: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"labels {tuple(labels.shape)}"
        )


def _chunked(hidden, weight, labels, ignore_index, chunk, reduction, softcap, *, grad_hidden, grad_weight,
             fused=False):
    """Loss (0-dim fp32) and, when asked, the gradients of the reduced loss w.r.t. hidden and weight.

    ``fused`` runs each chunk's softmax/loss/gradient as one Triton kernel in place over the logits.
    """
    n_tokens = hidden.shape[0]
    valid = labels != ignore_index
    # The divisor for "mean" stays a device tensor: no host sync on the training path.
    count = valid.sum().float() if reduction == "mean" else None
    # Gradients divide by at least 1: with no labelled token they are zero, as F.cross_entropy's are,
    # while the loss itself is 0/0 = NaN, also as there.
    inv_scale = (1.0 / count.clamp(min=1.0) if count is not None
                 else torch.ones((), dtype=torch.float32, device=hidden.device))
    need_grad = grad_hidden or grad_weight
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    # fp32 accumulator across chunks, so a bf16 weight gradient is rounded once, as one big GEMM would.
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
    chunk_fn = _chunk_fused if fused else _chunk_torch
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        h = hidden[start:end]
        chunk_loss, grad = chunk_fn(h, weight, labels[start:end], valid[start:end], ignore_index, softcap,
                                    inv_scale, need_grad)
        loss += chunk_loss
        if grad is None:
            continue
        if grad_hidden:
            d_hidden[start:end] = grad @ weight
        if grad_weight:
            # One GEMM in the weight dtype (fp32 accumulation inside), added to the fp32 accumulator.
            d_weight.add_(grad.T @ h)
        del grad
    if count is not None:
        loss = loss / count
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    return loss, d_hidden, d_weight


def _chunk_torch(h, weight, labels, valid, ignore_index, softcap, inv_scale, need_grad):
    """One chunk in eager PyTorch: (summed loss, gradient of the logits in the weight dtype or None)."""
    target = torch.where(valid, labels, 0).unsqueeze(1)
    logits = _logits(h, weight, softcap)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, target).squeeze(1)
    loss = torch.where(valid, lse - picked, 0.0).sum()
    if not need_grad:
        return loss, None
    if softcap is not None:
        # d(cap * tanh(z / cap))/dz = 1 - tanh^2, from the capped logits themselves.
        dcap = 1.0 - (logits / softcap).square()
    # softmax - onehot, in place in the fp32 logits buffer, then one multiply by a per-row factor that
    # zeroes ignored rows and applies the "mean" divisor.
    grad = logits.sub_(lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, target, torch.full_like(picked, -1.0).unsqueeze(1))
    if softcap is not None:
        grad.mul_(dcap)
        del dcap
    grad.mul_((valid.float() * inv_scale).unsqueeze(1))
    return loss, grad.to(weight.dtype)


def _chunk_fused(h, weight, labels, valid, ignore_index, softcap, inv_scale, need_grad):
    """One chunk with the Triton kernel: the logits stay in the weight dtype (no fp32 copy) and are
    overwritten by their gradient in the same buffer."""
    logits = h @ weight.T
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    row_loss = torch.empty(rows, dtype=torch.float32, device=h.device)
    _ce_kernel[(rows,)](
        logits, logits.stride(0), labels, row_loss, inv_scale, vocab, ignore_index,
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, WRITE_GRAD=need_grad, BLOCK=_CE_BLOCK, num_warps=16,
    )
    return row_loss.sum(), (logits if need_grad else None)


_CE_BLOCK = 4096


@jit
def _ce_kernel(LOGITS, stride_row, LABELS, LOSS, INV_SCALE, n_cols, ignore_index, softcap,
               HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    # One program per token. Pass 1: online max / sum of exponentials over the vocabulary (fp32). Pass 2:
    # overwrite the logits with (softmax - onehot) * scale in the buffer's dtype, the gradient that the
    # following GEMMs need. Softcap: z = cap * tanh(x / cap) and dz/dx = 1 - tanh^2.
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    offs = tl.arange(0, BLOCK)
    m = float("-inf")
    acc = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        in_row = cols < n_cols
        x = tl.load(ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        x = tl.where(in_row, x, float("-inf"))  # after the cap, which would map -inf to -cap
        m_new = tl.maximum(m, tl.max(x, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(acc)
    safe_label = tl.where(valid, label, 0)
    x_label = tl.load(ptr + safe_label).to(tl.float32)
    if HAS_SOFTCAP:
        x_label = softcap * _tanh(x_label / softcap)
    tl.store(LOSS + row, tl.where(valid, lse - x_label, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(INV_SCALE), 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                g = tl.exp(softcap * t - lse) - tl.where(cols == safe_label, 1.0, 0.0)
                g = g * (1.0 - t * t)
            else:
                g = tl.exp(x - lse) - tl.where(cols == safe_label, 1.0, 0.0)
            tl.store(ptr + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


@jit
def _tanh(x):
    # tl has no tanh that also runs in the interpreter. (1 - e) / (1 + e) with e = exp(-2|x|) loses digits
    # to cancellation near 0, so small |x| takes the Taylor series (next term < 1e-7 relative at 0.3).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.3, small, big)
    return tl.where(x < 0, -t, t)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk, reduction, softcap, fused):
        loss, d_hidden, d_weight = _chunked(
            hidden, weight, labels, ignore_index, chunk, reduction, softcap,
            grad_hidden=ctx.needs_input_grad[0], grad_weight=ctx.needs_input_grad[1], fused=fused,
        )
        ctx.save_for_backward(d_hidden, d_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        d_hidden, d_weight = ctx.saved_tensors
        if d_hidden is not None:
            d_hidden = d_hidden * grad_output.to(d_hidden.dtype)
        if d_weight is not None:
            d_weight = d_weight * grad_output.to(d_weight.dtype)
        return d_hidden, d_weight, None, None, None, None, None, None
