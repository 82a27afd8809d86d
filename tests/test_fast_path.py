"""The fast path equals the standard path: logits, loss and every LoRA gradient (fp32, CPU, tiny random
Qwen3 / Qwen2 / Llama / Mistral), packed samples stay apart, 4-bit and 8-bit bases, dropout, rsLoRA, and
restore() gives the standard modules back."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from loraforge.models.fast import FastPathPlan, apply_fast_path
from loraforge.models.fast.loss import FusedCausalLMLoss, no_logits

from fast_models import SIZES, TARGETS, lora_grads, tiny_model

def standard_loss(model, ids, labels, **kw):
    return model(input_ids=ids, labels=labels, **kw).loss


def fast_loss(model, ids, labels, **kw):
    loss_fn = FusedCausalLMLoss(model)
    try:
        out = model(input_ids=ids, logits_to_keep=no_logits(ids), **kw)
        assert out.logits.numel() == 0  # the full-vocabulary logits are never built
        return loss_fn(out, labels)
    finally:
        loss_fn.close()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max().clamp(min=1e-6))


def _assert_same_loss_and_grads(std, fast_model, ref: torch.Tensor, got: torch.Tensor) -> None:
    """The fast path's loss and every LoRA gradient within 1e-4 of the standard path's."""
    assert abs(got.item() - ref.item()) <= 1e-4 * abs(ref.item())
    for name, grad in lora_grads(std).items():
        assert _close(lora_grads(fast_model)[name], grad), name


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama", "mistral"])
def test_fast_path_equals_standard(arch):
    std = tiny_model(arch)
    fast_model = copy.deepcopy(std)
    fast = apply_fast_path(fast_model, FastPathPlan(True, "test"))
    assert fast.swapped == {"attention": 2, "MLP": 2, "RMSNorm": 5}
    ids = torch.randint(0, 256, (2, 24))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 20:] = -100

    with torch.no_grad():
        torch.testing.assert_close(fast_model(input_ids=ids).logits, std(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    ref = standard_loss(std, ids, labels)
    ref.backward()
    got = fast_loss(fast_model, ids, labels)
    got.backward()
    assert abs(got.item() - ref.item()) <= 1e-4 * abs(ref.item())
    ref_grads, got_grads = lora_grads(std), lora_grads(fast_model)
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) == 2 * 2 * len(TARGETS)
    for name in ref_grads:
        assert _close(got_grads[name], ref_grads[name]), name


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointed_fast_path_equals_standard(dropout):
    """With checkpointing on, the fast path recomputes each layer in backward from its saved (offloaded on a
    GPU) input, replaying dropout masks: the gradients equal the standard path's (checkpointed as well)."""
    std = tiny_model("qwen3", dropout=dropout)
    fast_model = copy.deepcopy(std)
    for m in (std, fast_model):
        m.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.get_base_model().enable_input_require_grads()
    std.train()
    fast_model.train()
    fast = apply_fast_path(fast_model, FastPathPlan(True, "test"))
    assert fast.offloaded == 2 and "host memory" in fast.summary()
    ids = torch.randint(0, 256, (2, 16))
    torch.manual_seed(3)
    ref = standard_loss(std, ids, ids)
    ref.backward()
    torch.manual_seed(3)
    got = fast_loss(fast_model, ids, ids)
    got.backward()
    _assert_same_loss_and_grads(std, fast_model, ref, got)


