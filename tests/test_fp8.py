"""FP8 base-weight matmuls (`fp8: true`): quantizers against their references, the LoRA function against 16-bit,
the shared quantization of q/k/v's input, the fast path end to end, and the config's refusals."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from loraforge.errors import ConfigError
from loraforge.kernels import fp8 as F8
from loraforge.kernels.lora import lora_linear
from loraforge.models.fast import FastPathPlan, apply_fast_path, plan_fast_path

from fast_models import lora_grads, tiny_model

BF16 = torch.bfloat16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_row_quantization_round_trips_within_e4m3_precision():
    x = torch.randn(37, 64) * torch.logspace(-3, 3, 37)[:, None]  # rows of very different magnitudes
    q, s = F8.quantize_rows_reference(x)
    assert q.dtype == F8.E4M3 and s.shape == (37, 1)
    back = q.float() * s
    assert (back - x).abs().le(x.abs().amax(1, keepdim=True) / 8).all()  # e4m3: 3 mantissa bits
    assert _rel(back, x) < 0.04
    assert q.float().abs().amax() <= F8.E4M3_MAX
    zero_q, _ = F8.quantize_rows_reference(torch.zeros(2, 16))  # an all-zero row stays zero, no NaN
    assert zero_q.float().eq(0).all()


def test_weight_cast_and_its_transpose():
    w = torch.randn(48, 32)
    scale = (w.abs().amax() / F8.E4M3_MAX).reshape(1)
    q = F8.cast_weight_reference(w, scale)
    qt = F8.cast_weight_reference(w, scale, transpose=True)
    assert qt.shape == (32, 48) and qt.is_contiguous() and torch.equal(qt.float(), q.float().t())
    assert _rel(q.float() * scale, w) < 0.04


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_lora_function_against_16_bit(bias):
    """Only the frozen-weight GEMMs change: the output and the input gradient within FP8 precision; the adapter
    gradients (16-bit GEMMs on the same inputs) exactly equal."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=bias).to(BF16).requires_grad_(False)
    a = torch.nn.Parameter(torch.randn(4, 64) * 0.1)
    b = torch.nn.Parameter(torch.randn(48, 4) * 0.1)
    results = []
    for fp8 in (False, True):
        x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(1)).to(BF16).requires_grad_(True)
        out = lora_linear(x, base, a, b, 2.0, fp8=fp8)
        out.float().pow(2).sum().backward()
        results.append((out.detach(), x.grad, a.grad.clone(), b.grad.clone()))
        a.grad = b.grad = None
    (out16, gx16, ga16, gb16), (out8, gx8, ga8, gb8) = results
    assert 0 < _rel(out8, out16) < 0.06
    assert 0 < _rel(gx8, gx16) < 0.08
    # dB = dY^T (x A^T) and dA = (dY B)^T x run in 16 bits; dY itself depends on the FP8 output
    assert _rel(ga8, ga16) < 0.08 and _rel(gb8, gb16) < 0.08


def test_fp8_runs_in_fp32_on_the_cpu():
    """On a CPU the compute dtype is fp32: `fp8: true` still runs the FP8 GEMMs (it does what it says)."""
    base = torch.nn.Linear(32, 16, bias=False).requires_grad_(False)
    a, b = torch.zeros(2, 32, requires_grad=True), torch.zeros(16, 2, requires_grad=True)
    x = torch.randn(4, 32)
    got, want = lora_linear(x, base, a, b, 1.0, fp8=True), lora_linear(x, base, a, b, 1.0)
    assert got.dtype == torch.float32 and not torch.equal(got, want) and _rel(got, want) < 0.06


def test_fp8_skips_shapes_scaled_mm_cannot_take():
    base = torch.nn.Linear(20, 24, bias=False).to(BF16).requires_grad_(False)  # 20: not a multiple of 16
    a, b = torch.zeros(2, 20, requires_grad=True), torch.zeros(24, 2, requires_grad=True)
    x = torch.randn(5, 20).to(BF16)
    assert torch.equal(lora_linear(x, base, a, b, 1.0, fp8=True), lora_linear(x, base, a, b, 1.0))


