"""Side by side on one CUDA GPU: loraforge (its real `run_train` flow) vs HF + PEFT + bitsandbytes vs Unsloth.

Each stack runs in its own process on the same token batches (random ids, labels = ids) of a random-weight
Qwen3 model of a real size with the real Qwen3 tokenizer: nf4 + double quantization (or a 16-bit base with
--lora16), LoRA r16 alpha16 on the 7 projections, AdamW lr 2e-4. Recorded per stack: tokens/s (all tokens are
real here), seconds/step, peak allocated memory, first/last loss; with the command, GPU and package versions.

    python benchmarks/peers/bench_peers.py --size 8b --regimes a,b,c --out benchmarks/results/peers_8b
    # a: seq 2048 x batch 4, each stack's default checkpointing; b: no checkpointing; c: seq 16384 x batch 1
Workers: loraforge, loraforge_std (fast_path: off), hf, unsloth; `_nogc` turns checkpointing off; loraforge's
`_ckauto` sets `checkpoint_layers: auto` and `_ck<N>` `checkpoint_layers: N` (e.g. loraforge_ckauto,
loraforge_ck18); `_gqarep` repeats K/V heads before the varlen kernel instead of sharing them (the GQA lever's A/B);
`_fp8` sets `fp8: true` (FP8 base-weight matmuls), `_fp8bwd` `fp8: backward`, `_nofp8` `fp8: false` (the default is
`auto`: `backward` on Hopper); `_adamtorch` sets `optim: adamw_torch` (foreach AdamW; the default is
`adamw_torch_fused`, whose step takes the non-finite guard's flag on the device);
`_denserep` repeats K/V heads for SDPA instead of passing them grouped (`enable_gqa=True`, the default); `_fullreplay` replays
every GEMM of a checkpointed layer (down_proj's unread one included); `_ungrouped` projects q/k/v and gate/up each on
its own instead of as one group (one GEMM over their stacked weights); `_noreplay8` runs a replayed layer's forward
GEMMs in 16 bits under `fp8: backward` (the default runs them in FP8, as its input gradients).
`--profile DIR` profiles one extra step per worker and writes where its GPU time went (by kernel kind).
`--seqs 16384,24576,32768 --cap-gib 24` runs each worker at batch 1 at each length under a 24 GiB cap
(`torch.cuda.set_per_process_memory_fraction`): the longest that trains is the one to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REGIMES = {
    "a": dict(seq=2048, bs=4, workers=["loraforge", "hf", "unsloth"]),
    "b": dict(seq=2048, bs=4, workers=["loraforge_nogc", "unsloth_nogc"]),
    "c": dict(seq=16384, bs=1, workers=["loraforge", "hf", "unsloth"]),
}


def make_model(size: str, path: Path, tokenizer: Path | None) -> None:
    import shutil

    import torch
    from qwen3_shapes import qwen3_config
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = Qwen3ForCausalLM(qwen3_config(size))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path, max_shard_size="5GB")
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, path / f.name)
    else:
        from loraforge.models.qwen3_tokenizer import write_qwen3_tokenizer

        write_qwen3_tokenizer(path)


def batches(seq: int, bs: int, n: int = 4):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 151643, (bs, seq), generator=g) for _ in range(n)]


def _report(kind, seq, bs, steps, dt, losses, load_s, trainable, extra=None):
    import torch

    row = {"worker": kind, "seq": seq, "bs": bs, "tok_per_s": round(bs * seq * steps / dt),
           "s_per_step": round(dt / steps, 3), "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2), "trainable": trainable,
           "load_s": round(load_s, 1), "loss_first_last": [losses[0], losses[-1]] if losses else None,
           "losses": losses}
    row.update(extra or {})
    print("RESULT " + json.dumps(row), flush=True)


def worker_peer(kind: str, path: str, seq: int, bs: int, steps: int, warmup: int, lora16: bool,
                profile: str | None = None) -> None:
    """HF + PEFT + bitsandbytes, or Unsloth: a plain loop (what their users run)."""
    import torch

    t0 = time.time()
    gc = not kind.endswith("_nogc")
    base = kind.replace("_nogc", "")
    if base == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=seq, load_in_4bit=not lora16,
                                                     dtype=torch.bfloat16)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=TARGETS, random_state=3407,
                                                 use_gradient_checkpointing="unsloth" if gc else False)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = None if lora16 else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", device_map={"": 0})
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    load_s = time.time() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    data = [b.cuda() for b in batches(seq, bs)]
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.time()
        x = data[i % len(data)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    torch.cuda.synchronize()
    dt = time.time() - t
    if profile:  # one more step, profiled (outside the timed ones)
        x = data[0]
        with _profiler() as prof:
            t1 = time.time()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            wall = time.time() - t1
        profile_summary(prof, wall, profile)
    _report(kind, seq, bs, steps, dt, losses, load_s, sum(p.numel() for p in params))


def worker_loraforge(kind: str, path: str, seq: int, bs: int, steps: int, warmup: int, lora16: bool,
                     work: Path, profile: str | None = None) -> None:
    """loraforge through its real flow: config -> load_config -> run_train, on the same token batches."""
    import torch
    from transformers import TrainerCallback

    from loraforge.config import load_config
    from loraforge.data.cache import save_bundle
    from loraforge.data.report import DataReport
    from loraforge.train.workflow import run_train

    data_dir = work / f"data_{seq}_{bs}"
    rows = [row.tolist() for b in batches(seq, bs) for row in b]
    if not (data_dir / "tokenized").exists():
        import datasets

        (data_dir).mkdir(parents=True, exist_ok=True)
        (data_dir / "dummy.json").write_text(json.dumps([{"instruction": "x", "output": "y"}]), encoding="utf-8")
        (data_dir / "dataset_info.json").write_text(json.dumps({"dummy": {"file_name": "dummy.json"}}),
                                                    encoding="utf-8")
        train = datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq] * len(rows),
                                            "labels": rows})
        save_bundle(data_dir / "tokenized", train, None, None, DataReport(), {"key": "bench"})
    gc = not kind.endswith("_nogc")
    cfg = {"model_name_or_path": path, "dataset": "dummy", "dataset_dir": str(data_dir), "template": "qwen3",
           "tokenized_path": str(data_dir / "tokenized"), "cutoff_len": seq, "output_dir": str(work / kind),
           "overwrite_output_dir": True, "per_device_train_batch_size": bs, "gradient_accumulation_steps": 1,
           "max_steps": warmup + steps + (2 if profile else 0), "logging_steps": 1, "save_strategy": "no",
           "learning_rate": 2e-4,
           "lr_scheduler_type": "constant", "warmup_steps": 0, "bf16": True, "lora_rank": 16, "lora_alpha": 16,
           "lora_target": "all", "report_to": "none", "plot_loss": False,
           "dataloader_num_workers": 0}
    if not lora16:
        cfg["quantization_bit"] = 4
    if not gc:
        cfg["disable_gradient_checkpointing"] = True
    if kind.startswith("loraforge_std"):
        cfg["fast_path"] = "off"
    if "_nofp8" in kind:  # the A/B of `fp8: auto` (backward on Hopper): every matmul 16-bit
        cfg["fp8"] = False
    elif "_fp8" in kind:
        cfg["fp8"] = "backward" if "_fp8bwd" in kind else True
    if "_adamtorch" in kind:  # the A/B of the default optimizer (adamw_torch_fused, transformers' own on torch 2.8+,
        cfg["optim"] = "adamw_torch"  # whose step skips a non-finite update on the device): foreach AdamW
    if "_gqarep" in kind:  # the A/B of the GQA lever: K/V heads repeated before the varlen kernel
        from loraforge.kernels import varlen_attention

        varlen_attention.GQA_MODE["mode"] = "repeat"
    if "_fullreplay" in kind:  # the A/B of skipping down_proj's unread base GEMM when a layer is replayed
        from loraforge.models import fast

        fast.MLP_OUTPUT_UNREAD = ()
    if "_ungrouped" in kind:  # the A/B of grouped projections: q/k/v and gate/up each projected on its own
        from loraforge.models.fast import modules

        modules.GROUPED["on"] = False
    if "_noreplay8" in kind:  # the A/B of FP8 replays: under fp8 backward, a replayed layer's forward GEMMs in 16 bits
        from loraforge.kernels import fp8

        fp8.REPLAY["on"] = False
    if "_denserep" in kind:  # the A/B of SDPA with grouped K/V heads (enable_gqa, the default): repeat them
        from loraforge.kernels import varlen_attention

        varlen_attention.DENSE_GQA["grouped"] = False
    layers = re.search(r"_ck(auto|\d+)", kind)
    if layers:
        cfg["checkpoint_layers"] = layers.group(1) if layers.group(1) == "auto" else int(layers.group(1))
    times, losses = {}, []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if "t_end" in times and warmup < state.global_step <= warmup + steps:  # host time between two steps
                times.setdefault("between", []).append(time.perf_counter() - times.pop("t_end"))
            if profile and state.global_step == warmup + steps:  # one more step, profiled (not timed)
                torch.cuda.synchronize()
                times["prof"] = _profiler()
                times["prof"].__enter__()
                times["prof_t"] = time.time()

        def on_step_end(self, args, state, control, **kw):
            times["t_end"] = time.perf_counter()
            if "prof" in times and state.global_step == warmup + steps + 1:
                torch.cuda.synchronize()
                wall = time.time() - times.pop("prof_t")
                prof = times.pop("prof")
                prof.__exit__(None, None, None)
                profile_summary(prof, wall, profile)
                import cProfile

                times["py"] = cProfile.Profile()  # and the step after it under Python's profiler (host time)
                times["py"].enable()
            elif "py" in times and state.global_step == warmup + steps + 2:
                times["py"].disable()
                python_summary(times.pop("py"), profile)
            if state.global_step == warmup:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                times["start"] = time.time()
            elif state.global_step == warmup + steps:
                torch.cuda.synchronize()
                times["end"] = time.time()
                times["peak"] = torch.cuda.max_memory_allocated()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 4))

    t0 = time.time()
    outcome = run_train(load_config(cfg, [], purpose="train"), extra_callbacks=[Clock()])
    dt = times["end"] - times["start"]
    _report(kind, seq, bs, steps, dt, losses, time.time() - t0 - dt, None,
            {"peak_alloc_gib": round(times["peak"] / 2**30, 2),
             # from one step's end (after its optimizer step) to the next one's begin: logging and the next batch
             "between_steps_ms": round(1e3 * sum(times.get("between", [0])) / max(1, len(times.get("between", []))), 1),
             "metrics": {
                k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))}})


KERNEL_KINDS = (  # first match wins: where the GPU time of one profiled step goes
    ("attention", r"flash|fmha|attention|cudnn"),
    ("memcpy", r"^Memcpy|^Memset"),
    ("dequant", r"dequant|kDequant"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|splitK"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copy_cast", r"copy|_to_|cast|cat_|CatArray"),
    ("reduce", r"reduce|norm_kernel|sum_"),
    ("elementwise", r"elementwise|vectorized"),
)


def profile_summary(prof, wall_s: float, path: str) -> None:
    """Write, as JSON, the kernel time of one profiled step by kind (gemm, attention, dequant, ...), the kernel
    count, the GPU-busy share of the step's wall time, and the 30 costliest kernels."""
    kinds: dict[str, list[float]] = {}
    kernels = []
    host = sorted(((float(getattr(a, "self_cpu_time_total", 0) or 0) / 1e3, a.count, a.key[:80])
                   for a in prof.key_averages() if not str(getattr(a, "device_type", "")).endswith("CUDA")),
                  reverse=True)
    for a in prof.key_averages():  # the kernels themselves (a CPU op's "self" device time repeats them)
        if not str(getattr(a, "device_type", "")).endswith("CUDA"):
            continue
        t = float(getattr(a, "self_device_time_total", 0) or getattr(a, "self_cuda_time_total", 0) or 0)
        if t <= 0:
            continue
        kind = next((k for k, rx in KERNEL_KINDS if re.search(rx, a.key, re.I)), "other")
        slot = kinds.setdefault(kind, [0.0, 0])
        slot[0] += t / 1e3
        slot[1] += a.count
        kernels.append((t / 1e3, a.count, kind, a.key[:140]))
    busy = sum(v[0] for v in kinds.values())
    out = {"wall_ms": round(wall_s * 1e3, 1), "kernel_ms": round(busy, 1),
           "busy_share": round(busy / (wall_s * 1e3), 3) if wall_s else None,
           "timeline": timeline(prof),
           "kernels": sum(v[1] for v in kinds.values()),
           "by_kind_ms": {k: {"ms": round(v[0], 1), "share": round(v[0] / busy, 3), "count": v[1]}
                          for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
           "top": [{"ms": round(t, 2), "count": c, "kind": k, "name": n}
                   for t, c, k, n in sorted(kernels, reverse=True)[:30]],
           "host": {"aten_ops": sum(c for _, c, k in host if k.startswith("aten::")),
                    "top_self_ms": [{"ms": round(t, 2), "count": c, "op": k} for t, c, k in host[:30]]}}
    Path(path).write_text(json.dumps(out, indent=1), encoding="utf-8")


def _union_ms(spans: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of ``(start_us, end_us)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def timeline_from_events(events: list[dict]) -> dict:
    """From a Chrome trace's device events: the time the GPU was busy at all (any stream), compute vs copies,
    how much of the copy time ran under compute, and the busy time per stream."""
    dev = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not dev:
        return {}
    span = lambda e: (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))  # noqa: E731
    spans = [span(e) for e in dev]
    copies = [s for s, e in zip(spans, dev) if e["cat"] != "kernel"]
    compute = [s for s, e in zip(spans, dev) if e["cat"] == "kernel"]
    streams: dict[str, list] = {}
    for s, e in zip(spans, dev):
        streams.setdefault(str(e.get("tid")), []).append(s)
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    gaps = _gaps(events, dev, span)
    union, copy_ms, compute_ms = _union_ms(spans), _union_ms(copies), _union_ms(compute)
    return {"first_to_last_ms": round((last - first) / 1e3, 1), "gpu_busy_ms": round(union, 1),
            "compute_busy_ms": round(compute_ms, 1), "copy_busy_ms": round(copy_ms, 1),
            "copy_hidden_ms": round(copy_ms + compute_ms - union, 1),
            "idle_ms": round((last - first) / 1e3 - union, 1),
            "per_stream_ms": {k: round(_union_ms(v), 1) for k, v in sorted(streams.items())}, "gaps": gaps}


def _gaps(events: list[dict], dev: list[dict], span) -> dict:
    """Where the GPU sat idle: its idle gaps by size, and by the host op that launched the work which ended each
    gap (a gap whose next kernel was launched after the gap began means the host was late, not the GPU)."""
    launches = {e["args"]["correlation"]: float(e["ts"]) for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    op_of: dict[int, tuple[float, str]] = {}
    for e in events:
        if e.get("cat") == "cpu_op" and "External id" in e.get("args", {}):
            key, dur = e["args"]["External id"], float(e.get("dur", 0))
            if key not in op_of or dur < op_of[key][0]:  # the innermost op of that id
                op_of[key] = (dur, e["name"])
    order = sorted(dev, key=lambda e: span(e)[0])
    buckets = {"<20us": [0, 0.0], "20-100us": [0, 0.0], "0.1-1ms": [0, 0.0], ">1ms": [0, 0.0]}
    by_op: dict[str, list] = {}
    host_late, end = 0.0, span(order[0])[1]
    first, prev, largest = span(order[0])[0], order[0], []
    for e in order[1:]:
        a, b = span(e)
        gap = a - end
        if gap > 0:
            largest.append((gap, a - gap - first, prev.get("name", "?")[:60], e.get("name", "?")[:60],
                            op_of.get(e.get("args", {}).get("External id"), (0, "?"))[1]))
            size = "<20us" if gap < 20 else "20-100us" if gap < 100 else "0.1-1ms" if gap < 1000 else ">1ms"
            buckets[size][0] += 1
            buckets[size][1] += gap / 1e3
            launched = launches.get(e.get("args", {}).get("correlation"))
            if launched is not None and launched > end:
                host_late += gap / 1e3
            name = op_of.get(e.get("args", {}).get("External id"), (0, e.get("name", "?")[:60]))[1]
            slot = by_op.setdefault(name, [0, 0.0])
            slot[0] += 1
            slot[1] += gap / 1e3
        if b > end:
            prev = e
        end = max(end, b)
    top = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:25]
    return {"by_size": {k: {"count": c, "ms": round(t, 1)} for k, (c, t) in buckets.items()},
            "host_late_ms": round(host_late, 1),
            "before_op": [{"op": k, "count": c, "ms": round(t, 2)} for k, (c, t) in top],
            "largest": [{"ms": round(g / 1e3, 2), "at_ms": round(at / 1e3, 1), "after": p, "next": n, "next_op": o}
                        for g, at, p, n, o in sorted(largest, reverse=True)[:15]]}


def timeline(prof) -> dict:
    """:func:`timeline_from_events` of a finished profiler (through its Chrome trace)."""
    path = Path(tempfile.mkdtemp()) / "trace.json"
    try:
        prof.export_chrome_trace(str(path))
        return timeline_from_events(json.loads(path.read_text(encoding="utf-8")).get("traceEvents", []))
    except (OSError, RuntimeError, ValueError, KeyError) as e:  # a diagnostic must not cost the run its numbers
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        path.unlink(missing_ok=True)


def python_summary(py, path: str) -> None:
    """Add the host's Python functions (cProfile of one step: own time and time including callees) to the
    profile JSON at ``path``."""
    import pstats

    stats = pstats.Stats(py).stats
    rows = [(tt, ct, nc, f"{Path(fn).name}:{line}:{name}") for (fn, line, name), (_, nc, tt, ct, _) in stats.items()]
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    report["python"] = {"total_s": round(sum(r[0] for r in rows), 3),
                        "by_own_time": [{"own_ms": round(tt * 1e3, 1), "cum_ms": round(ct * 1e3, 1), "calls": nc,
                                         "fn": f} for tt, ct, nc, f in sorted(rows, reverse=True)[:40]],
                        "by_cum_time": [{"own_ms": round(tt * 1e3, 1), "cum_ms": round(ct * 1e3, 1), "calls": nc,
                                         "fn": f} for tt, ct, nc, f in sorted(rows, key=lambda r: -r[1])[:40]]}
    Path(path).write_text(json.dumps(report, indent=1), encoding="utf-8")


def _profiler():
    import torch

    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA])