@pytest.mark.parametrize("arch,dropout", [("qwen3", 0.0), ("llama", 0.1), ("qwen2", 0.0), ("mistral", 0.0)])
def test_replayed_layer_skips_the_unread_down_projection(arch, dropout, monkeypatch):
    """Replayed in backward, each layer's down_proj returns zeros instead of its base GEMM (its output is only the
    root of the layer's backward): once per layer, never in the first forward, and every gradient equals the full
    replay's and the standard path's."""
    from loraforge.models.fast import modules

    calls = []
    real = modules.lora_linear
    monkeypatch.setattr(modules, "lora_linear", lambda *a, **kw: calls.append(kw["unused_output"]) or real(*a, **kw))
    std = tiny_model(arch, dropout=dropout)
    grads = []
    for read in (False, True):  # skipping (the default), then the full replay
        model = copy.deepcopy(std)
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.get_base_model().enable_input_require_grads()
        model.train()
        apply_fast_path(model, FastPathPlan(True, "test"))
        mlps = [m for m in model.modules() if isinstance(m, modules.FastMLP)]
        assert len(mlps) == 2 and all(not m.output_read_in_backward for m in mlps)
        for m in mlps:
            m.output_read_in_backward = read
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        calls.clear()
        torch.manual_seed(3)
        loss = fast_loss(model, ids, ids)
        # without dropout q/k/v and gate/up run as groups: o_proj and down_proj alone call lora_linear
        per_layer = 7 if dropout else 2
        assert calls == [False] * (2 * per_layer)  # the first forward: 2 layers, all computed
        loss.backward()
        assert calls[2 * per_layer:].count(True) == (0 if read else 2) and len(calls) == 4 * per_layer
        grads.append((loss.detach(), lora_grads(model)))
    (loss_skip, skip), (loss_full, full) = grads
    assert torch.equal(loss_skip, loss_full)
    for name in full:
        torch.testing.assert_close(skip[name], full[name], rtol=1e-6, atol=1e-7, msg=name)
    std.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    std.get_base_model().enable_input_require_grads()
    std.train()
    torch.manual_seed(3)
    ref = standard_loss(std, ids, ids)
    ref.backward()
    for name, grad in lora_grads(std).items():
        assert _close(skip[name], grad), name


def test_recomputing_is_true_only_inside_the_replay_and_on_its_thread():
    import threading

    from loraforge.models.fast import checkpointing

    assert not checkpointing.recomputing()
    seen = []
    with checkpointing._recompute_scope():
        seen.append(checkpointing.recomputing())
        other = threading.Thread(target=lambda: seen.append(checkpointing.recomputing()))
        other.start()
        other.join()
    assert seen == [True, False] and not checkpointing.recomputing()


def test_packed_samples_do_not_attend_to_each_other():
    """Two samples in one row (positions restart) give each sample's own loss: the fast path's varlen attention
    against the standard path run on each sample alone."""
    model = tiny_model("qwen3")
    apply_fast_path(model, FastPathPlan(True, "test"))
    a, b = torch.randint(0, 256, (1, 11)), torch.randint(0, 256, (1, 7))
    row = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(11), torch.arange(7)])[None]
    labels = row.clone()
    labels[0, 11] = -100  # the first label of each sample is never a target (no shift across samples)
    with torch.no_grad():
        packed = fast_loss(model, row, labels, position_ids=pos) * (labels[:, 1:] != -100).sum()
        alone = (fast_loss(model, a, a) * 10 + fast_loss(model, b, b) * 6)
    assert abs(packed.item() - alone.item()) <= 1e-4 * alone.item()


def test_dropout_and_rslora_match():
    std = tiny_model("qwen3", dropout=0.1, rslora=True)
    fast_model = copy.deepcopy(std)
    apply_fast_path(fast_model, FastPathPlan(True, "test"))
    ids = torch.randint(0, 256, (2, 16))
    torch.manual_seed(1)
    ref = standard_loss(std, ids, ids)
    ref.backward()
    torch.manual_seed(1)  # same dropout masks: both paths draw them in the same order
    got = fast_loss(fast_model, ids, ids)
    got.backward()
    _assert_same_loss_and_grads(std, fast_model, ref, got)


