"""Parity checks of the Triton kernels against their references, shared by two callers.

``test_kernels_triton.py`` runs them in fp32 on CPU tensors under ``TRITON_INTERPRET=1``, and the
``gpu``-marked tests of each ``test_kernels_<op>.py`` run them on CUDA in bf16 (and fp32). Each check takes
the implementation under test, so the same case proves the interpreter and the compiled kernel.

Tolerances: in fp32 the kernels must equal the reference up to reduction order (``FP32``). In bf16 the
output is compared with the eager bf16 reference (which the kernels reproduce rounding step by rounding
step) and the gradients with an fp32 reference on the same inputs: a bf16 value carries ~3 significant
digits, so ``BF16`` allows one to two units in the last place of the result's scale.
"""

from __future__ import annotations

import torch

FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)


def tol(dtype: torch.dtype) -> dict:
    return FP32 if dtype == torch.float32 else BF16


def _grads(outputs, inputs, cotangents):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    cotangents = cotangents if isinstance(cotangents, tuple) else (cotangents,)
    wanted = [t for t in inputs if t.requires_grad]
    return torch.autograd.grad(outputs, wanted, cotangents)


def _leaf(t: torch.Tensor, dtype: torch.dtype, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_(requires_grad)


def _close(actual, expected, dtype, what, summed: bool = False):
    # Scale-aware: compare against the reference's magnitude so large-valued gradients are not over-strict. A sum
    # over many rows (a weight gradient) is scale-aware in fp32 too: its rounding grows with the sum, and the GPU
    # kernel adds the rows in another order than autograd does (65,536 rows: ~4e-5 on values of ~300).
    expected = expected.float()
    t = tol(dtype)
    scale = expected.abs().max().clamp(min=1.0).item() if dtype != torch.float32 or summed else 1.0
    torch.testing.assert_close(actual.float(), expected, rtol=t["rtol"], atol=t["atol"] * scale,
                               msg=lambda m: f"{what}: {m}")


def check_rms_norm(impl, reference, *, rows: int, cols: int, device: str, dtype: torch.dtype,
                   weight_grad: bool = True, weight_dtype: torch.dtype | None = None, seed: int = 0) -> None:
    """``impl(x, w, eps)`` against ``reference``: output, dx and (if trained) dw."""
    g = torch.Generator().manual_seed(seed)
    x32 = torch.randn(rows, cols, generator=g) * 3
    w32 = 1 + 0.1 * torch.randn(cols, generator=g)
    dy32 = torch.randn(rows, cols, generator=g)
    wd = weight_dtype or dtype
    x, w = _leaf(x32.to(device), dtype), _leaf(w32.to(device), wd, weight_grad)
    y = impl(x, w, 1e-6)
    assert y.dtype == torch.promote_types(dtype, wd)
    if dtype != torch.float32:  # the kernel reproduces the eager rounding steps
        _close(y, reference(x, w, 1e-6), dtype, "rms_norm output vs eager")
    xr, wr = _leaf(x32.to(device), torch.float32), _leaf(w32.to(device), torch.float32, weight_grad)
    yr = reference(xr, wr, 1e-6)
    _close(y, yr, dtype, "rms_norm output")
    dy = dy32.to(device)
    got = _grads(y, (x, w), dy.to(y.dtype))
    want = _grads(yr, (xr, wr), dy)
    assert len(got) == (2 if weight_grad else 1)
    for name, a, b in zip(("dx", "dw"), got, want):
        _close(a, b, dtype, f"rms_norm {name}", summed=name == "dw")


def check_swiglu(impl, reference, *, rows: int, cols: int, device: str, dtype: torch.dtype,
                 fused_slices: bool = False, packed: bool = False, seed: int = 0) -> None:
    """``impl(gate, up)`` against ``reference``; ``fused_slices`` feeds column views of one [rows, 2I] tensor;
    ``packed``: ``impl(gate_up)`` takes that [rows, 2I] tensor itself (its gradient is one tensor too)."""
    fused_slices = fused_slices or packed
    g = torch.Generator().manual_seed(seed)
    gu32 = torch.randn(rows, 2 * cols, generator=g) * 2
    dy32 = torch.randn(rows, cols, generator=g)

    def inputs(dt):
        if fused_slices:
            gu = _leaf(gu32.to(device), dt)
            return gu, (gu[:, :cols], gu[:, cols:])
        gate, up = _leaf(gu32[:, :cols].to(device), dt), _leaf(gu32[:, cols:].to(device), dt)
        return None, (gate, up)

    fused, (gate, up) = inputs(dtype)
    y = impl(fused) if packed else impl(gate, up)
    if dtype != torch.float32:
        _close(y, reference(gate, up), dtype, "swiglu output vs eager")
    fused_r, (gate_r, up_r) = inputs(torch.float32)
    yr = reference(gate_r, up_r)
    _close(y, yr, dtype, "swiglu output")
    dy = dy32.to(device)
    got = _grads(y, (fused,) if fused_slices else (gate, up), dy.to(y.dtype))
    want = _grads(yr, (fused_r,) if fused_slices else (gate_r, up_r), dy)
    for a, b in zip(got, want):
        _close(a, b, dtype, "swiglu grad")


def rope_tables(batch: int, seq: int, head_dim: int, device: str, *, broadcast_batch: bool = False,
                packed: bool = False):
    """cos/sin as Qwen3RotaryEmbedding builds them ([B, S, D], both halves equal), fp32.

    ``packed`` restarts the positions mid-sequence, as packed samples do.
    """
    inv_freq = 1.0 / (1_000_000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq, dtype=torch.float32)
    if packed:
        pos = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)]).float()
    pos = pos.expand(1 if broadcast_batch else batch, seq)
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def check_rope(impl, reference, *, batch: int, seq: int, q_heads: int, kv_heads: int, head_dim: int,
               device: str, dtype: torch.dtype, transposed: bool = True, broadcast_batch: bool = False,
               generic_tables: bool = False, seed: int = 0) -> None:
    """``impl(q, k, cos, sin)`` against ``reference``; ``transposed`` passes [B, S, H, D].transpose(1, 2)
    views as the HF attention does; ``generic_tables`` uses random cos/sin (halves unequal)."""
    g = torch.Generator().manual_seed(seed)
    q32 = torch.randn(batch, seq, q_heads, head_dim, generator=g)
    k32 = torch.randn(batch, seq, kv_heads, head_dim, generator=g)
    dq32 = torch.randn(batch, q_heads, seq, head_dim, generator=g)
    dk32 = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    if generic_tables:
        nb = 1 if broadcast_batch else batch
        cos32, sin32 = torch.randn(nb, seq, head_dim, generator=g), torch.randn(nb, seq, head_dim, generator=g)
        cos32, sin32 = cos32.to(device), sin32.to(device)
    else:
        cos32, sin32 = rope_tables(batch, seq, head_dim, device, broadcast_batch=broadcast_batch, packed=True)

    def inputs(dt):
        ql, kl = _leaf(q32.to(device), dt), _leaf(k32.to(device), dt)
        if transposed:
            return ql, kl, ql.transpose(1, 2), kl.transpose(1, 2)
        ql = _leaf(q32.transpose(1, 2).contiguous().to(device), dt)
        kl = _leaf(k32.transpose(1, 2).contiguous().to(device), dt)
        return ql, kl, ql, kl

    ql, kl, q, k = inputs(dtype)
    qo, ko = impl(q, k, cos32.to(dtype), sin32.to(dtype))
    if dtype != torch.float32:
        qe, ke = reference(q, k, cos32.to(dtype), sin32.to(dtype))
        _close(qo, qe, dtype, "rope q vs eager")
        _close(ko, ke, dtype, "rope k vs eager")
    qlr, klr, qr, kr = inputs(torch.float32)
    qro, kro = reference(qr, kr, cos32, sin32)
    _close(qo, qro, dtype, "rope q")
    _close(ko, kro, dtype, "rope k")
    dq, dk = dq32.to(device), dk32.to(device)
    got = _grads((qo, ko), (ql, kl), (dq.to(dtype), dk.to(dtype)))
    want = _grads((qro, kro), (qlr, klr), (dq, dk))
    for name, a, b in zip(("dq", "dk"), got, want):
        _close(a, b, dtype, f"rope {name}")