def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"gpu": torch.cuda.get_device_name(0), "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "triton", "unsloth", "unsloth_zoo", "trl",
                 "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="8b")
    ap.add_argument("--regimes", default="a,b,c")
    ap.add_argument("--workers", help="override the regime's worker list (comma list)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora16", action="store_true", help="LoRA on a 16-bit base instead of QLoRA 4-bit")
    ap.add_argument("--tokenizer", help="a folder of Qwen3 tokenizer files to copy into the model")
    ap.add_argument("--path", default=os.path.join(tempfile.gettempdir(), "qwen3-bench"))
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--out", default="benchmarks/results/peers")
    ap.add_argument("--profile", help="a folder: each worker profiles one extra step after the timed ones and "
                    "writes where its GPU time went to <folder>/<regime>_<worker>.json")
    ap.add_argument("--seqs", help="instead of --regimes: these sequence lengths at batch 1 (comma list)")
    ap.add_argument("--cap-gib", type=float, help="cap every worker's GPU memory at this many GiB")
    ap.add_argument("--worker")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--bs", type=int)
    a = ap.parse_args()
    path = Path(a.path) / a.size
    if a.worker == "make":
        make_model(a.size, path, Path(a.tokenizer) if a.tokenizer else None)
    elif a.worker:
        if a.cap_gib:
            import torch

            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gib * 2**30 / total), 0)
        if a.worker.startswith("loraforge"):
            worker_loraforge(a.worker, str(path), a.seq, a.bs, a.steps, a.warmup, a.lora16, Path(a.path),
                             a.profile)
        else:
            worker_peer(a.worker, str(path), a.seq, a.bs, a.steps, a.warmup, a.lora16, a.profile)
    if a.worker:
        return
    if not (path / "config.json").exists():
        t = time.time()
        # in a child process, so that no GPU memory stays held while the stacks are timed
        subprocess.run([sys.executable, __file__, "--worker", "make", "--size", a.size, "--path", a.path]
                       + (["--tokenizer", a.tokenizer] if a.tokenizer else []), check=True)
        print(json.dumps({"built": a.size, "s": round(time.time() - t, 1)}), flush=True)
    rows = []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    regimes = {f"s{n}": dict(seq=int(n), bs=1, workers=["loraforge", "unsloth"]) for n in a.seqs.split(",")} \
        if a.seqs else {r: REGIMES[r] for r in a.regimes.split(",")}
    for regime, spec in regimes.items():
        for w in (a.workers.split(",") if a.workers else spec["workers"]):
            cmd = [sys.executable, __file__, "--worker", w, "--path", a.path, "--size", a.size, "--seq",
                   str(spec["seq"]), "--bs", str(spec["bs"]), "--steps", str(a.steps), "--warmup", str(a.warmup)]
            if a.lora16:
                cmd.append("--lora16")
            if a.cap_gib:
                cmd += ["--cap-gib", str(a.cap_gib)]
            if a.profile:
                Path(a.profile).mkdir(parents=True, exist_ok=True)
                cmd += ["--profile", str(Path(a.profile) / f"{regime}_{w}.json")]
            t = time.time()
            try:
                r = subprocess.run(cmd, timeout=a.timeout, capture_output=True, text=True)
                found = [line[7:] for line in r.stdout.splitlines() if line.startswith("RESULT ")]
                row = json.loads(found[-1]) if found else {"worker": w, "error": (r.stderr or r.stdout)[-2500:]}
                (out / f"{regime}_{w}.log").write_text(r.stdout[-20000:] + r.stderr[-20000:], encoding="utf-8")
            except subprocess.TimeoutExpired:
                row = {"worker": w, "error": f"timeout after {a.timeout}s"}
            row.update(regime=regime, wall_s=round(time.time() - t, 1), size=a.size,
                       base="bf16" if a.lora16 else "nf4+dq")
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "metrics")}), flush=True)
    result = {"command": "python benchmarks/peers/bench_peers.py " + " ".join(sys.argv[1:]),
              "versions": versions(), "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "results.md").write_text(markdown(result), encoding="utf-8")


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}`", "", f"{result['versions']}", "",
             "| regime | worker | seq x bs | tokens/s | s/step | peak alloc GiB | loss first/last |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['regime']} | {r['worker']} | | error: {r['error'][-120:]!r} | | | |")
            continue
        lines.append(f"| {r['regime']} | {r['worker']} | {r['seq']} x {r['bs']} | {r['tok_per_s']:,} | "
                     f"{r['s_per_step']} | {r['peak_alloc_gib']} | {r['loss_first_last']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
