"""Chunked linear + cross-entropy: equal to the materialised loss (and HF's model loss) in value and gradients."""

from __future__ import annotations

import pytest
import torch

from loraforge.kernels import linear_cross_entropy, linear_cross_entropy_reference
from loraforge.kernels.cross_entropy import default_chunk_tokens

REL = dict(rtol=1e-5, atol=1e-6)


def _case(n=53, h=24, v=71, seed=0, ignore_every=3, weight_grad=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g)).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, upstream=1.0, **kw):
    loss = fn(hidden, weight, labels, **kw)
    wanted = [t for t in (hidden, weight) if t.requires_grad]
    return loss, torch.autograd.grad(loss * upstream, wanted)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 53, 1000, None])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_equals_materialised_loss(reduction, chunk, softcap):
    hidden, weight, labels = _case()
    kw = dict(reduction=reduction, logit_softcap=softcap)
    loss, grads = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, upstream=2.5, chunk_tokens=chunk, **kw)
    ref, ref_grads = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels, upstream=2.5, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, **REL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **REL)


@pytest.mark.parametrize("n,h,v,seed", [(1, 1, 2, 1), (31, 9, 257, 2), (64, 40, 1001, 3)])
def test_odd_shapes(n, h, v, seed):
    hidden, weight, labels = _case(n, h, v, seed=seed, ignore_every=0)
    loss, grads = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_tokens=5)
    ref, ref_grads = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels)
    torch.testing.assert_close(loss, ref, **REL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **REL)


def test_frozen_weight_gets_no_gradient():
    hidden, weight, labels = _case(weight_grad=False)
    linear_cross_entropy(hidden, weight, labels, chunk_tokens=8).backward()
    assert weight.grad is None
    ref_hidden = hidden.detach().clone().requires_grad_()
    linear_cross_entropy_reference(ref_hidden, weight, labels).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, **REL)


def test_all_ignored_chunks_and_batches():
    hidden, weight, labels = _case(n=40)
    labels[:24] = -100  # three whole chunks of 8 carry no label
    loss, grads = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_tokens=8)
    ref, ref_grads = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels)
    torch.testing.assert_close(loss, ref, **REL)
    assert torch.count_nonzero(grads[0][:24]) == 0
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **REL)

    labels[:] = -100
    for reduction in ("sum", "mean"):
        loss, grads = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_tokens=8, reduction=reduction)
        ref, ref_grads = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels, reduction=reduction)
        torch.testing.assert_close(loss, ref, equal_nan=True)  # sum: 0; mean: NaN, as F.cross_entropy
        for a, b in zip(grads, ref_grads):
            assert torch.equal(a, b) and torch.count_nonzero(a) == 0


def test_custom_ignore_index():
    hidden, weight, labels = _case(ignore_every=0)
    labels[::4] = 5
    loss = linear_cross_entropy(hidden, weight, labels, ignore_index=5, chunk_tokens=9, reduction="mean")
    ref = linear_cross_entropy_reference(hidden, weight, labels, ignore_index=5, reduction="mean")
    torch.testing.assert_close(loss, ref, **REL)


def test_int32_labels():
    hidden, weight, labels = _case()
    loss = linear_cross_entropy(hidden, weight, labels.int(), chunk_tokens=10)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, labels), **REL)


def test_without_grad_gives_the_same_loss():
    hidden, weight, labels = _case()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, labels).detach(), **REL)


def test_bf16_inputs_follow_the_reference():
    """bf16 hidden/weight: logits are rounded to bf16 before the fp32 upcast, exactly as the eager loss does."""
    hidden, weight, labels = _case(dtype=torch.bfloat16, n=40, h=32, v=300)
    loss, grads = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_tokens=16)
    ref, ref_grads = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16
        # bf16 gradients: within a couple of bf16 steps of the largest entry (chunked vs one GEMM).
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2 * b.abs().max().item())


def test_equals_the_hf_model_loss():
    """The loss a tiny Qwen3ForCausalLM computes from ``labels`` (shift, mean over labelled tokens)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = Qwen3ForCausalLM(config).eval()
    input_ids = torch.randint(0, 97, (2, 11))
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, -2:] = -100
    out = model(input_ids=input_ids, labels=labels)
    hidden = model.model(input_ids=input_ids).last_hidden_state
    shift_hidden = hidden[:, :-1].reshape(-1, 32)
    shift_labels = labels[:, 1:].reshape(-1)
    ours = linear_cross_entropy(shift_hidden, model.lm_head.weight, shift_labels, chunk_tokens=6, reduction="mean")
    torch.testing.assert_close(ours, out.loss, **REL)
    want = torch.autograd.grad(out.loss, model.lm_head.weight)[0]
    got = torch.autograd.grad(ours, model.lm_head.weight)[0]
    torch.testing.assert_close(got, want, **REL)


def test_references_compose_to_the_hf_qwen3_model():
    """A 2-layer Qwen3 rebuilt from the dispatching ops (the references on CPU): HF's loss and every
    parameter gradient within 1e-4, the fast path's numerics target."""
    import kernel_cases as cases
    from loraforge.kernels import apply_rope, rms_norm, swiglu

    cases.check_qwen3_model(dict(rms_norm=rms_norm, apply_rope=apply_rope, swiglu=swiglu,
                                 linear_cross_entropy=lambda *a, **k: linear_cross_entropy(*a, chunk_tokens=4, **k)))


def test_default_chunk_keeps_logits_near_256_mib():
    chunk = default_chunk_tokens(151936)
    assert chunk % 32 == 0 and 200 * 2**20 < chunk * 151936 * 4 <= 256 * 2**20
    assert default_chunk_tokens(10) >= 32


def test_rejects_bad_arguments():
    hidden, weight, labels = _case()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="flatten"):
        linear_cross_entropy(hidden[None], weight, labels)
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(hidden, weight, labels[:-1])


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@needs_cuda
@pytest.mark.parametrize("kernels", ["triton", "reference"])
def test_gpu_bf16_qwen3_vocab_matches_and_saves_memory(kernels, monkeypatch):
    """Qwen3-8B's head at 4096 tokens in bf16, through the fused kernel and through the PyTorch chunk path:
    same loss/gradient as the eager loss, a fraction of its memory."""
    monkeypatch.setenv("LORAFORGE_KERNELS", kernels)
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(4096, 4096, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (0.02 * torch.randn(151936, 4096, device="cuda", generator=g)).bfloat16()
    labels = torch.randint(0, 151936, (4096,), device="cuda", generator=g)
    labels[:100] = -100

    def run(fn):
        hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(hidden, weight, labels, reduction="mean")
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), hidden.grad.clone(), torch.cuda.max_memory_allocated() - base

    loss, grad, peak = run(linear_cross_entropy)
    ref, ref_grad, ref_peak = run(linear_cross_entropy_reference)
    torch.testing.assert_close(loss, ref, rtol=5e-4, atol=1e-4)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2e-2, atol=2e-2 * ref_grad.abs().max().item())
    assert peak < ref_peak / 4, (peak, ref_peak)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap,weight_grad", [(None, False), (30.0, True)])
def test_gpu_fused_kernel_matches_reference(dtype, softcap, weight_grad):
    import kernel_cases as cases
    from loraforge.kernels.cross_entropy import linear_cross_entropy_triton

    cases.check_linear_cross_entropy(linear_cross_entropy_triton, linear_cross_entropy_reference, tokens=1000,
                                     hidden=512, vocab=32003, device="cuda", dtype=dtype, reduction="mean",
                                     softcap=softcap, chunk_tokens=300, weight_grad=weight_grad)