def check_linear_cross_entropy(impl, reference, *, tokens: int, hidden: int, vocab: int, device: str,
                               dtype: torch.dtype, reduction: str = "sum", softcap: float | None = None,
                               chunk_tokens: int | None = None, weight_grad: bool = False, seed: int = 0) -> None:
    """``impl(hidden, weight, labels, ...)`` against ``reference`` on the same inputs: loss and gradients.

    The reference runs on the same (possibly bf16) inputs: both round the logits to the input dtype before
    the fp32 loss, so the loss agrees to fp32 accuracy and the gradients to a step of their dtype.
    """
    g = torch.Generator().manual_seed(seed)
    h = _leaf(torch.randn(tokens, hidden, generator=g).to(device), dtype)
    w = _leaf((torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 4).to(device), dtype, weight_grad)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::5] = -100
    labels[: min(tokens, 9)] = -100  # a chunk with no label at all
    labels = labels.to(device)
    kw = dict(reduction=reduction, logit_softcap=softcap)
    loss = impl(h, w, labels, chunk_tokens=chunk_tokens, **kw)
    ref = reference(h, w, labels, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # bf16: chunked and whole GEMMs may round a logit differently (another tiling); the mean absorbs it.
    torch.testing.assert_close(loss, ref, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5, equal_nan=True)
    got = _grads(loss * 1.5, (h, w), torch.ones(()))
    want = _grads(ref * 1.5, (h, w), torch.ones(()))
    assert len(got) == (2 if weight_grad else 1)
    for name, a, b in zip(("d_hidden", "d_weight"), got, want):
        assert a.dtype == b.dtype
        _close(a, b, dtype, f"linear_cross_entropy {name}")


def tiny_qwen3(seed: int = 0):
    """A 2-layer random Qwen3ForCausalLM (fp32, eval mode: no dropout) and a batch with ignored labels."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong weight gradient cannot hide behind ones
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    input_ids = torch.randint(0, 97, (2, 7))
    labels = input_ids.clone()
    labels[0, :3] = -100
    return model, input_ids, labels


def qwen3_loss_with(ops: dict, model, input_ids, labels) -> torch.Tensor:
    """Qwen3ForCausalLM's forward and loss rebuilt from the model's own weights with ``ops`` (rms_norm,
    apply_rope, swiglu, linear_cross_entropy), in the layouts HF uses: q/k norms on [B, S, H, D], RoPE on
    the transposed [B, H, S, D] views. Shows the ops compose to the model's exact loss and gradients."""
    import torch.nn.functional as F

    inner = model.model
    batch, seq = input_ids.shape
    h = inner.embed_tokens(input_ids)
    cos, sin = inner.rotary_emb(h, torch.arange(seq)[None].expand(batch, seq))
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        x = ops["rms_norm"](h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        heads = (batch, seq, -1, attn.head_dim)
        q = ops["rms_norm"](attn.q_proj(x).view(heads), attn.q_norm.weight, attn.q_norm.variance_epsilon)
        k = ops["rms_norm"](attn.k_proj(x).view(heads), attn.k_norm.weight, attn.k_norm.variance_epsilon)
        v = attn.v_proj(x).view(heads).transpose(1, 2)
        q, k = ops["apply_rope"](q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(batch, seq, -1))
        x = ops["rms_norm"](h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        h = h + mlp.down_proj(ops["swiglu"](mlp.gate_proj(x), mlp.up_proj(x)))
    h = ops["rms_norm"](h, inner.norm.weight, inner.norm.variance_epsilon)
    hidden = h[:, :-1].reshape(-1, h.shape[-1])
    return ops["linear_cross_entropy"](hidden, model.lm_head.weight, labels[:, 1:].reshape(-1), reduction="mean")


def check_qwen3_model(ops: dict, *, rtol: float = 1e-4) -> None:
    """The loss and every parameter's gradient with ``ops`` equal HF's ``model(input_ids, labels=labels)``."""
    model, input_ids, labels = tiny_qwen3()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    want_loss = model(input_ids=input_ids, labels=labels).loss
    want = torch.autograd.grad(want_loss, params)
    loss = qwen3_loss_with(ops, model, input_ids, labels)
    got = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(names, got, want):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"grad of {n}: {m}")


def check_rms_norm_head_slices(impl, reference, *, device: str, dtype: torch.dtype, tokens: int = 6, heads: int = 4,
                               head_dim: int = 16, kv_heads: int = 2) -> None:
    """The per-head q/k norms of a grouped q/k/v output: ``impl`` on [B, S, H, D] column slices of one
    [B, S, (H + 2 kv) D] tensor (addressed in place, no copy) against ``reference`` on contiguous copies."""
    g = torch.Generator().manual_seed(3)
    width = (heads + 2 * kv_heads) * head_dim
    qkv32 = torch.randn(2, tokens, width, generator=g) * 3
    w32 = 1 + 0.1 * torch.randn(head_dim, generator=g)
    dy32 = torch.randn(2, tokens, heads, head_dim, generator=g)
    qkv, w = _leaf(qkv32.to(device), dtype), _leaf(w32.to(device), dtype)
    q = qkv[..., : heads * head_dim].view(2, tokens, heads, head_dim)
    assert not q.is_contiguous()
    y = impl(q, w, 1e-6)
    qkv_r, w_r = _leaf(qkv32.to(device), torch.float32), _leaf(w32.to(device), torch.float32)
    y_r = reference(qkv_r[..., : heads * head_dim].reshape(2, tokens, heads, head_dim), w_r, 1e-6)
    _close(y, y_r, dtype, "rms_norm of head slices")
    got = _grads(y, (qkv, w), dy32.to(device).to(y.dtype))
    want = _grads(y_r, (qkv_r, w_r), dy32.to(device))
    for a, b, what in zip(got, want, ("dqkv", "dw")):
        _close(a, b, dtype, f"rms_norm of head slices: {what}", summed=what == "dw")
