"""Grouped projections (q/k/v, gate/up): one autograd node over the group equals each projection on its own
(output and every gradient), for plain, biased, laid-out 16-bit, 4-bit and 8-bit bases, ranks and scalings that
differ, FP8, and a replayed layer's kept weight; the model takes the group only where it may."""

from __future__ import annotations

import copy

import pytest
import torch

from loraforge.kernels import lora
from loraforge.kernels.lora import LoraGroup, joined_weight, lora_group, lora_linear, stacked_view
from loraforge.models.fast import FastPathPlan, apply_fast_path
from loraforge.models.fast import modules

from fast_models import tiny_model

OUTS, RANKS, SCALES, IN = (40, 16, 24), (4, 4, 8), (0.5, 0.5, 2.0), 48


def _bases(kind: str, outs: tuple[int, ...] = OUTS) -> tuple[torch.nn.Module, ...]:
    torch.manual_seed(0)
    bases = []
    for out in outs:
        linear = torch.nn.Linear(IN, out, bias=kind == "bias")
        if kind == "4bit":
            bnb = pytest.importorskip("bitsandbytes")
            base = bnb.nn.Linear4bit(IN, out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            base.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
            base = base.to("cpu")  # quantizes
        elif kind == "8bit":
            bnb = pytest.importorskip("bitsandbytes")
            base = bnb.nn.Linear8bitLt(IN, out, bias=False, has_fp16_weights=False)
            base.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            base = base.to("cpu")
        else:
            base = linear.requires_grad_(False)
        bases.append(base)
    if kind == "stacked":  # laid out as apply_fast_path lays out a 16-bit group
        joined = torch.cat([b.weight.detach() for b in bases])
        row = 0
        for b in bases:
            b.weight.data = joined[row:row + b.out_features]
            row += b.out_features
    return tuple(bases)


def _adapters(outs: tuple[int, ...] = OUTS):
    g = torch.Generator().manual_seed(5)
    a = [torch.randn(r, IN, generator=g).requires_grad_(True) for r in RANKS]
    b = [torch.randn(o, r, generator=g).requires_grad_(True) for o, r in zip(outs, RANKS)]
    return a, b


def _run(fn, bases, a, b, **kw):
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = fn(x, bases, a, b, **kw)
    out.pow(2).sum().backward()
    grads = (out.detach(), x.grad, *(t.grad.clone() for t in (*a, *b)))
    for t in (*a, *b):
        t.grad = None
    return grads


def _separate(x, bases, a, b, fp8=False):
    return torch.cat([lora_linear(x, base, ai, bi, s, fp8=fp8) for base, ai, bi, s in zip(bases, a, b, SCALES)], -1)


def _grouped(x, bases, a, b, fp8=False, keep_weight=False):
    return lora_group(x, LoraGroup(bases, tuple(a), tuple(b), SCALES), fp8=fp8, keep_weight=keep_weight)


@pytest.mark.parametrize("kind", ["plain", "bias", "stacked", "4bit", "8bit"])
def test_group_equals_each_projection_on_its_own(kind):
    bases = _bases(kind)
    a, b = _adapters()
    for ref, got in zip(_run(_separate, bases, a, b), _run(_grouped, bases, a, b)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)  # fp32, summed in another order


@pytest.mark.parametrize("fp8", ["backward", True])
def test_group_in_fp8_stays_close_to_each_projection_in_fp8(fp8):
    """The group shares one FP8 scale (the largest of its weights'), so it is not bit-equal to the projections
    quantized one by one, but as close as FP8 allows (tests/test_fp8.py: ~4% on a GEMM output)."""
    outs = (48, 16, 32)  # FP8 GEMMs take multiples of 16 only
    bases = _bases("plain", outs)
    a, b = _adapters(outs)
    ref, got = _run(_separate, bases, a, b, fp8=fp8), _run(_grouped, bases, a, b, fp8=fp8)
    exact = _run(_separate, bases, a, b)
    for r, g, e in zip(ref, got, exact):
        scale = e.abs().max()
        assert (g - e).abs().max() <= 0.08 * scale and (r - e).abs().max() <= 0.08 * scale
    assert not torch.equal(got[1 if fp8 == "backward" else 0], exact[1 if fp8 == "backward" else 0])  # FP8 ran


@pytest.mark.parametrize("fp8, replay", [(False, True), ("backward", False), ("backward", True), (True, True)])
def test_group_keeps_its_weight_for_the_backward_of_a_replay(fp8, replay, monkeypatch):
    """A replay (``keep_weight``) hands its weight to the backward, which dequantizes nothing. Its output and every
    gradient equal an ordinary call's with the same forward precision: under ``fp8: backward`` a replay's forward
    GEMM is FP8 (as ``fp8: true``'s), or 16-bit with the benchmarks' switch ``fp8.REPLAY`` off."""
    from loraforge.kernels import fp8 as fp8_module

    monkeypatch.setitem(fp8_module.REPLAY, "on", replay)
    outs = (48, 16, 32)  # FP8 GEMMs take multiples of 16 only
    bases = _bases("4bit", outs)
    a, b = _adapters(outs)
    if fp8:
        lora.group_fp8_scale(bases, torch.float32)  # measured once, at the first use
    calls = []
    real = lora.joined_weight
    monkeypatch.setattr(lora, "joined_weight", lambda *args: calls.append(1) or real(*args))
    plain = True if fp8 == "backward" and replay else fp8  # the ordinary call with the replay's forward precision
    results = []
    for keep, setting in ((False, plain), (True, fp8)):
        x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        out = _grouped(x, bases, a, b, fp8=setting, keep_weight=keep)
        calls.clear()
        out.pow(2).sum().backward()
        assert len(calls) == (0 if keep else 1)
        results.append((out.detach(), x.grad, *(t.grad.clone() for t in (*a, *b))))
        for t in (*a, *b):
            t.grad = None
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    if fp8 == "backward":  # and the replay's forward differs from the 16-bit one exactly when it runs in FP8
        x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(1))
        sixteen = _grouped(x, bases, a, b, fp8=False)
        assert torch.equal(results[1][0], sixteen) is not replay