def test_q_k_v_share_one_quantization_of_their_input(monkeypatch):
    calls = []
    real = F8.quantize_rows
    monkeypatch.setattr(F8, "quantize_rows", lambda t: calls.append(t.shape) or real(t))
    F8.LAST_ROWS.clear()
    bases = [torch.nn.Linear(32, n, bias=False).to(BF16).requires_grad_(False) for n in (32, 16, 16)]
    a, b = torch.zeros(2, 32, requires_grad=True), torch.zeros(32, 2, requires_grad=True)
    x = torch.randn(2, 8, 32).to(BF16)
    first = [lora_linear(x, base, a, b[: base.out_features], 1.0, fp8=True) for base in bases]
    assert len(calls) == 1
    with torch.no_grad():
        x.mul_(2)  # an in-place change: quantized again
    again = lora_linear(x, bases[0], a, b, 1.0, fp8=True)
    assert len(calls) == 2
    assert _rel(again, first[0] * 2) < 1e-2


def test_fast_path_in_fp8_trains_close_to_16_bit():
    std = tiny_model("qwen3").to(BF16)
    runs = []
    for fp8 in (False, True):
        model = copy.deepcopy(std)
        fast = apply_fast_path(model, FastPathPlan(True, "test", fp8=fp8))
        assert ("FP8" in fast.summary()) == fp8
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        from test_fast_path import fast_loss

        loss = fast_loss(model, ids, ids)
        loss.backward()
        runs.append((loss.item(), lora_grads(model)))
    (loss16, g16), (loss8, g8) = runs
    assert F8.LAST_ROWS.entry is not None
    fast.restore()  # frees the last quantized input (and the adapter copies)
    assert F8.LAST_ROWS.entry is None
    assert loss8 != loss16 and abs(loss8 - loss16) <= 0.01 * abs(loss16)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten().float() for g in g8.values()]),
                                                torch.cat([g.flatten().float() for g in g16.values()]), dim=0)
    # FP8 adds gradient noise: on this 64-wide model bf16 vs fp32 gives a cosine of 0.97, FP8 vs fp32 0.88 (the
    # loss agrees to 3e-5). Whether that noise matters is measured where it counts: 30 steps on real text on a GPU
    # (benchmarks/bench_numerics.py).
    assert cos > 0.8


def _cfg(**over):
    finetuning = dict(finetuning_type="lora", use_dora=False, pissa_init=False, fast_path="auto", fp8=True)
    finetuning.update({k: v for k, v in over.items() if k in finetuning})
    model = dict(upcast_layernorm=False, flash_attn="auto", disable_gradient_checkpointing=False)
    return SimpleNamespace(finetuning=SimpleNamespace(**finetuning), model=SimpleNamespace(**model),
                           data=SimpleNamespace(cutoff_len=1024), training=None)


QWEN3 = SimpleNamespace(model_type="qwen3", hidden_act="silu", attention_dropout=0.0, sliding_window=None)


