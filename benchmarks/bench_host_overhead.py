"""Host (Python + dispatcher) time of the fast path's hot functions, measured on the CPU with tensors so small
that the arithmetic is negligible: what a GPU step waits for when it is launch-bound (small batches, or FP8 whose
GEMMs got cheap).

For each case it runs forward + backward many times and reports microseconds per call (median of 5 repeats) and
the number of ATen ops per call (torch.profiler), for a LoRA projection (bf16 base, fp32 adapters; 16-bit and FP8
GEMMs) and one fast-path decoder layer of a tiny bf16 Qwen3 with fp32 adapters. The op count is exact; the
microseconds on a shared 2-core machine vary by about 10% between runs.

    python benchmarks/bench_host_overhead.py --out benchmarks/results/host_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _time(fn, iters: int) -> float:
    for _ in range(10):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        runs.append((time.perf_counter() - start) / iters * 1e6)
    return round(statistics.median(runs), 1)


def _ops(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def projection_case(fp8: bool):
    from loraforge.kernels.lora import lora_linear

    base = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16).requires_grad_(False)
    a = torch.nn.Parameter(torch.randn(8, 64) * 0.1)  # fp32 adapters over a bf16 base, as on the GPU
    b = torch.nn.Parameter(torch.randn(64, 8) * 0.1)
    x = torch.randn(16, 64).to(torch.bfloat16).requires_grad_(True)

    def step():
        lora_linear(x, base, a, b, 2.0, fp8=fp8).sum().backward()
    return step


def layer_case():
    from fast_models import tiny_model
    from loraforge.models.fast import FastPathPlan, apply_fast_path, decoder_of

    model = tiny_model("qwen3")
    for name, param in model.named_parameters():  # a bf16 model with fp32 adapters, as on the GPU
        if "lora_" not in name:
            param.data = param.data.to(torch.bfloat16)
    apply_fast_path(model, FastPathPlan(True, "bench"))
    layer = decoder_of(model).layers[0]
    rotary = decoder_of(model).rotary_emb
    h = torch.randn(1, 16, 64).to(torch.bfloat16).requires_grad_(True)
    pos = torch.arange(16)[None]
    emb = rotary(h, pos)

    def step():
        out = layer(h, position_embeddings=emb, position_ids=pos)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, fn in (("lora_projection_16bit", projection_case(False)), ("lora_projection_fp8", projection_case(True)),
                     ("qwen3_decoder_layer", layer_case())):
        rows.append({"case": name, "us_per_fwd_bwd": _time(fn, a.iters), "aten_ops_per_fwd_bwd": _ops(fn)})
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        a.out.write_text(json.dumps({"command": "python benchmarks/bench_host_overhead.py " + " ".join(sys.argv[1:]),
                                     "torch": torch.__version__, "python": platform.python_version(),
                                     "machine": platform.processor() or platform.machine(), "rows": rows}, indent=1),
                         encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
