"""RoPE: the reference is HF's apply_rotary_pos_emb with HF's own tables; the kernel matches it."""

from __future__ import annotations

import pytest
import torch

from loraforge.kernels import apply_rope, apply_rope_reference, use_triton

import kernel_cases as cases


def _hf(arch):
    if arch == "qwen3":
        from transformers import Qwen3Config as Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as Rotary
        from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb
    else:
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rotary
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    config = Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return Rotary(config), apply_rotary_pos_emb


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_hf_apply_rotary_pos_emb(arch, dtype):
    rotary, hf_apply = _hf(arch)
    torch.manual_seed(0)
    q = torch.randn(2, 6, 4, 16).to(dtype).transpose(1, 2)  # [B, H, S, D] views, as HF attention makes them
    k = torch.randn(2, 6, 2, 16).to(dtype).transpose(1, 2)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]])  # the second row is packed
    cos, sin = rotary(q, position_ids)
    assert cos.shape == (2, 6, 16)
    want_q, want_k = hf_apply(q, k, cos, sin)
    got_q, got_k = apply_rope_reference(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_reference_gradients_are_hf():
    rotary, hf_apply = _hf("qwen3")
    q = torch.randn(1, 4, 5, 16, requires_grad=True)
    k = torch.randn(1, 2, 5, 16, requires_grad=True)
    cos, sin = rotary(q, torch.arange(5)[None])
    dq, dk = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    want = torch.autograd.grad(hf_apply(q, k, cos, sin), (q, k), (dq, dk))
    got = torch.autograd.grad(apply_rope_reference(q, k, cos, sin), (q, k), (dq, dk))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_test_tables_are_hf_tables():
    """The GPU and interpreter cases build cos/sin themselves; they must be what Qwen3 builds."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    config = Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=1_000_000)
    rotary = Qwen3RotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1), torch.arange(7)[None].expand(2, 7))
    ours_cos, ours_sin = cases.rope_tables(2, 7, 16, "cpu")
    torch.testing.assert_close(ours_cos, cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_sin, sin, rtol=1e-6, atol=1e-6)


def test_cpu_dispatch_takes_the_reference():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = cases.rope_tables(1, 3, 8, "cpu")
    assert not use_triton(q)
    for a, b in zip(apply_rope(q, k, cos, sin), apply_rope_reference(q, k, cos, sin)):
        assert torch.equal(a, b)


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@needs_cuda
@pytest.mark.parametrize("batch,seq,qh,kh,dim", [(4, 2048, 32, 8, 128), (1, 16384, 40, 8, 128), (3, 77, 14, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_reference_on_gpu(batch, seq, qh, kh, dim, dtype):
    from loraforge.kernels.rope import apply_rope_triton

    cases.check_rope(apply_rope_triton, apply_rope_reference, batch=batch, seq=seq, q_heads=qh, kv_heads=kh,
                     head_dim=dim, device="cuda", dtype=dtype)


@gpu
@needs_cuda
def test_triton_bf16_is_eager_bit_for_bit_on_gpu():
    """The kernel rounds each product as the eager expression does, so bf16 outputs are identical."""
    from loraforge.kernels.rope import apply_rope_triton

    cos, sin = cases.rope_tables(2, 512, 128, "cuda")
    q = torch.randn(2, 512, 32, 128, device="cuda").bfloat16().transpose(1, 2)
    k = torch.randn(2, 512, 8, 128, device="cuda").bfloat16().transpose(1, 2)
    got = apply_rope_triton(q, k, cos.bfloat16(), sin.bfloat16())
    want = apply_rope_reference(q, k, cos.bfloat16(), sin.bfloat16())
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@gpu
@needs_cuda
def test_dispatch_runs_the_kernel_on_gpu():
    cos, sin = cases.rope_tables(1, 8, 16, "cuda")
    q = torch.randn(1, 4, 8, 16, device="cuda", requires_grad=True)
    k = torch.randn(1, 2, 8, 16, device="cuda", requires_grad=True)
    assert use_triton(q)
    assert "RoPEFunction" in type(apply_rope(q, k, cos, sin)[0].grad_fn).__name__