def test_fp8_key_runs_on_the_fast_path_or_is_refused(monkeypatch):
    assert plan_fast_path(_cfg(), QWEN3).fp8
    assert not plan_fast_path(_cfg(fp8=False), QWEN3).fp8
    with pytest.raises(ConfigError, match="fast_path: off"):
        plan_fast_path(_cfg(fast_path="off"), QWEN3)
    with pytest.raises(ConfigError, match="DoRA"):
        plan_fast_path(_cfg(use_dora=True), QWEN3)
    fp16 = _cfg()
    fp16.training = SimpleNamespace(fp16=True, deepspeed=None, fsdp=None)
    with pytest.raises(ConfigError, match="bf16: true"):
        plan_fast_path(fp16, QWEN3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr("loraforge.kernels.CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    with pytest.raises(ConfigError, match="RTX 4090 has 8.9"):
        plan_fast_path(_cfg(), QWEN3)
    monkeypatch.setattr("loraforge.kernels.CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert plan_fast_path(_cfg(), QWEN3).fp8


def test_fp8_auto_is_backward_on_hopper_in_bf16_and_off_elsewhere(monkeypatch, tmp_path):
    """The default `fp8: auto`: `backward` where it runs (fast path, bf16, compute capability 9.0+, named in the
    summary), otherwise off without an error (CPU, Ada, fp16, fp32, the standard path); explicit `false` stays off."""
    from loraforge.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: tiny-random-qwen3\n", encoding="utf-8")
    assert load_config(str(path), [], purpose="estimate", build_training_args=False).finetuning.fp8 == "auto"

    def plan(capability=None, **over):
        cfg = _cfg(fp8="auto", **over)
        cfg.training = SimpleNamespace(bf16=over.get("bf16", True), fp16=over.get("fp16", False), deepspeed=None,
                                       fsdp=None)
        if capability is None:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        else:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
            monkeypatch.setattr("loraforge.kernels.CAPABILITY", {})
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
        return plan_fast_path(cfg, QWEN3)

    hopper = plan((9, 0))
    assert hopper.fp8 == "backward" and hopper.fp8_auto
    from loraforge.models.fast import FastPath

    summary = FastPath(hopper, swapped={"MLP": 1}).summary()
    assert "FP8 base-weight matmuls in backward (input gradients, replayed layers) (fp8: auto" in summary
    assert plan().fp8 is False  # CPU
    assert plan((8, 9)).fp8 is False  # Ada: no error, unlike an explicit `fp8: backward`
    assert plan((9, 0), bf16=False, fp16=True).fp8 is False
    assert plan((9, 0), bf16=False).fp8 is False  # fp32
    assert not plan((9, 0), use_dora=True).enabled and plan((9, 0), use_dora=True).fp8 is False
    assert plan((9, 0), fast_path="off").fp8 is False
    explicit = _cfg(fp8=False)
    explicit.training = SimpleNamespace(bf16=True, fp16=False, deepspeed=None, fsdp=None)
    assert plan_fast_path(explicit, QWEN3).fp8 is False


def test_fp8_is_a_config_key(tmp_path):
    from loraforge.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: tiny-random-qwen3\nfp8: true\n", encoding="utf-8")
    cfg = load_config(str(path), [], purpose="estimate", build_training_args=False)
    assert cfg.finetuning.fp8 is True


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@needs_cuda
@pytest.mark.parametrize("rows,cols", [(8192, 4096), (1000, 12288), (3, 48)])
def test_triton_quantizers_match_references_on_gpu(rows, cols):
    x = (torch.randn(rows, cols, device="cuda") * torch.rand(rows, 1, device="cuda") * 10).to(BF16)
    q, s = F8.quantize_rows(x)
    rq, rs = F8.quantize_rows_reference(x)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    differ = (q.float() != rq.float())
    assert differ.float().mean() < 1e-3  # division rounding may move a rare element by one e4m3 step
    w = torch.randn(cols, 256, device="cuda").to(BF16)
    scale = (w.float().abs().amax() / F8.E4M3_MAX).reshape(1)
    for transpose in (False, True):
        got, want = F8.cast_weight(w, scale, transpose), F8.cast_weight_reference(w, scale, transpose)
        assert got.shape == want.shape and (got.float() != want.float()).float().mean() < 1e-3


@gpu
@needs_cuda
def test_fp8_lora_function_on_gpu():
    torch.manual_seed(0)
    base = torch.nn.Linear(4096, 1024, bias=False, device="cuda").to(BF16).requires_grad_(False)
    a = torch.nn.Parameter(torch.randn(16, 4096, device="cuda") * 0.01)
    b = torch.nn.Parameter(torch.randn(1024, 16, device="cuda") * 0.01)
    outs = []
    for fp8 in (False, True):
        x = torch.randn(2048, 4096, device="cuda").to(BF16).requires_grad_(True)
        torch.manual_seed(1)
        x.data.normal_()
        out = lora_linear(x, base, a, b, 1.0, fp8=fp8)
        out.float().pow(2).sum().backward()
        outs.append((out.detach(), x.grad))
    assert _rel(outs[1][0], outs[0][0]) < 0.06 and _rel(outs[1][1], outs[0][1]) < 0.08


@gpu
@needs_cuda
@pytest.mark.parametrize("grouped", [False, True])
def test_fp8_backward_replays_in_fp8_on_gpu(grouped):
    """`fp8: backward` on a replay (``keep_weight``): the forward GEMM runs in FP8 with exact accumulation, the
    backward from the kept e4m3 transpose; output and gradients stay within FP8's error of the 16-bit call."""
    from loraforge.kernels.lora import LoraGroup, lora_group

    torch.manual_seed(0)
    bases = tuple(torch.nn.Linear(4096, n, bias=False, device="cuda").to(BF16).requires_grad_(False)
                  for n in ((4096, 1024, 1024) if grouped else (1024,)))
    a = [torch.nn.Parameter(torch.randn(16, 4096, device="cuda") * 0.01) for _ in bases]
    b = [torch.nn.Parameter(torch.randn(base.out_features, 16, device="cuda") * 0.01) for base in bases]
    runs = []
    for fp8, keep in ((False, False), ("backward", True)):
        torch.manual_seed(1)
        x = torch.randn(2048, 4096, device="cuda").to(BF16).requires_grad_(True)
        if grouped:
            out = lora_group(x, LoraGroup(bases, tuple(a), tuple(b), (1.0,) * 3), fp8=fp8, keep_weight=keep)
        else:
            out = lora_linear(x, bases[0], a[0], b[0], 1.0, fp8=fp8, keep_weight=keep)
        out.float().pow(2).sum().backward()
        runs.append((out.detach(), x.grad, *(t.grad.clone() for t in (*a, *b))))
        for t in (*a, *b):
            t.grad = None
    assert not torch.equal(runs[1][0], runs[0][0])  # the replay's GEMM ran in FP8
    for got, ref in zip(runs[1], runs[0]):
        assert _rel(got, ref) < 0.08


def test_fp8_backward_keeps_the_forward_16_bit():
    """`fp8: backward`: the output is bit-equal to 16 bits, only the input gradient goes through FP8 (and the
    adapter gradients, which use the 16-bit output's gradient, stay exactly 16-bit here: the loss is linear in
    the output)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=True).to(BF16).requires_grad_(False)
    a = torch.nn.Parameter(torch.randn(4, 64) * 0.1)
    b = torch.nn.Parameter(torch.randn(48, 4) * 0.1)
    g = torch.randn(3, 10, 48, generator=torch.Generator().manual_seed(2)).to(BF16)
    runs = {}
    for fp8 in (False, "backward", True):
        x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(1)).to(BF16).requires_grad_(True)
        out = lora_linear(x, base, a, b, 2.0, fp8=fp8)
        out.backward(g)
        runs[fp8] = (out.detach(), x.grad, a.grad.clone(), b.grad.clone())
        a.grad = b.grad = None
    (o16, gx16, ga16, gb16), (ob, gxb, gab, gbb), (o8, gx8, _, _) = runs[False], runs["backward"], runs[True]
    assert torch.equal(ob, o16) and not torch.equal(o8, o16)
    assert torch.equal(gab, ga16) and torch.equal(gbb, gb16)
    assert 0 < _rel(gxb, gx16) < 0.08
    assert torch.equal(gxb, gx8)  # the same FP8 input gradient as `fp8: true` (same dY, same weight cast)


def test_fp8_backward_mode_through_the_fast_path_and_the_config(tmp_path):
    from loraforge.config import load_config
    from loraforge.config.finetuning import fp8_setting

    assert [fp8_setting(v) for v in (None, False, True, "backward", "Backward", "off", "true")] == \
        [False, False, True, "backward", "backward", False, True]
    with pytest.raises(ValueError, match="auto, true, false or backward"):
        fp8_setting("forward")
    assert plan_fast_path(_cfg(fp8="backward"), QWEN3).fp8 == "backward"
    with pytest.raises(ConfigError, match="`fp8: backward` runs on the fast path"):
        plan_fast_path(_cfg(fp8="backward", fast_path="off"), QWEN3)
    from test_fast_path import fast_loss

    std = tiny_model("qwen3").to(BF16)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for fp8 in (False, "backward", True):
        model = copy.deepcopy(std)
        fast = apply_fast_path(model, FastPathPlan(True, "test", fp8=fp8))
        loss = fast_loss(model, ids, ids)
        loss.backward()
        runs[fp8] = (loss.item(), lora_grads(model), fast.summary())
        fast.restore()
    assert "FP8 base-weight matmuls in backward" in runs["backward"][2]
    assert runs["backward"][0] == runs[False][0] != runs[True][0]  # the forward of `backward` is the 16-bit one
    assert any(not torch.equal(runs["backward"][1][k], runs[False][1][k]) for k in runs[False][1])
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: tiny-random-qwen3\nfp8: backward\n", encoding="utf-8")
    assert load_config(str(path), [], purpose="estimate", build_training_args=False).finetuning.fp8 == "backward"
    path.write_text("model_name_or_path: tiny-random-qwen3\nfp8: sideways\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="`fp8` must be auto, true, false or backward"):
        load_config(str(path), [], purpose="estimate", build_training_args=False)
