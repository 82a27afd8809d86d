"""Rotary position embedding as ``transformers``' ``apply_rotary_pos_emb`` (rotate_half convention).

Shapes follow Qwen3/Llama attention in transformers 5: ``q`` [B, Hq, S, D] and ``k`` [B, Hk, S, D] (often
transposed views of [B, S, H, D] projections: any strides with a unit last stride are read in place), and
``cos``/``sin`` [B, S, D] (or [1, S, D]) as the rotary embedding module returns them, per token, so
packed sequences with restarting ``position_ids`` need nothing special.

One Triton program handles one token: it loads that token's cos/sin row once and rotates every query
and key head with it. The backward is the transposed rotation (rope with ``-sin`` when, as always in HF,
both halves of cos/sin are equal) and saves only cos and sin. No gradient flows to cos/sin: they are
computed from position ids and never trained.
"""

import torch

from loraforge.kernels._triton import jit, next_power_of_2, tl


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The eager computation of ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate ``q`` and ``k`` by the per-token ``cos``/``sin``; returns ``(q_embed, k_embed)``.

    The Triton kernel where ``use_triton(q)``, else the reference.
    """
    from loraforge.kernels import use_triton

    if use_triton(q) and q.dim() == 4 and k.dim() == 4 and q.shape[-1] % 2 == 0:
        return apply_rope_triton(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The Triton autograd Function without dispatch (tests call it under ``TRITON_INTERPRET=1``)."""
    return _RoPEFunction.apply(q, k, cos, sin)


@jit
def _rotate_heads(X, Out, b, s, n_heads, sxb, sxh, sxs, sob, soh, sos, c1, c2, s1, s2,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BACKWARD: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (d < HALF)[None, :]
    x_row = X + b * sxb + s * sxs + heads[:, None] * sxh + d[None, :]
    o_row = Out + b * sob + s * sos + heads[:, None] * soh + d[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of the forward rotation: [[c1, -s1], [s2, c2]]^T.
        o1 = x1 * c1[None, :] + x2 * s2[None, :]
        o2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        # Round each product to the input dtype, as the eager expression ``q * cos + rotate_half(q) * sin``
        # does in bf16/fp16 (a no-op in fp32), so the kernel matches it bit for bit.
        dt = X.dtype.element_ty
        o1 = (x1 * c1[None, :]).to(dt).to(tl.float32) - (x2 * s1[None, :]).to(dt).to(tl.float32)
        o2 = (x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)
    tl.store(o_row, o1.to(Out.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF, o2.to(Out.dtype.element_ty), mask=mask)


@jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, seq_len, n_qh, n_kh,
                 sqb, sqh, sqs, skb, skh, sks, sqob, sqoh, sqos, skob, skoh, skos, scb, scs,
                 HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    d = tl.arange(0, BLOCK_HALF)
    dm = d < HALF
    base = b * scb + s * scs
    c1 = tl.load(COS + base + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(COS + base + HALF + d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + base + d, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + base + HALF + d, mask=dm, other=0.0).to(tl.float32)
    _rotate_heads(Q, QO, b, s, n_qh, sqb, sqh, sqs, sqob, sqoh, sqos, c1, c2, s1, s2,
                  HALF, BLOCK_QH, BLOCK_HALF, BACKWARD)
    _rotate_heads(K, KO, b, s, n_kh, skb, skh, sks, skob, skoh, skos, c1, c2, s1, s2,
                  HALF, BLOCK_KH, BLOCK_HALF, BACKWARD)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, cos, sin, backward: bool):
    """Rotate (or, for the backward, counter-rotate) ``q`` and ``k`` into new tensors of the same layout."""
    q, k = _unit_last(q), _unit_last(k)
    batch, n_qh, seq_len, head_dim = q.shape
    n_kh = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # keeps q's/k's memory layout (e.g. [B, S, H, D])
    if batch * seq_len == 0:
        return qo, ko
    half = head_dim // 2
    block_qh, block_half = next_power_of_2(n_qh), next_power_of_2(half)
    # ~8 elements per thread and half: 32 heads x 64 take ~40 registers at 8 warps, ~80-90 at 4.
    warps = min(16, max(4, block_qh * block_half // 256))
    _rope_kernel[(batch * seq_len,)](
        q, k, qo, ko, cos, sin, seq_len, n_qh, n_kh,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), cos.stride(1),
        HALF=half, BLOCK_QH=block_qh, BLOCK_KH=next_power_of_2(n_kh), BLOCK_HALF=block_half, BACKWARD=backward,
        num_warps=warps,
    )
    return qo, ko


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        batch, seq_len = q.shape[0], q.shape[2]
        # [1, S, D] broadcasts over the batch through a zero stride; sin is laid out like cos.
        cos = _unit_last(cos.reshape(-1, seq_len, q.shape[-1])).expand(batch, seq_len, -1)
        sin = _unit_last(sin.reshape(-1, seq_len, q.shape[-1])).expand(batch, seq_len, -1)
        if sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = _launch(dq, dk, cos, sin, backward=True)
        return dq_in, dk_in, None, None