def test_restore_gives_the_standard_modules_back():
    model = tiny_model("llama")
    before = [type(m).__name__ for m in model.modules()]
    names = [n for n, _ in model.named_parameters()]
    fast = apply_fast_path(model, FastPathPlan(True, "test"))
    assert [n for n, _ in model.named_parameters()] == names  # same parameter names: same adapter files
    assert "FastAttention" in {type(m).__name__ for m in model.modules()}
    fast.restore()
    assert [type(m).__name__ for m in model.modules()] == before
    assert model.get_base_model().config._attn_implementation == "sdpa"
    out = model.generate(torch.randint(0, 256, (1, 5)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def _quantized_tiny_qwen3(bits: int):
    """A tiny random Qwen3 loaded through bitsandbytes (4-bit nf4 + double quantization, or LLM.int8) on the CPU."""
    import tempfile

    import transformers

    config = transformers.Qwen3Config(**SIZES, head_dim=16)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        q = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
             if bits == 4 else transformers.BitsAndBytesConfig(load_in_8bit=True))
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, dtype=torch.float32,
                                                                 attn_implementation="sdpa", device_map={"": "cpu"})
    for p in base.parameters():
        p.requires_grad_(False)
    return base


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_matches(bits):
    """QLoRA: the fused function dequantizes the same bitsandbytes weights peft's layers use."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from loraforge.models.quantization import keep_loaded_layout

    base = _quantized_tiny_qwen3(bits)
    keep_loaded_layout(base)  # as loraforge's loader does for training: bitsandbytes' layers compute as loaded
    std = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    ids = torch.randint(0, 256, (2, 12))
    ref = standard_loss(std, ids, ids)
    ref.backward()
    ref_grads = lora_grads(std)
    std.zero_grad(set_to_none=True)
    apply_fast_path(std, FastPathPlan(True, "test"))  # same weights, now through the fast modules
    got = fast_loss(std, ids, ids)
    got.backward()
    if bits == 8:
        # LLM.int8 quantizes the activations too (in fp16); the fused function multiplies by the dequantized
        # weight in the input dtype, so the two agree only to ~1%: the exact check is test_lora_linear_function
        assert abs(got.item() - ref.item()) <= 2e-2 * abs(ref.item())
        return
    assert abs(got.item() - ref.item()) <= 1e-3 * abs(ref.item())
    for name, grad in ref_grads.items():
        assert _close(lora_grads(std)[name], grad, rel=1e-3), name


def test_fast_path_refuses_a_repacked_4bit_weight():
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel at an eval-mode, no-grad
    forward (loraforge's loader turns that off: tests/test_models_adapters.py). A repacked weight is refused by the
    fast path, never read in the old layout."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import has_avx512bf16

    from loraforge.errors import ModelLoadError
    from loraforge.kernels.lora import dequantize_weight

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    # bitsandbytes' inference default on one square layer (its repacking fails on this tiny model's 96-wide down_proj)
    q_proj = _quantized_tiny_qwen3(4).model.layers[0].self_attn.q_proj.eval()
    with torch.no_grad():
        q_proj(torch.randn(2, q_proj.in_features))
    with pytest.raises(ModelLoadError, match="repacked"):
        dequantize_weight(q_proj, torch.float32)


@pytest.mark.parametrize("kind", ["plain", "bias", "4bit", "8bit"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_linear_function(kind, dropout):
    """The fused autograd function against plain autograd on the same (dequantized) weight: output and the
    gradients of x, A and B, for plain / biased / 4-bit / 8-bit bases, with and without dropout."""
    from loraforge.kernels.lora import lora_linear, lora_linear_reference

    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40, bias=kind == "bias")
    if kind in ("4bit", "8bit"):
        bnb = pytest.importorskip("bitsandbytes")
        if kind == "4bit":
            base = bnb.nn.Linear4bit(48, 40, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            base.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
        else:
            base = bnb.nn.Linear8bitLt(48, 40, bias=False, has_fp16_weights=False)
            base.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        base = base.to("cpu")  # quantizes
    else:
        base = linear.requires_grad_(False)
    a = torch.randn(4, 48, requires_grad=True)
    b = torch.randn(40, 4, requires_grad=True)
    drop = torch.nn.Dropout(dropout) if dropout else None
    results = []
    for fn in (lora_linear_reference, lora_linear):
        x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        torch.manual_seed(2)
        out = fn(x, base, a, b, 0.5, drop)
        out.pow(2).sum().backward()
        results.append((out.detach(), x.grad, a.grad.clone(), b.grad.clone()))
        a.grad = b.grad = None
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8, replay", [(False, True), ("backward", False), ("backward", True), (True, True)])
def test_kept_weight_serves_the_backward_without_a_second_dequantization(fp8, replay, monkeypatch):
    """``keep_weight`` (a replayed layer): the backward uses the weight the forward dequantized (or its e4m3
    transpose) and dequantizes nothing; output and gradients equal the ordinary call's with the same forward
    precision (under ``fp8: backward`` a replay's forward GEMM is FP8, or 16-bit with ``fp8.REPLAY`` off)."""
    bnb = pytest.importorskip("bitsandbytes")
    from loraforge.kernels import fp8 as fp8_module
    from loraforge.kernels import lora

    monkeypatch.setitem(fp8_module.REPLAY, "on", replay)

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(48, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(32, 48), requires_grad=False, quant_type="nf4")
    base = base.to("cpu")
    a, b = torch.randn(4, 48, requires_grad=True), torch.randn(32, 4, requires_grad=True)
    if fp8:  # the weight's one FP8 scale is measured at its first use, from one more dequantization
        from loraforge.kernels.fp8 import weight_scale

        weight_scale(base, torch.float32)
    calls = []
    real = lora.dequantize_weight
    monkeypatch.setattr(lora, "dequantize_weight", lambda *args: calls.append(1) or real(*args))
    plain = True if fp8 == "backward" and replay else fp8  # the ordinary call with the replay's forward precision
    results = []
    for keep, setting in ((False, plain), (True, fp8)):
        x = torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        out = lora.lora_linear(x, base, a, b, 0.5, fp8=setting, keep_weight=keep)
        calls.clear()
        out.pow(2).sum().backward()
        assert len(calls) == (0 if keep else 1)
        results.append((out.detach(), x.grad, a.grad.clone(), b.grad.clone()))
        a.grad = b.grad = None
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    if fp8 == "backward":  # and the replay's forward differs from the 16-bit one exactly when it runs in FP8
        x = torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(1))
        assert torch.equal(results[1][0], lora.lora_linear(x, base, a, b, 0.5).detach()) is not replay


