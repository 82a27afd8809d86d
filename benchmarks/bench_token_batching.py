"""Token-budget batching on Unsloth's small-batch recipe, through loraforge's real `run_train`: off vs auto.

The recipe of Unsloth's published benchmark (and of /work/shared/bench/sft_real.py): Alpaca (alpaca_en_demo.json,
999 rows), `template: alpaca`, batch 2 x accumulation 4, LoRA r32 (alpha 32) on all 7 projections, adamw_8bit,
4-bit base, bf16, gradient checkpointing. Each variant runs in its own process (clean peak memory) and reports:

- samples/s and real (non-pad) tokens/s over the steps after warm-up, peak allocated GPU memory;
- where a step's time goes: waiting for data (`data_wait_s` of trainer_log.jsonl: the timer around the
  dataloader's next() calls in `LoraforgeTrainer.get_batch_samples`), GPU kernels (torch.profiler over a few extra
  steps, sum of device kernel time), and the rest (host overhead: Python, launches, syncs, GPU idle).

    python benchmarks/bench_token_batching.py --model /path/to/qwen3-8b-random \\
        --data ../shared/bench/alpaca_en_demo.json --out benchmarks/results/token_batching.json

The data file is not copied into the repository (its licence is not stated beside it); pass its path. On a CPU
machine (`--model tiny-random-qwen3 --steps 4 --warm 1`) it runs as a smoke test without the GPU split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {
    "template": "alpaca", "cutoff_len": 2048, "finetuning_type": "lora", "lora_rank": 32, "lora_alpha": 32,
    "lora_dropout": 0.0, "lora_target": "all", "quantization_bit": 4, "bf16": True, "optim": "adamw_8bit",
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "learning_rate": 2e-4,
    "save_strategy": "no", "report_to": "none", "seed": 3407, "overwrite_output_dir": True,
}


def _callback(warm: int, steps: int, marks: dict, profile_steps: int):
    """Clock marks at the warm-up and last measured step; a torch.profiler window over the extra steps."""
    import torch
    from torch.autograd import DeviceType
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class Clock(TrainerCallback):
        profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda and profile_steps and state.global_step == steps:
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.start()
                torch.cuda.synchronize()
                marks["profile_start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warm, steps):
                if cuda:
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()
            if self.profiler is not None and state.global_step == steps + profile_steps:
                torch.cuda.synchronize()
                marks["profile_end"] = time.perf_counter()
                self.profiler.stop()
                # device-side events only (as the profiler table's "Self CUDA total"): CPU ops also carry the
                # device time of the kernels they launched, which would count every kernel twice
                kernels = [e for e in self.profiler.key_averages() if e.device_type == DeviceType.CUDA
                           and not getattr(e, "is_user_annotation", False)]
                marks["gpu_kernel_s"] = sum(e.self_device_time_total for e in kernels) / 1e6
                self.profiler = None

    return Clock()


def alpaca_run(work: Path, data: Path, out: Path) -> dict:
    """Config keys for a run on ``data`` (an Alpaca JSON file) registered as `alpaca_demo` under ``work``."""
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "dataset_info.json").write_text(json.dumps({"alpaca_demo": {"file_name": str(data.resolve())}}))
    return {"dataset": "alpaca_demo", "dataset_dir": str(data_dir), "output_dir": str(out),
            "data_cache_dir": str(work / "cache")}


def worker(mode: str, model: str, data: Path, steps: int, warm: int, profile_steps: int) -> dict:
    """One run of the recipe with ``micro_batch_tokens: mode``; returns its measurements."""
    import torch

    from loraforge.config import load_config
    from loraforge.train.workflow import run_train

    work = Path(tempfile.gettempdir()) / "bench_token_batching"
    out = work / f"out-{mode}"
    cfg = dict(RECIPE, **alpaca_run(work, data, out), model_name_or_path=model, max_steps=steps + profile_steps,
               logging_steps=1, micro_batch_tokens=mode)
    if not torch.cuda.is_available():
        cfg.pop("bf16")
    marks: dict = {}
    outcome = run_train(load_config(cfg, purpose="train"), extra_callbacks=[_callback(warm, steps, marks,
                                                                                      profile_steps)])
    rows = {r["current_steps"]: r for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())}
    window = marks[steps] - marks[warm]
    samples = (steps - warm) * RECIPE["per_device_train_batch_size"] * RECIPE["gradient_accumulation_steps"]
    tokens = rows[steps]["tokens_seen"] - rows[warm]["tokens_seen"]  # non-padding tokens (include_num_input_...)
    data_wait = rows[steps]["data_wait_s"] - rows[warm]["data_wait_s"]
    step_s = window / (steps - warm)
    result = {
        "micro_batch_tokens": mode,
        "samples_per_s": round(samples / window, 2),
        "real_tokens_per_s": round(tokens / window),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "step_ms": round(1000 * step_s, 1),
        "data_wait_ms_per_step": round(1000 * data_wait / (steps - warm), 2),
        "data_wait_share": round(data_wait / window, 4),
        "losses": [rows[s]["loss"] for s in sorted(rows) if "loss" in rows[s]],
        "train_metrics": {k: outcome.metrics.get(k) for k in ("train_loss", "epoch", "num_input_tokens_seen")},
    }
    if "gpu_kernel_s" in marks:  # the profiled steps run a little slower; use them only for the GPU share
        profiled = marks["profile_end"] - marks["profile_start"]
        gpu_share = marks["gpu_kernel_s"] / profiled
        result["time_split"] = {"gpu_kernels": round(gpu_share, 3), "data_wait": round(data_wait / window, 3),
                                "host_and_idle": round(max(0.0, 1 - gpu_share - data_wait / window), 3)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (e.g. a random-weight Qwen3-8B with its tokenizer)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "bench" / "alpaca_en_demo.json"),
                    help="alpaca_en_demo.json (LLaMA-Factory's demo set)")
    ap.add_argument("--modes", default="off,auto", help="micro_batch_tokens values to compare, comma-separated")
    ap.add_argument("--steps", type=int, default=8, help="last measured optimizer step")
    ap.add_argument("--warm", type=int, default=2, help="steps before the measured window")
    ap.add_argument("--profile-steps", type=int, default=2, help="extra profiled steps (GPU only) for the time split")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per variant")
    ap.add_argument("--out", help="write the results JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.model, Path(a.data), a.steps, a.warm, a.profile_steps)),
              flush=True)
        return
    if not Path(a.data).is_file():
        sys.exit(f"--data {a.data}: file not found; pass the path of alpaca_en_demo.json")
    results = []
    for mode in a.modes.split(","):
        cmd = [sys.executable, __file__, "--worker", mode, "--model", a.model, "--data", a.data, "--steps",
               str(a.steps), "--warm", str(a.warm), "--profile-steps", str(a.profile_steps)]
        start = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout,
                                  env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            lines = [x[7:] for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            row = json.loads(lines[-1]) if lines else {"micro_batch_tokens": mode, "error": proc.stderr[-3000:]}
        except subprocess.TimeoutExpired:
            row = {"micro_batch_tokens": mode, "error": f"timeout after {a.timeout} s"}
        row["wall_s"] = round(time.time() - start, 1)
        print(json.dumps(row), flush=True)
        results.append(row)
    ok = {r["micro_batch_tokens"]: r for r in results if "error" not in r}
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "recipe": RECIPE, "model": a.model,
              "steps": a.steps, "warm": a.warm, "results": results}
    if "off" in ok and "auto" in ok:
        report["speedup_samples_per_s"] = round(ok["auto"]["samples_per_s"] / ok["off"]["samples_per_s"], 2)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
