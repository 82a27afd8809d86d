"""SwiGLU: the reference is the HF MLP's activation; the kernel matches it (interpreter and GPU)."""

from __future__ import annotations

import pytest
import torch

from loraforge.kernels import swiglu, swiglu_reference, use_triton

import kernel_cases as cases


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_reference_rebuilds_the_hf_mlp(arch):
    if arch == "qwen3":
        from transformers import Qwen3Config as Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP as MLP
    else:
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaMLP as MLP
    torch.manual_seed(0)
    config = Config(hidden_size=24, intermediate_size=40, hidden_act="silu", num_attention_heads=4,
                    num_key_value_heads=2)
    mlp = MLP(config)
    x = torch.randn(2, 5, 24)
    ours = mlp.down_proj(swiglu_reference(mlp.gate_proj(x), mlp.up_proj(x)))
    assert torch.equal(ours, mlp(x))


def test_reference_bf16_rounds_like_eager():
    gate = torch.randn(64, 33).bfloat16()
    up = torch.randn(64, 33).bfloat16()
    assert torch.equal(swiglu_reference(gate, up), torch.nn.functional.silu(gate) * up)


def test_cpu_dispatch_takes_the_reference():
    gate, up = torch.randn(3, 10), torch.randn(3, 10)
    assert not use_triton(gate)
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@needs_cuda
@pytest.mark.parametrize("rows,cols,fused", [(8192, 12288, False), (8192, 12288, True), (1000, 1111, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_reference_on_gpu(rows, cols, fused, dtype):
    from loraforge.kernels.swiglu import swiglu_triton

    cases.check_swiglu(swiglu_triton, swiglu_reference, rows=rows, cols=cols, device="cuda", dtype=dtype,
                       fused_slices=fused)


@gpu
@needs_cuda
def test_dispatch_runs_the_kernel_on_gpu():
    gate = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert "SwiGLUFunction" in type(swiglu(gate, torch.randn_like(gate)).grad_fn).__name__


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_kernel_matches_reference_on_gpu(dtype):
    from loraforge.kernels.swiglu import _SwiGLUPackedFunction

    cases.check_swiglu(_SwiGLUPackedFunction.apply, swiglu_reference, rows=8192, cols=12288, device="cuda",
                       dtype=dtype, packed=True)


def test_packed_dispatch_on_cpu_takes_the_reference():
    from loraforge.kernels.swiglu import swiglu_packed

    gate_up = torch.randn(3, 4, 20)
    assert torch.equal(swiglu_packed(gate_up), swiglu_reference(gate_up[..., :10], gate_up[..., 10:]))
