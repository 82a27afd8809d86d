"""GPU microbenchmarks that decide the fast path's next levers, at Qwen3-8B shapes (hidden 4096, intermediate
12288, 32 query / 8 key-value heads of 128), bf16.

- ``gemm``: for each projection shape at M tokens, the time of bitsandbytes' nf4 + double-quant dequantization,
  of the bf16 GEMMs of forward (``x W^T``) and backward (``dY W``), and of the same GEMMs in fp8 (e4m3,
  ``torch._scaled_mm``: per-token scales for the activations, one scale for the frozen weight), with the cost of
  quantizing in plain PyTorch ops and the relative error against bf16.
- ``attention``: causal attention over packed samples (4 x 2048 and 1 x 16384 tokens), forward + backward:
  flash varlen with K/V repeated to every query head, flash varlen sharing K/V heads natively
  (:class:`loraforge.kernels.varlen_attention.FlashVarlenGQA`), and SDPA's flash and cuDNN backends on a padded
  batch (cuDNN also with `enable_gqa=True`, K/V heads not repeated); with the largest difference from the repeat
  path.
- ``packed``: packed samples of mixed lengths: flash varlen against cuDNN's ragged attention.

Every time is the median of CUDA-event timings after warm-up. One JSON file with the GPU and versions.

    python benchmarks/bench_levers.py --ops gemm,attention --out $OUT/levers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

HIDDEN, INTER, QH, KVH, HD = 4096, 12288, 32, 8, 128
SHAPES = {"q_proj/o_proj": (HIDDEN, HIDDEN), "k_proj/v_proj": (KVH * HD, HIDDEN), "gate_proj/up_proj": (INTER, HIDDEN),
          "down_proj": (HIDDEN, INTER)}
E4M3 = getattr(torch, "float8_e4m3fn", None)


def timed(fn, iters: int = 20, warm: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` CUDA-event timings."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 4)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(float((got.float() - want.float()).norm() / want.float().norm()), 5)


def quant_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization in plain PyTorch ops (the upper bound of a fused kernel's cost)."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12) / 448.0
    return (t.float() / scale).to(E4M3), scale


def gemm_row(tokens: int, name: str, out_f: int, in_f: int, g: torch.Generator) -> dict:
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = torch.randn(out_f, in_f, device="cuda", generator=g).bfloat16() * 0.02
    qw, state = quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    wd = dequantize_4bit(qw, state)
    x = torch.randn(tokens, in_f, device="cuda", generator=g).bfloat16()
    dy = torch.randn(tokens, out_f, device="cuda", generator=g).bfloat16() * 0.01
    row = {"op": "gemm", "proj": name, "M": tokens, "N": out_f, "K": in_f,
           "dequant_ms": timed(lambda: dequantize_4bit(qw, state)),
           "bf16_fwd_ms": timed(lambda: x @ wd.t()), "bf16_bwd_ms": timed(lambda: dy @ wd)}
    flop = 2 * tokens * out_f * in_f
    row["bf16_fwd_tflops"] = round(flop / row["bf16_fwd_ms"] / 1e9, 1)
    if E4M3 is None or not hasattr(torch, "_scaled_mm"):
        return row
    w_scale = wd.abs().max().float() / 448.0
    w8 = (wd.float() / w_scale).to(E4M3)  # [out, in]
    w8t = w8.t().contiguous()  # [in, out], for dY W
    xq, xs = quant_rows(x)
    dq, ds = quant_rows(dy)
    ws_out = w_scale.reshape(1, 1).expand(1, out_f).contiguous()
    ws_in = w_scale.reshape(1, 1).expand(1, in_f).contiguous()

    def fwd8(fast: bool = False):
        return torch._scaled_mm(xq, w8.t(), scale_a=xs, scale_b=ws_out, out_dtype=torch.bfloat16,
                                use_fast_accum=fast)

    def bwd8():
        return torch._scaled_mm(dq, w8t.t(), scale_a=ds, scale_b=ws_in, out_dtype=torch.bfloat16)

    try:
        row.update(fp8_fwd_ms=timed(fwd8), fp8_fwd_fastacc_ms=timed(lambda: fwd8(True)), fp8_bwd_ms=timed(bwd8),
                   quant_x_ms=timed(lambda: quant_rows(x)), quant_dy_ms=timed(lambda: quant_rows(dy)),
                   quant_w_ms=timed(lambda: (wd.float() / w_scale).to(E4M3)),
                   transpose_w8_ms=timed(lambda: w8.t().contiguous()),
                   fp8_fwd_err=rel_err(fwd8(), x @ wd.t()), fp8_bwd_err=rel_err(bwd8(), dy @ wd))
        row["fp8_fwd_tflops"] = round(flop / row["fp8_fwd_ms"] / 1e9, 1)
    except RuntimeError as e:  # no fp8 tensor cores, or a layout this release refuses
        row["fp8_error"] = str(e)[:300]
    return row


def gemm_rows(tokens: int) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (out_f, in_f) in SHAPES.items():
        rows.append(gemm_row(tokens, name, out_f, in_f, g))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def attention_rows(batch: int, seq: int) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from loraforge.kernels import varlen_attention as va

    tokens = batch * seq
    g = torch.Generator(device="cuda").manual_seed(0)
    q0 = torch.randn(tokens, QH, HD, device="cuda", generator=g).bfloat16()
    k0 = torch.randn(tokens, KVH, HD, device="cuda", generator=g).bfloat16()
    v0 = torch.randn(tokens, KVH, HD, device="cuda", generator=g).bfloat16()
    go = torch.randn(tokens, QH, HD, device="cuda", generator=g).bfloat16()
    cu = torch.arange(0, tokens + 1, seq, device="cuda", dtype=torch.int32)
    scale = HD ** -0.5

    def varlen(mode):
        def run():
            va.GQA_MODE["mode"] = mode
            q, k, v = (t.detach().requires_grad_(True) for t in (q0, k0, v0))
            out = va.varlen_attention(q, k, v, cu, seq, scale)
            out.backward(go)
            return out, q.grad, k.grad, v.grad
        return run

    def sdpa(backend, gqa: bool = False):
        def run():
            q, k, v = (t.detach().reshape(batch, seq, -1, HD).transpose(1, 2).requires_grad_(True)
                       for t in (q0, k0, v0))
            with sdpa_kernel(backend):
                if gqa:  # K/V heads shared by the kernel itself (no repeated copies), where the backend takes it
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
                else:
                    kr, vr = k.repeat_interleave(QH // KVH, 1), v.repeat_interleave(QH // KVH, 1)
                    out = F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=scale)
            out.backward(go.reshape(batch, seq, QH, HD).transpose(1, 2))
            return (out.transpose(1, 2).reshape(tokens, QH, HD), q.grad.transpose(1, 2).reshape(tokens, QH, HD),
                    k.grad.transpose(1, 2).reshape(tokens, KVH, HD), v.grad.transpose(1, 2).reshape(tokens, KVH, HD))
        return run

    flop = 4 * batch * seq * seq * QH * HD / 2 * 3.5  # causal forward (x1) + backward (x2.5)
    ref = varlen("repeat")()
    rows = []
    for name, fn in (("varlen_repeat", varlen("repeat")), ("varlen_gqa_native", varlen("native")),
                     ("sdpa_flash", sdpa(SDPBackend.FLASH_ATTENTION)),
                     ("sdpa_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)),
                     ("sdpa_cudnn_enable_gqa", sdpa(SDPBackend.CUDNN_ATTENTION, gqa=True))):
        row = {"op": "attention", "impl": name, "batch": batch, "seq": seq}
        try:
            got = fn()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            row["fwd_bwd_ms"] = timed(fn, iters=10)
            row["tflops"] = round(flop / row["fwd_bwd_ms"] / 1e9, 1)
            row["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20)
            row["max_rel_diff_vs_repeat"] = [rel_err(a, b) for a, b in zip(got, ref)]
        except RuntimeError as e:
            row["error"] = str(e)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    va.GQA_MODE["mode"] = "native"
    return rows


def packed_rows(lengths: list[int]) -> list[dict]:
    """Packed samples of mixed lengths in one row: flash varlen (GQA native) against cuDNN's ragged attention
    (``aten._cudnn_attention_forward`` with cumulative lengths; K/V repeated), forward + backward."""
    from loraforge.kernels import varlen_attention as va

    tokens = sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(0)
    q0 = torch.randn(tokens, QH, HD, device="cuda", generator=g).bfloat16()
    k0 = torch.randn(tokens, KVH, HD, device="cuda", generator=g).bfloat16()
    v0 = torch.randn(tokens, KVH, HD, device="cuda", generator=g).bfloat16()
    go = torch.randn(tokens, QH, HD, device="cuda", generator=g).bfloat16()
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda", dtype=torch.int32)
    scale, top = HD ** -0.5, max(lengths)

    def flash():
        q, k, v = (t.detach().requires_grad_(True) for t in (q0, k0, v0))
        out = va.varlen_attention(q, k, v, cu, top, scale)
        out.backward(go)
        return out, q.grad, k.grad, v.grad

    def cudnn():
        kr, vr = (t.repeat_interleave(QH // KVH, 1) for t in (k0, v0))
        res = torch.ops.aten._cudnn_attention_forward(q0, kr, vr, None, cu, cu, top, top, True, 0.0, True, False,
                                                      scale=scale)
        out, lse, seed, offset = res[0], res[1], res[6], res[7]
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            go, q0, kr, vr, out, lse, seed, offset, torch.empty(0, device="cuda"), cu, cu, top, top, 0.0, True,
            scale=scale)
        groups = QH // KVH
        return (out, dq, dk.reshape(tokens, KVH, groups, HD).sum(2), dv.reshape(tokens, KVH, groups, HD).sum(2))

    ref = flash()
    rows = []
    for name, fn in (("packed_flash_varlen", flash), ("packed_cudnn_ragged", cudnn)):
        row = {"op": "attention", "impl": name, "lengths": lengths}
        try:
            got = fn()
            row["fwd_bwd_ms"] = timed(fn, iters=10)
            row["max_rel_diff_vs_flash"] = [rel_err(a.detach(), b.detach()) for a, b in zip(got, ref)]
        except Exception as e:  # noqa: BLE001 - an op this release lacks or refuses is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="gemm,attention,packed")
    ap.add_argument("--tokens", default="8192,16384", help="M of the GEMM rows (comma list)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import importlib.metadata as md

    rows: list[dict] = []
    ops = a.ops.split(",")
    if "gemm" in ops:
        for m in a.tokens.split(","):
            rows += gemm_rows(int(m))
    if "attention" in ops:
        rows += attention_rows(4, 2048) + attention_rows(1, 16384)
    if "packed" in ops:
        rows += packed_rows([1500, 2596, 1, 1024, 3071]) + packed_rows([200] * 40 + [77, 3000])
    versions = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name in ("bitsandbytes", "triton"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": "python benchmarks/bench_levers.py " + " ".join(sys.argv[1:]),
                                 "versions": versions, "rows": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