def test_adapter_compute_copies_follow_every_weight_update():
    """The 16-bit adapter copies are made once per optimizer step and never outlive a change of the weight:
    a torch optimizer step, an optimizer that writes through ``.data`` (as bitsandbytes' 8-bit kernels do, with
    no version bump), and an in-place write outside any optimizer."""
    from loraforge.kernels.lora import COMPUTE_COPIES, compute_copy

    bf16 = torch.bfloat16
    a = torch.nn.Parameter(torch.randn(4, 8))
    first = compute_copy(a, bf16)
    assert compute_copy(a, bf16) is first  # cached between steps
    assert compute_copy(a, torch.float32) is not first and compute_copy(a, torch.float32).dtype == torch.float32
    a.grad = torch.ones_like(a)
    torch.optim.SGD([a], lr=0.5).step()
    assert torch.equal(compute_copy(a, bf16), a.detach().to(bf16))

    class DataWriter(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(1.0)

    before = compute_copy(a, bf16)
    version = a._version
    DataWriter([a]).step()
    assert a._version == version  # the write is invisible to the version counter
    assert not torch.equal(before, a.detach().to(bf16))
    assert torch.equal(compute_copy(a, bf16), a.detach().to(bf16))
    with torch.no_grad():
        a.mul_(2)
    assert torch.equal(compute_copy(a, bf16), a.detach().to(bf16))
    other = torch.nn.Parameter(torch.zeros(4, 8))  # a dead tensor's entry under this id is never handed out
    key = ("copy", (id(other),), bf16, ())
    compute_copy(other, bf16)
    assert key in COMPUTE_COPIES.copies  # the entry the stale one below replaces
    COMPUTE_COPIES.copies[key] = ((lambda: None,), COMPUTE_COPIES.generation, (other._version,),
                                  torch.ones(4, 8, dtype=bf16))
    assert torch.equal(compute_copy(other, bf16), torch.zeros(4, 8, dtype=bf16))


def test_cached_adapter_copies_train_exactly_as_casting_at_every_use(monkeypatch):
    """bf16 compute over fp32 adapters, two micro-batches per step, three AdamW steps: the cached copies give
    bit-for-bit the weights of casting at every use."""
    from loraforge.kernels import lora

    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24, bias=False).to(torch.bfloat16).requires_grad_(False)
    init_a, init_b = torch.randn(4, 32) * 0.1, torch.randn(24, 4) * 0.1
    runs = []
    for cached in (False, True):
        if not cached:
            monkeypatch.setattr(lora, "compute_copy", lambda param, dtype: param.detach().to(dtype))
        else:
            monkeypatch.undo()
        a, b = torch.nn.Parameter(init_a.clone()), torch.nn.Parameter(init_b.clone())
        opt = torch.optim.AdamW([a, b], lr=1e-2)
        for step in range(3):
            for micro in range(2):  # accumulation: the second micro-batch reuses the step's copies
                x = torch.randn(6, 32, generator=torch.Generator().manual_seed(10 * step + micro)).to(torch.bfloat16)
                lora.lora_linear(x, base, a, b, 2.0).float().pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        runs.append((a.detach(), b.detach()))
    assert not torch.equal(runs[1][0], init_a)
    for ref, got in zip(*runs):
        assert torch.equal(got, ref)


