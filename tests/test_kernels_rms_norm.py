"""RMSNorm: the reference is HF's module to the bit; the dispatch takes it on CPU; the kernel matches it on GPU."""

from __future__ import annotations

import pytest
import torch

from loraforge.kernels import rms_norm, rms_norm_reference, use_triton

import kernel_cases as cases


def _hf_norms():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    return [Qwen3RMSNorm, Qwen2RMSNorm, LlamaRMSNorm, MistralRMSNorm]


@pytest.mark.parametrize("cls", _hf_norms(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_reference_is_the_hf_module_bit_for_bit(cls, x_dtype, w_dtype):
    torch.manual_seed(0)
    module = cls(37, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * torch.randn(37))
    module.to(w_dtype)
    x = (torch.randn(3, 5, 37) * 4).to(x_dtype)
    expected = module(x)
    got = rms_norm_reference(x, module.weight, module.variance_epsilon)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_reference_gradients_are_the_hf_modules():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    torch.manual_seed(1)
    module = Qwen3RMSNorm(19, eps=1e-5)
    x = torch.randn(4, 19, requires_grad=True)
    dy = torch.randn(4, 19)
    want = torch.autograd.grad(module(x), (x, module.weight), dy)
    got = torch.autograd.grad(rms_norm_reference(x, module.weight, 1e-5), (x, module.weight), dy)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_cpu_dispatch_takes_the_reference():
    x, w = torch.randn(2, 8), torch.randn(8)
    assert not use_triton(x)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_reference_switch_is_honoured(monkeypatch):
    """``LORAFORGE_KERNELS=reference`` turns the kernels off even where they could run."""
    monkeypatch.setenv("LORAFORGE_KERNELS", "reference")

    class FakeCuda:
        is_cuda = True

    assert not use_triton(FakeCuda())


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@needs_cuda
@pytest.mark.parametrize("rows,cols", [(8192, 4096), (8192 * 8, 128), (1000, 5120), (3, 77)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_reference_on_gpu(rows, cols, dtype):
    from loraforge.kernels.rms_norm import rms_norm_triton

    cases.check_rms_norm(rms_norm_triton, rms_norm_reference, rows=rows, cols=cols, device="cuda", dtype=dtype)


@gpu
@needs_cuda
def test_triton_frozen_and_fp32_weight_on_gpu():
    from loraforge.kernels.rms_norm import rms_norm_triton

    cases.check_rms_norm(rms_norm_triton, rms_norm_reference, rows=4096, cols=4096, device="cuda",
                         dtype=torch.bfloat16, weight_grad=False)
    cases.check_rms_norm(rms_norm_triton, rms_norm_reference, rows=4096, cols=4096, device="cuda",
                         dtype=torch.bfloat16, weight_dtype=torch.float32)


@gpu
@needs_cuda
def test_dispatch_runs_the_kernel_on_gpu():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    assert use_triton(x)
    assert "RMSNormFunction" in type(rms_norm(x, w, 1e-6).grad_fn).__name__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_head_slices_on_gpu(dtype):
    from loraforge.kernels.rms_norm import rms_norm_reference, rms_norm_triton

    cases.check_rms_norm_head_slices(rms_norm_triton, rms_norm_reference, device="cuda", dtype=dtype,
                                     tokens=2048, heads=32, head_dim=128, kv_heads=8)
