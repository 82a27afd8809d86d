"""Multi-GPU QLoRA throughput and memory: 1 GPU vs DDP / DeepSpeed ZeRO-3 (+ CPU offload) / FSDP-QLoRA on N GPUs.

Every run goes through loraforge's own training flow (config -> data -> model -> Trainer), with the per-rank
worker preparation of `loraforge train` (loraforge.train.launcher.maybe_relaunch); a callback times each optimizer
step (after warm-up, CUDA-synchronised) and records peak memory on every rank. The one-GPU baseline runs in the
same call, so the scaling efficiency compares numbers taken on the same machine minutes apart.

    # on a machine with >= 2 GPUs; needs loraforge's dependencies there (datasets, bitsandbytes, and deepspeed for
    # the zero3 engines), e.g. carried in .gpu-site:
    PYTHONPATH=$PWD/.gpu-site:$PWD/src HF_HUB_OFFLINE=1 python benchmarks/bench_multigpu.py \
        --size 8b --gpus 2 --engines ddp,fsdp_qlora --out $OUT/multigpu.json
    python benchmarks/bench_multigpu.py --size 8b --gpus 2 --engines zero3,zero3_offload --out $OUT/multigpu.json
    # the seed's plan: Qwen3-14B QLoRA, ZeRO-3 + offload, capped at 16 GiB per GPU
    python benchmarks/bench_multigpu.py --size 14b --gpus 4 --engines zero3_offload --no-baseline \
        --memory-cap-gib 16 --batch 2 --accum 4 --seq 2048 --out $OUT/multigpu.json
    # plumbing check on a CPU (gloo, toy model, no quantization): python benchmarks/bench_multigpu.py --cpu

Results are merged into --out (default benchmarks/results/multigpu.json) keyed by size/engine/GPUs, each entry
with the exact command that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = {  # engine -> loraforge config keys (the same keys a user writes in the YAML)
    "ddp": {},  # what users get by default (HF: find_unused_parameters on for a peft model)
    "ddp_static": {"ddp_find_unused_parameters": False},  # no unused-parameter search each step
    "zero3": {"deepspeed": "z3"},
    "zero3_offload": {"deepspeed": "z3_offload"},
    "fsdp_qlora": {"fsdp": True, "fsdp_config": str(REPO / "examples" / "fsdp" / "fsdp1_qlora.json")},
}
WORDS = "the of and to in is was for on with as by at from that this be are it an or which".split()


# ------------------------------------------------------------------------------------------------ worker side
def _step_clock(out_file: Path, warmup: int):
    """A TrainerCallback that times optimizer steps after ``warmup`` and writes this rank's numbers at the end."""
    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            if state.global_step > warmup:
                self.times.append(time.perf_counter() - self.start)

        def on_train_end(self, args, state, control, **kwargs):
            cuda = torch.cuda.is_available()
            row = {"rank": args.process_index, "world": args.world_size, "step_s": self.times,
                   "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                   "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                   "tokens_seen": int(getattr(state, "num_input_tokens_seen", 0) or 0)}
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(row), encoding="utf-8")

    return StepClock()


def worker(args: argparse.Namespace) -> int:
    """One training run inside (or outside) torchrun: loraforge's flow plus the step clock."""
    from loraforge.config import load_config
    from loraforge.train.distributed import rank_info
    from loraforge.train.launcher import maybe_relaunch
    from loraforge.train.workflow import run_train

    overrides = json.loads(args.overrides)
    if maybe_relaunch(args.config, overrides) is not None:  # never relaunches: this already runs under torchrun
        return 1
    if args.memory_cap_gib:
        import torch

        total = torch.cuda.get_device_properties(rank_info().local_rank).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total),
                                                   rank_info().local_rank)
    cfg = load_config(args.config, overrides, purpose="train")
    clock = _step_clock(Path(args.run_dir) / f"rank{rank_info().rank}.json", args.warmup)
    run_train(cfg, extra_callbacks=[clock])
    return 0