def _cfg(**over):
    finetuning = dict(finetuning_type="lora", use_dora=False, pissa_init=False, fast_path="auto")
    model = dict(upcast_layernorm=False, flash_attn="auto", disable_gradient_checkpointing=False)
    for key, value in over.items():
        (finetuning if key in finetuning else model)[key] = value
    return SimpleNamespace(finetuning=SimpleNamespace(**finetuning), model=SimpleNamespace(**model),
                           data=SimpleNamespace(cutoff_len=1024), training=None)


def test_plan_says_why_not():
    from loraforge.errors import ConfigError
    from loraforge.models.fast import plan_fast_path

    qwen3 = SimpleNamespace(model_type="qwen3", hidden_act="silu", attention_dropout=0.0, sliding_window=None)
    assert plan_fast_path(_cfg(), qwen3).enabled
    assert plan_fast_path(_cfg(fast_path="off"), qwen3).reason == "fast_path: off"
    plan = plan_fast_path(_cfg(use_dora=True), qwen3)
    assert not plan.enabled and "DoRA" in plan.reason
    gemma = SimpleNamespace(model_type="gemma2", hidden_act="gelu")
    assert "gemma2" in plan_fast_path(_cfg(), gemma).reason
    with pytest.raises(ConfigError, match="fast_path: on"):
        plan_fast_path(_cfg(fast_path="on"), gemma)


@pytest.mark.gpu
@pytest.mark.parametrize("gqa", ["native", "repeat"])
def test_varlen_attention_kernel_matches_reference_on_gpu(gqa, monkeypatch):
    """PyTorch's flash varlen kernel (bf16, GQA: K/V heads shared natively or repeated) against the per-sample
    SDPA reference, forward and backward."""
    from loraforge.kernels import varlen_attention as va
    from loraforge.kernels.varlen_attention import varlen_attention, varlen_attention_reference

    monkeypatch.setitem(va.GQA_MODE, "mode", gqa)

    torch.manual_seed(0)
    lens = [37, 300, 1, 128, 555]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    total = sum(lens)
    results = []
    for fn in (varlen_attention_reference, lambda q, k, v, c, s: varlen_attention(q, k, v, c, max(lens), s)):
        g = torch.Generator(device="cuda").manual_seed(1)
        q = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
        k = torch.randn(total, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
        v = torch.randn(total, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
        out = fn(q, k, v, cu, 128 ** -0.5)
        out.float().pow(2).sum().backward()
        results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    for ref, got in zip(*results):  # bf16 rounding: a few elements differ by a unit in the last place
        assert (got - ref).abs().max() <= 3e-2 * ref.abs().max()
        assert (got - ref).abs().mean() <= 1e-2 * ref.abs().mean()


def test_one_sequence_rows_take_the_dense_path_and_packed_rows_the_varlen_kernel(monkeypatch):
    """Rows that each hold one sequence go to dense SDPA (cuDNN on Hopper); rows with packed samples never do."""
    from loraforge.kernels import varlen_attention as va

    calls = []
    monkeypatch.setattr(va, "dense_attention_preferred", lambda q: True)
    monkeypatch.setattr(va, "dense_causal_attention", lambda q, k, v, s: calls.append(q.shape) or
                        torch.nn.functional.scaled_dot_product_attention(
                            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=s))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 12, 8, generator=g) for h in (4, 2, 2))
    ref = torch.cat([va.varlen_attention_reference(*(t[b].transpose(0, 1) for t in (q, k, v)),
                                                   torch.tensor([0, 12]), 0.3) for b in range(2)])
    plain, _ = va.attention_forward(None, q, k, v, None, scaling=0.3)
    positions, _ = va.attention_forward(None, q, k, v, None, scaling=0.3, position_ids=torch.arange(12)[None])
    assert len(calls) == 2
    for out in (plain, positions):
        assert torch.allclose(out.reshape(24, 4, 8), ref, atol=1e-5)
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]] * 2)  # two samples in each row
    va.attention_forward(None, q, k, v, None, scaling=0.3, position_ids=packed)
    assert len(calls) == 2  # the packed rows went to the varlen kernel
    # one flattened row of samples that all have the same length: dense rows again, same result as varlen
    flat = [t.transpose(1, 2).reshape(1, 24, t.shape[1], 8).transpose(1, 2) for t in (q, k, v)]
    for lengths in ([12, 12], [5, 19]):
        cu = torch.tensor([0, lengths[0], 24], dtype=torch.int32)
        out, _ = va.attention_forward(None, *flat, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=max(lengths))
        want = va.varlen_attention_reference(*(t[0].transpose(0, 1) for t in flat), cu, 0.3)
        assert torch.allclose(out.reshape(24, 4, 8), want, atol=1e-5)
    assert len(calls) == 3  # only the equal lengths went dense


