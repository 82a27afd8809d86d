"""Linear + cross-entropy without the full-vocabulary logits.

The plain loss builds ``hidden @ weight.T`` as [tokens, vocab] logits, upcasts them to fp32 and keeps them
for the backward: for 8192 tokens and Qwen's 151,936 words that is ~12 bytes per token and word, ~14 GiB.
Here the tokens are processed in chunks: each chunk's fp32 logits (a few hundred MiB) give that chunk's
loss and, right away, its gradient with respect to ``hidden`` (and ``weight`` when it is trained), and are
freed before the next chunk. The backward only scales the stored gradients by the incoming one.

Pure PyTorch on every device: the memory win comes from the chunking, and the two GEMMs per chunk
dominate the time, so a Triton kernel would only save a few element-wise passes over one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Budget for one chunk's fp32 logits; the chunk also briefly holds a copy in the weight dtype for the
# gradient GEMMs, so the peak added by the loss is about 1.5x this.
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


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that the chunk's fp32 logits take about ``_CHUNK_BYTES`` (a multiple of 32)."""
    tokens = _CHUNK_BYTES // (4 * max(1, vocab_size))
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
    requires grad, ``weight``.
    """
    _check(hidden, weight, labels, reduction)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, chunk, reduction,
                                                 logit_softcap)
    with torch.no_grad():
        loss, _, _ = _chunked(hidden, weight, labels, ignore_index, chunk, reduction, logit_softcap,
                              grad_hidden=False, grad_weight=False)
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


def _chunked(hidden, weight, labels, ignore_index, chunk, reduction, softcap, *, grad_hidden, grad_weight):
    """Loss (0-dim fp32) and, when asked, the gradients of the reduced loss w.r.t. hidden and weight."""
    n_tokens = hidden.shape[0]
    valid = labels != ignore_index
    # The divisor for "mean" stays a device tensor: no host sync on the training path.
    count = valid.sum().float() if reduction == "mean" else None
    # Gradients divide by at least 1: with no labelled token they are zero, as F.cross_entropy's are,
    # while the loss itself is 0/0 = NaN, also as there.
    scale = count.clamp(min=1.0) if count is not None else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    # fp32 accumulator across chunks, so a bf16 weight gradient is rounded once, as one big GEMM would.
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        h = hidden[start:end]
        ok = valid[start:end]
        target = torch.where(ok, labels[start:end], 0).unsqueeze(1)
        logits = _logits(h, weight, softcap)
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, target).squeeze(1)
        loss += torch.where(ok, lse - picked, 0.0).sum()
        if not (grad_hidden or grad_weight):
            continue
        if softcap is not None:
            # d(cap * tanh(z / cap))/dz = 1 - tanh^2, from the capped logits themselves.
            dcap = 1.0 - (logits / softcap).square()
        # softmax - onehot, computed in place in the logits buffer; ignored rows get zero gradient.
        grad = logits.sub_(lse.unsqueeze(1)).exp_()
        grad.scatter_add_(1, target, torch.full_like(picked, -1.0).unsqueeze(1))
        grad.mul_(ok.unsqueeze(1))
        if softcap is not None:
            grad.mul_(dcap)
            del dcap
        if scale is not None:
            grad.div_(scale)
        grad = grad.to(weight.dtype)
        if grad_hidden:
            d_hidden[start:end] = grad @ weight
        if grad_weight:
            # One GEMM in the weight dtype (fp32 accumulation inside), added to the fp32 accumulator.
            d_weight.add_(grad.T @ h)
        del grad, logits
    if count is not None:
        loss = loss / count
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    return loss, d_hidden, d_weight


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk, reduction, softcap):
        loss, d_hidden, d_weight = _chunked(
            hidden, weight, labels, ignore_index, chunk, reduction, softcap,
            grad_hidden=ctx.needs_input_grad[0], grad_weight=ctx.needs_input_grad[1],
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
        return d_hidden, d_weight, None, None, None, None, None
