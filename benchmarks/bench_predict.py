"""Predict throughput: loraforge's batched generation vs a one-sample-at-a-time ``generate`` loop.

Same model (a Qwen3 architecture with random weights built on the GPU, real sizes), same prompts, greedy,
same ``max_new_tokens`` and stop tokens. Counts generated tokens (up to and including nothing after a stop
token) per second of wall time. Needs only torch + transformers + loraforge's src (no datasets, no tokenizer):
prompts are token ids drawn directly.

    PYTHONPATH=src python benchmarks/bench_predict.py --size 0.6b --samples 64 --batch 32 --max-new-tokens 128 \
        --out benchmarks/results/predict_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen3_shapes import SHAPES, qwen3_config  # noqa: E402

STOP_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>
PAD_ID = 151643


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(size: str, device: str):
    import torch
    from transformers import Qwen3ForCausalLM

    cfg = qwen3_config(size, head_dim=128)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def make_prompts(n: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [torch.randint(0, 151000, (k,), generator=g).tolist() for k in lengths]


def cut(ids: list[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in STOP_IDS), ids)


def run_batched(model, prompts, batch: int, max_new: int) -> tuple[list[list[int]], float]:
    """loraforge's predict path: length-sorted batches through ``generate_batch`` (left padding, KV cache)."""
    from loraforge.evaluate.predict import batch_plan, generate_batch
    from loraforge.serve.engine import SamplingParams

    params = SamplingParams(max_new_tokens=max_new)
    outputs: list[list[int]] = [[] for _ in prompts]
    _sync()
    start = time.perf_counter()
    for group in batch_plan([len(p) for p in prompts], batch):
        results = generate_batch(model, [prompts[i] for i in group], params, pad_id=PAD_ID, stop_ids=STOP_IDS)
        for i, ids in zip(group, results):
            outputs[i] = ids
    _sync()
    return outputs, time.perf_counter() - start


def run_loop(model, prompts, max_new: int) -> tuple[list[list[int]], float]:
    """The baseline: one ``generate`` call per sample, no padding."""
    import torch

    outputs = []
    _sync()
    start = time.perf_counter()
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 eos_token_id=STOP_IDS, pad_token_id=PAD_ID, use_cache=True)
        outputs.append(cut(out[0, len(ids):].tolist()))
    _sync()
    return outputs, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="0.6b", choices=sorted(SHAPES))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", default="64,512", help="min,max prompt tokens")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args()

    import torch
    import transformers

    low, high = (int(x) for x in args.prompt_len.split(","))
    t0 = time.perf_counter()
    model = build_model(args.size, args.device)
    build_s = time.perf_counter() - t0
    prompts = make_prompts(args.samples, low, high)
    # warm up both paths (kernels, allocator)
    run_batched(model, prompts[:4], 4, 8)
    run_loop(model, prompts[:1], 8)

    batched, batched_s = run_batched(model, prompts, args.batch, args.max_new_tokens)
    print(json.dumps({"batched_s": round(batched_s, 2)}), flush=True)
    loop, loop_s = run_loop(model, prompts, args.max_new_tokens)
    n_batched = sum(len(o) for o in batched)
    n_loop = sum(len(o) for o in loop)
    same = sum(a == b for a, b in zip(batched, loop))
    prefix16 = sum(a[:16] == b[:16] for a, b in zip(batched, loop))
    result = {
        "benchmark": "predict throughput, loraforge batched generate_batch vs one-at-a-time model.generate",
        "model": f"Qwen3-{args.size} architecture, random weights, bf16, sdpa",
        "params": sum(p.numel() for p in model.parameters()),
        "samples": args.samples, "batch": args.batch, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens": {"min": low, "max": high, "total": sum(map(len, prompts))},
        "batched": {"seconds": round(batched_s, 3), "generated_tokens": n_batched,
                    "tokens_per_second": round(n_batched / batched_s, 1)},
        "one_at_a_time": {"seconds": round(loop_s, 3), "generated_tokens": n_loop,
                          "tokens_per_second": round(n_loop / loop_s, 1)},
        "speedup": round((n_batched / batched_s) / (n_loop / loop_s), 2),
        "greedy_outputs_identical": f"{same}/{args.samples}",
        "first_16_tokens_identical": f"{prefix16}/{args.samples}",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "model_build_seconds": round(build_s, 1),
        "command": "PYTHONPATH=$PWD/src python benchmarks/bench_predict.py " + " ".join(sys.argv[1:]),
    }
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