@pytest.mark.parametrize("grouped", [False, True])
def test_dense_causal_attention_repeats_kv_heads_and_is_causal(monkeypatch, grouped):
    """The dense path itself (on a CPU, SDPA's flash backend, allowed second): grouped K/V heads, repeated or
    passed with ``enable_gqa``, causal rows."""
    from loraforge.kernels import varlen_attention as va

    monkeypatch.setitem(va.DENSE_GQA, "grouped", grouped)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 10, 8, generator=g) for h in (4, 2, 2))
    out = va.dense_causal_attention(q, k, v, 0.3)
    for b in range(2):
        want = va.varlen_attention_reference(*(t[b].transpose(0, 1) for t in (q, k, v)), torch.tensor([0, 10]), 0.3)
        assert torch.allclose(out[b].transpose(0, 1), want, atol=1e-5)


def test_dense_attention_repeats_kv_heads_after_sdpa_refuses_grouped_ones(monkeypatch):
    """A PyTorch whose SDPA backends take no grouped K/V heads: the first refusal switches to repeating them, with
    the same result; an out-of-memory error is not taken for a refusal."""
    from loraforge.kernels import varlen_attention as va

    real = va.F.scaled_dot_product_attention
    seen = []

    def refusing(q, k, v, **kw):
        seen.append(kw.get("enable_gqa", False))
        if kw.get("enable_gqa"):
            raise RuntimeError("No available kernel. Aborting execution.")
        return real(q, k, v, **kw)

    monkeypatch.setitem(va.DENSE_GQA, "grouped", True)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 10, 8, generator=g) for h in (4, 2, 2))
    want = va.dense_causal_attention(q, k, v, 0.3)
    monkeypatch.setattr(va.F, "scaled_dot_product_attention", refusing)
    torch.testing.assert_close(va.dense_causal_attention(q, k, v, 0.3), want)
    assert seen == [True, False] and va.DENSE_GQA["grouped"] is False

    def out_of_memory(q, k, v, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setitem(va.DENSE_GQA, "grouped", True)
    monkeypatch.setattr(va.F, "scaled_dot_product_attention", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        va.dense_causal_attention(q, k, v, 0.3)
    assert va.DENSE_GQA["grouped"] is True


@pytest.mark.gpu
def test_dense_cudnn_attention_matches_varlen_on_gpu(monkeypatch):
    """On a Hopper GPU one-sequence rows run through SDPA's cuDNN backend: same output and gradients as the flash
    varlen kernel, to bf16 rounding."""
    from loraforge.kernels import varlen_attention as va

    results = []
    for mode, grouped in (("cudnn", True), ("cudnn", False), ("varlen", False)):
        monkeypatch.setitem(va.DENSE_MODE, "mode", mode)
        monkeypatch.setitem(va.DENSE_GQA, "grouped", grouped)
        g = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(3, h, 333, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for h in (8, 2, 2))
        out, _ = va.attention_forward(None, q, k, v, None, scaling=128 ** -0.5)
        out.float().pow(2).sum().backward()
        results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    for got_all in results[:2]:  # grouped and repeated heads, each against the varlen kernel
        for ref, got in zip(results[2], got_all):
            assert (got - ref).abs().max() <= 3e-2 * ref.abs().max()
            assert (got - ref).abs().mean() <= 1e-2 * ref.abs().mean()


@pytest.mark.gpu
def test_offloaded_checkpointing_on_gpu_equals_standard():
    """On a GPU the checkpointed layer inputs go through pinned host memory and come back: same gradients."""
    std = tiny_model("qwen3").cuda()
    fast_model = copy.deepcopy(std)
    for m in (std, fast_model):
        m.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.get_base_model().enable_input_require_grads()
        m.train()
    apply_fast_path(fast_model, FastPathPlan(True, "test"))
    for _ in range(2):  # the second step reuses the pinned buffers
        ids = torch.randint(0, 256, (2, 64), device="cuda")
        std.zero_grad(), fast_model.zero_grad()
        ref = standard_loss(std, ids, ids)
        ref.backward()
        got = fast_loss(fast_model, ids, ids)
        got.backward()
        assert abs(got.item() - ref.item()) <= 1e-3 * abs(ref.item())
        for name, grad in lora_grads(std).items():
            assert _close(lora_grads(fast_model)[name], grad, rel=1e-3), name


def test_yaml_off_is_the_setting_off(tmp_path):
    """YAML 1.1 reads a bare `fast_path: off` as false; it means the setting `off`."""
    from loraforge.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: tiny-random-qwen3\nfast_path: off\n", encoding="utf-8")
    cfg = load_config(str(path), [], purpose="estimate", build_training_args=False)
    assert cfg.finetuning.fast_path == "off"
    assert load_config(str(path), ["fast_path=on"], purpose="estimate",
                       build_training_args=False).finetuning.fast_path == "on"


def test_turing_gpus_take_the_sdpa_path(monkeypatch):
    """flash-attention 2 (PyTorch's varlen kernel) needs compute capability 8.0: a T4/T10 uses per-sample SDPA."""
    from loraforge.kernels import varlen_attention as va

    monkeypatch.setattr("loraforge.kernels.CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    assert va.flash_varlen_supported(torch.device("cuda", 0)) is False
    monkeypatch.setattr("loraforge.kernels.CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    assert va.flash_varlen_supported(torch.device("cuda", 0)) is True


def test_deepspeed_keeps_the_fused_loss_and_says_so():
    from loraforge.models.fast import FastPath, plan_fast_path

    qwen3 = SimpleNamespace(model_type="qwen3", hidden_act="silu", attention_dropout=0.0, sliding_window=None)
    cfg = _cfg()
    cfg.training = SimpleNamespace(deepspeed="examples/deepspeed/ds_config_zero3.json", fsdp=None)
    plan = plan_fast_path(cfg, qwen3)
    assert not plan.enabled and plan.fused_loss and "DeepSpeed" in plan.reason
    assert "fused linear cross-entropy" in FastPath(plan).summary()
    cfg.training = SimpleNamespace(deepspeed=None, fsdp="full_shard auto_wrap")
    plan = plan_fast_path(cfg, qwen3)
    assert not plan.enabled and not plan.fused_loss and "FSDP" in plan.reason
    assert not plan_fast_path(_cfg(use_dora=True), qwen3).fused_loss
    # DDP's unused-parameter search breaks on the fast path's checkpoint ("marked ready twice"): standard path
    cfg.training = SimpleNamespace(deepspeed=None, fsdp=None, ddp_find_unused_parameters=True, world_size=2)
    plan = plan_fast_path(cfg, qwen3)
    assert not plan.enabled and "ddp_find_unused_parameters" in plan.reason
    cfg.training.world_size = 1  # one process: no DDP, the key does nothing
    assert plan_fast_path(cfg, qwen3).enabled
    assert plan_fast_path(_cfg(), qwen3).fused_loss


def test_fused_loss_gathers_a_zero3_partitioned_output_weight(monkeypatch):
    """Under ZeRO-3 the output weight outside its module's forward is an empty shard; the loss gathers it
    through deepspeed.zero.GatheredParameters (read-only) and equals the standard loss."""
    import sys
    import types

    model = tiny_model("qwen3")
    ids = torch.randint(0, 256, (2, 24))
    expected = standard_loss(model, ids, ids).detach()
    head = model.get_base_model().get_output_embeddings()
    full = head.weight.data
    gathered = []

    class GatheredParameters:  # what deepspeed.zero.GatheredParameters does to a partitioned parameter
        def __init__(self, params, modifier_rank=None):
            self.params, self.modifier_rank = params, modifier_rank

        def __enter__(self):
            gathered.append(self.modifier_rank)
            for p in self.params:
                p.data = full

        def __exit__(self, *exc):
            for p in self.params:
                p.data = torch.empty(0)

    fake = types.ModuleType("deepspeed")
    fake.zero = SimpleNamespace(GatheredParameters=GatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    loss_fn = FusedCausalLMLoss(model)
    try:
        out = model(input_ids=ids, logits_to_keep=no_logits(ids))
        head.weight.ds_id = 7
        head.weight.data = torch.empty(0)  # partitioned: this rank holds no element outside the forward
        loss = loss_fn(out, ids)
    finally:
        loss_fn.close()
        head.weight.data = full
        del head.weight.ds_id
    assert gathered == [None] and head.weight.shape == full.shape
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_fused_loss_takes_fp32_final_states_with_a_16bit_head():
    """The standard path's QLoRA preparation keeps fp32 norms; the loss casts their output to the head's dtype,
    as autocast does for the output layer."""
    model = tiny_model("qwen3")
    ids = torch.randint(0, 256, (2, 24))
    head = model.get_base_model().get_output_embeddings()
    reference = torch.nn.functional.cross_entropy(
        (model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, :-1].bfloat16()
         @ head.weight.bfloat16().T).float().reshape(-1, head.weight.shape[0]), ids[:, 1:].reshape(-1))
    loss_fn = FusedCausalLMLoss(model)
    try:
        out = model(input_ids=ids, logits_to_keep=no_logits(ids))  # fp32 final states
        head.weight.data = head.weight.data.bfloat16()
        loss = loss_fn(out, ids)
    finally:
        loss_fn.close()
    assert torch.allclose(loss, reference, rtol=1e-3)


def test_fused_loss_builds_on_the_output_of_later_hooks():
    """DeepSpeed ZeRO-3 wraps each module's output (a forward hook added when the engine starts) so that backward
    gathers the module's weights first. After `rehook` (at train begin) the loss builds on that wrapped output."""
    model = tiny_model("qwen3")
    ids = torch.randint(0, 256, (2, 24))
    backward_through_wrapper = []

    class Wrapped(torch.autograd.Function):  # what ZeRO-3's pre-backward function does, minus the gathering
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            backward_through_wrapper.append(True)
            return grad

    loss_fn = FusedCausalLMLoss(model)
    norm = model.get_base_model().model.norm
    handle = norm.register_forward_hook(lambda _m, _i, out: Wrapped.apply(out))  # added later, as DeepSpeed's
    try:
        loss_fn(model(input_ids=ids, logits_to_keep=no_logits(ids)), ids).backward()
        assert not backward_through_wrapper  # the problem: the loss skipped the wrapper
        loss_fn.rehook()
        loss_fn(model(input_ids=ids, logits_to_keep=no_logits(ids)), ids).backward()
        assert backward_through_wrapper
    finally:
        handle.remove()
        loss_fn.close()


def test_fsdp_qlora_casts_every_floating_weight_to_one_dtype():
    """FSDP flattens a wrapped block into one tensor: fp32 LoRA weights next to 16-bit ones fail to wrap."""
    from loraforge.models.adapters import cast_trainable_to_fp32
    from loraforge.models.loader import cast_floating

    model = tiny_model("qwen3")
    model.get_base_model().model.norm.weight.data = model.get_base_model().model.norm.weight.data.bfloat16()
    cast_trainable_to_fp32(model)
    assert len({p.dtype for p in model.parameters()}) == 2
    assert cast_floating(model, torch.bfloat16) > 0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert any(p.requires_grad for p in model.parameters())