# ------------------------------------------------------------------------------------------------ driver side
def make_model(size: str, path: Path, tokenizer_dir: Path, device: str) -> float:
    """Random-weight Qwen3 of the published shape, saved as a normal HF folder with the real Qwen3 tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    start = time.time()
    cfg = qwen3_config(size)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path, max_shard_size="5GB")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                 "special_tokens_map.json", "generation_config.json"):
        if (tokenizer_dir / name).is_file() and not (path / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return time.time() - start


def write_data(folder: Path, seq: int, rows: int) -> None:
    """Alpaca rows whose answers are longer than ``seq`` tokens, so every sample is truncated to exactly ``seq``."""
    import random

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    data = [{"instruction": f"Write a long text number {i}.", "input": "",
             "output": " ".join(rng.choice(WORDS) for _ in range(seq + 64))} for i in range(rows)]
    (folder / "bench.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}), encoding="utf-8")


def base_config(a: argparse.Namespace, model_dir: Path, data_dir: Path) -> dict:
    steps = a.warmup + a.steps
    cfg = {
        "model_name_or_path": str(model_dir), "template": "qwen3", "dataset": "bench", "dataset_dir": str(data_dir),
        "cutoff_len": a.seq, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 16, "lora_alpha": 16,
        "lora_dropout": 0.0, "per_device_train_batch_size": a.batch, "gradient_accumulation_steps": a.accum,
        "max_steps": steps, "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no", "plot_loss": False,
        "overwrite_output_dir": True, "include_num_input_tokens_seen": True, "seed": 0,
        "data_cache_dir": str(Path(a.work) / "data_cache"),
    }
    if not a.cpu:
        cfg.update(quantization_bit=4, bf16=True, flash_attn="sdpa")
    return cfg


def run_one(a: argparse.Namespace, name: str, gpus: int, engine_keys: dict, config: Path) -> dict:
    """Train one setup in fresh processes; returns its metrics (or its error)."""
    run_dir = Path(a.work) / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"{k}={json.dumps(v) if isinstance(v, (dict, bool)) else v}" for k, v in engine_keys.items()]
    overrides.append(f"output_dir={run_dir / 'out'}")
    me = [str(Path(__file__).resolve()), "--worker", "--config", str(config), "--run-dir", str(run_dir),
          "--overrides", json.dumps(overrides), "--warmup", str(a.warmup)]
    if a.memory_cap_gib:
        me += ["--memory-cap-gib", str(a.memory_cap_gib)]
    if gpus == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *me]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "FORCE_TORCHRUN")}
    if not a.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    start = time.time()
    log = run_dir / "log.txt"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
        log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
        code = proc.returncode
    except subprocess.TimeoutExpired as err:
        log.write_text(str(err.stdout or "") + str(err.stderr or ""), encoding="utf-8")
        code = "timeout"
    wall = round(time.time() - start, 1)
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]
    if code != 0 or len(ranks) != gpus:
        tail = log.read_text(encoding="utf-8")[-2500:] if log.exists() else ""
        return {"ok": False, "exit": code, "wall_s": wall, "ranks_reported": len(ranks), "log_tail": tail}
    step_s = statistics.median(max(r["step_s"][i] for r in ranks) for i in range(len(ranks[0]["step_s"])))
    tokens_per_step_per_gpu = a.batch * a.accum * a.seq
    return {
        "ok": True, "gpus": gpus, "wall_s": wall, "median_step_s": round(step_s, 4),
        "tokens_per_s_per_gpu": round(tokens_per_step_per_gpu / step_s, 1),
        "tokens_per_s_total": round(gpus * tokens_per_step_per_gpu / step_s, 1),
        "peak_alloc_gib_per_gpu": [r["peak_alloc_gib"] for r in sorted(ranks, key=lambda r: r["rank"])],
        "peak_reserved_gib_per_gpu": [r["peak_reserved_gib"] for r in sorted(ranks, key=lambda r: r["rank"])],
        "tokens_seen_reported": ranks[0]["tokens_seen"],  # all ranks, warm-up included: checks sample lengths
        "tokens_seen_expected": gpus * tokens_per_step_per_gpu * (a.warmup + a.steps),
    }


def device_info(cpu: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "accelerate", "bitsandbytes", "deepspeed"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if not cpu and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus_visible"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def merge_results(out: Path, key: str, entry: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.is_file() else {"benchmark": "multigpu", "runs": {}}
    data["runs"][key] = entry
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def driver(a: argparse.Namespace) -> int:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(a.model_dir or work / f"qwen3-{a.size}-random")
    if not (model_dir / "config.json").is_file():
        from loraforge.models.builtin import resolve_builtin

        tok = Path(a.tokenizer) if a.tokenizer else resolve_builtin("tiny-random-qwen3")
        build = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make", a.size, "--model-dir",
                                str(model_dir), "--tokenizer", str(tok), *(["--cpu"] if a.cpu else [])])
        if build.returncode:
            return build.returncode
    data_dir = work / "data"
    write_data(data_dir, a.seq, rows=max(64, 2 * a.gpus * a.batch * a.accum * (a.warmup + a.steps)))
    config = work / "bench.yaml"
    import yaml

    config.write_text(yaml.safe_dump(base_config(a, model_dir, data_dir)), encoding="utf-8")
    command = "python benchmarks/bench_multigpu.py " + " ".join(sys.argv[1:])
    common = {"size": a.size, "seq": a.seq, "per_device_batch": a.batch, "accum": a.accum, "steps_timed": a.steps,
              "warmup_steps": a.warmup, "memory_cap_gib": a.memory_cap_gib, "command": command,
              "device": device_info(a.cpu), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    baseline = None
    if not a.no_baseline:
        baseline = run_one(a, f"{a.size}-single-1", 1, {}, config)
        merge_results(Path(a.out), f"{a.size}/single/1", {**common, **baseline})
        print(json.dumps({"run": "single x1", **baseline})[:2000], flush=True)
    for engine in a.engines.split(","):
        result = run_one(a, f"{a.size}-{engine}-{a.gpus}", a.gpus, ENGINES[engine], config)
        if result.get("ok") and baseline and baseline.get("ok"):
            result["scaling_efficiency_vs_1gpu"] = round(
                result["tokens_per_s_per_gpu"] / baseline["tokens_per_s_per_gpu"], 3)
        merge_results(Path(a.out), f"{a.size}/{engine}/{a.gpus}", {**common, "engine": engine, **result})
        print(json.dumps({"run": f"{engine} x{a.gpus}", **result})[:2000], flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8b", choices=sorted(SHAPES))
    p.add_argument("--gpus", type=int, default=2, help="GPUs for the multi-GPU runs (the baseline uses 1)")
    p.add_argument("--engines", default="ddp,zero3,zero3_offload,fsdp_qlora",
                   help=f"comma-separated: {', '.join(ENGINES)}")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sample (every sample is exactly this long)")
    p.add_argument("--batch", type=int, default=4, help="per-device batch size")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps timed (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-cap-gib", type=float, default=None, help="cap each process's GPU memory (OOM above)")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-GPU run")
    p.add_argument("--timeout", type=int, default=420, help="seconds allowed per run")
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "loraforge-bench-multigpu"))
    p.add_argument("--model-dir", default=None)
    p.add_argument("--tokenizer", default=None, help="folder with the Qwen3 tokenizer (default: tiny-random-qwen3's)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "multigpu.json"))
    p.add_argument("--cpu", action="store_true", help="plumbing check: toy model, gloo, no quantization")
    p.add_argument("--make", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.cpu:
        a.size, a.engines, a.seq, a.batch, a.steps, a.warmup = "toy", "ddp", 64, 2, 2, 1
    if a.worker:
        return worker(a)
    if a.make:
        seconds = make_model(a.make, Path(a.model_dir), Path(a.tokenizer), "cpu" if a.cpu else "cuda")
        print(json.dumps({"made": a.make, "seconds": round(seconds, 1)}), flush=True)
        return 0
    return driver(a)


if __name__ == "__main__":
    sys.exit(main())