def test_stacked_16bit_weights_are_read_as_one_view():
    bases = _bases("stacked")
    weight = joined_weight(bases, torch.float32)
    assert weight.data_ptr() == bases[0].weight.data_ptr() and weight.shape == (sum(OUTS), IN)
    assert torch.equal(weight, torch.cat([b.weight for b in bases]))
    assert stacked_view([b.weight for b in _bases("plain")]) is None  # separate tensors: concatenated instead


def test_apply_lays_out_16bit_groups_and_restore_gives_each_weight_its_storage_back():
    model = tiny_model("qwen3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = apply_fast_path(model, FastPathPlan(True, "test"))
    attn = model.get_base_model().model.layers[0].self_attn
    qkv = [getattr(attn, n).get_base_layer().weight for n in ("q_proj", "k_proj", "v_proj")]
    assert stacked_view(qkv) is not None and len(fast._stacked) == 2 * 5  # 2 layers x (q, k, v, gate, up)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    fast.restore()
    assert len({w.untyped_storage().data_ptr() for w in qkv}) == 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_model_runs_each_group_as_one_node_unless_dropout_or_the_switch_says_no(monkeypatch):
    calls = []
    real = modules.lora_group
    monkeypatch.setattr(modules, "lora_group", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    for dropout, switch, expected in ((0.0, True, 4), (0.1, True, 0), (0.0, False, 0)):
        model = tiny_model("qwen3", dropout=dropout)
        model.train()
        apply_fast_path(model, FastPathPlan(True, "test"))
        monkeypatch.setitem(modules.GROUPED, "on", switch)
        calls.clear()
        model(input_ids=ids)
        assert len(calls) == expected  # 2 layers x (q/k/v, gate/up)


def test_grouped_and_separate_models_train_alike():
    """The whole model, grouped (the default) against every projection on its own: loss and every LoRA gradient."""
    model = tiny_model("llama")
    apply_fast_path(model, FastPathPlan(True, "test"))
    other = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for m, switch in ((model, True), (other, False)):
        modules.GROUPED["on"] = switch
        try:
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
        finally:
            modules.GROUPED["on"] = True
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in other.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)
