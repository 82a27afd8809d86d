"""GPU benchmark of the fused ops against their eager references (and Liger-Kernel's, when importable).

Shapes are Qwen3-8B's at 8192 tokens per step (batch 4 x seq 2048): hidden 4096, intermediate 12288,
32 query / 8 key-value heads of 128, vocabulary 151,936, bf16. For every op and implementation it records
forward+backward time (median of CUDA-event timings) and the peak memory the call adds over its inputs,
plus the largest difference from the eager reference as a sanity check. Prints one JSON line per row and
writes all rows, with the GPU and package versions, to one JSON file.

    python benchmarks/bench_kernels.py                      # writes $OUT/bench_kernels.json or ./bench_kernels.json
    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h200.json --ops rms_norm,cross_entropy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loraforge import kernels as K  # noqa: E402  (the checkout, not an installed copy)

TOKENS, BATCH, HIDDEN, INTER, QH, KVH, HEAD_DIM, VOCAB = 8192, 4, 4096, 12288, 32, 8, 128, 151936
DT = torch.bfloat16


def _liger(name):
    """Liger-Kernel's op ``name`` wrapped to our signature, or None when it does not import."""
    try:
        if name == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            # offset 0, casting "llama" = HF's cast order
            return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama")
        if name == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply
        if name == "rope":
            from liger_kernel.transformers.rope import liger_rotary_pos_emb

            return liger_rotary_pos_emb
        if name == "cross_entropy":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
            return lambda h, w, labels: loss(w, h, labels)
    except Exception:  # noqa: BLE001 - any import problem just means "no Liger row"
        return None
    return None


def _inputs(op: str):
    """(args builder, grad-requiring arg indices, implementations) for one op."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device="cuda", generator=g)).to(DT)

    if op == "rms_norm":  # the decoder-layer norms (frozen weight under LoRA)
        x, w = rnd(TOKENS, HIDDEN), 1 + rnd(HIDDEN, scale=0.1)
        return (lambda: (x.detach().requires_grad_(), w, 1e-6)), \
            {"loraforge": K.rms_norm, "reference": K.rms_norm_reference}
    if op == "rms_norm_qk":  # Qwen3's per-head q_norm: [tokens * heads, head_dim]
        x, w = rnd(TOKENS * QH, HEAD_DIM), 1 + rnd(HEAD_DIM, scale=0.1)
        return (lambda: (x.detach().requires_grad_(), w, 1e-6)), \
            {"loraforge": K.rms_norm, "reference": K.rms_norm_reference}
    if op == "swiglu":
        gate, up = rnd(TOKENS, INTER), rnd(TOKENS, INTER)
        return (lambda: (gate.detach().requires_grad_(), up.detach().requires_grad_())), \
            {"loraforge": K.swiglu, "reference": K.swiglu_reference}
    if op == "rope":
        seq = TOKENS // BATCH
        q, k = rnd(BATCH, seq, QH, HEAD_DIM), rnd(BATCH, seq, KVH, HEAD_DIM)
        inv = 1.0 / (1_000_000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
        emb = torch.arange(seq, device="cuda").float()[:, None] * inv
        emb = torch.cat([emb, emb], -1).expand(BATCH, seq, HEAD_DIM)
        cos, sin = emb.cos().to(DT), emb.sin().to(DT)
        return (lambda: (q.detach().requires_grad_().transpose(1, 2), k.detach().requires_grad_().transpose(1, 2),
                         cos, sin)), {"loraforge": K.apply_rope, "reference": K.apply_rope_reference}
    if op == "cross_entropy":  # the frozen lm_head + loss over one step's tokens
        h, w = rnd(TOKENS, HIDDEN), rnd(VOCAB, HIDDEN, scale=0.02)
        labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=g)
        labels[::7] = -100
        return (lambda: (h.detach().requires_grad_(), w, labels)), \
            {"loraforge": K.linear_cross_entropy, "loraforge_pytorch_chunks": _pytorch_chunks,
             "reference": K.linear_cross_entropy_reference}
    raise ValueError(f"unknown op {op!r}")


def _pytorch_chunks(hidden, weight, labels):
    """The chunked loss without its Triton kernel (what ``LORAFORGE_KERNELS=reference`` runs): shows what
    the fused kernel adds over the chunking alone. The backward only scales stored gradients, so setting
    the switch around the forward is enough."""
    before = os.environ.get("LORAFORGE_KERNELS")
    os.environ["LORAFORGE_KERNELS"] = "reference"
    try:
        return K.linear_cross_entropy(hidden, weight, labels)
    finally:
        if before is None:
            del os.environ["LORAFORGE_KERNELS"]
        else:
            os.environ["LORAFORGE_KERNELS"] = before


def _fwd_bwd(fn, args):
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return outs, grads


def _measure(fn, make_args, iters: int) -> dict:
    for _ in range(2):  # compile / autotune / allocator warm-up
        _fwd_bwd(fn, make_args())
    torch.cuda.synchronize()
    args = make_args()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    outs, grads = _fwd_bwd(fn, args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(iters):
        args = make_args()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _fwd_bwd(fn, args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"ms_fwd_bwd": round(times[len(times) // 2], 4), "peak_mib": round(peak / 2**20, 1),
            "outputs": [o.detach() for o in outs] + [g.detach() for g in grads]}


def _max_rel_diff(got, want) -> float:
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()
               for a, b in zip(got, want))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (default: $OUT/bench_kernels.json)")
    parser.add_argument("--ops", default="rms_norm,rms_norm_qk,swiglu,rope,cross_entropy")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per row (median reported)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    out = args.out or Path(os.environ.get("OUT", ".")) / "bench_kernels.json"
    began = time.time()
    rows = []
    for op in args.ops.split(","):
        make_args, impls = _inputs(op)
        liger = _liger(op.replace("_qk", ""))
        if liger is not None:
            impls["liger"] = liger
        results = {}
        for name, fn in impls.items():
            try:
                results[name] = _measure(fn, make_args, args.iters)
            except Exception as exc:  # noqa: BLE001 - one failing implementation must not hide the others
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            torch.cuda.empty_cache()
        ref = results.get("reference", {})
        for name, res in results.items():
            row = {"op": op, "impl": name, **{k: v for k, v in res.items() if k != "outputs"}}
            if "outputs" in res and "outputs" in ref and name != "reference":
                row["max_rel_diff_vs_reference"] = _max_rel_diff(res["outputs"], ref["outputs"])
                row["speedup_vs_reference"] = round(ref["ms_fwd_bwd"] / res["ms_fwd_bwd"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del results, ref
        torch.cuda.empty_cache()
    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger_kernel"),
        "kernels_env": os.environ.get("LORAFORGE_KERNELS", ""),
        "shapes": dict(tokens=TOKENS, batch=BATCH, hidden=HIDDEN, intermediate=INTER, q_heads=QH, kv_heads=KVH,
                       head_dim=HEAD_DIM, vocab=VOCAB, dtype=str(DT)),
        "seconds": round(time.time() - began, 1),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} in {report['seconds']} s", file=sys.stderr)
    return 0


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
