"""GPU check of `loraforge train` on a real-size Qwen3 architecture (random weights), through the real CLI.

Builds a random-weight Qwen3 model with the exact Qwen3 tokenizer, writes a synthetic ShareGPT dataset of long
conversations, then runs `loraforge train` for a few steps per variant (QLoRA 4-bit, LoRA bf16, packing) and
records tokens/s, peak GPU memory and the loss curve in a JSON file.

    python benchmarks/bench_train_gpu.py --size 0.6b --steps 12 --out benchmarks/results/train_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from qwen3_shapes import SHAPES, qwen3_config

WORDS = ("model adapter gradient memory token layer batch weight rank alpha dropout optimizer schedule "
         "checkpoint quantization precision sequence attention projection embedding 数据 模型 训练 显存 微调").split()


def build_model(size: str, path: Path) -> None:
    import torch
    from transformers import Qwen3ForCausalLM

    from loraforge.models.qwen3_tokenizer import write_qwen3_tokenizer

    cfg = qwen3_config(size)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    write_qwen3_tokenizer(path)
    del model
    torch.cuda.empty_cache()


def write_data(folder: Path, rows: int) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    data = []
    for _ in range(rows):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(300, 700)))
        data.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    (folder / "long.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps(
        {"long": {"file_name": "long.json", "formatting": "sharegpt"}}), encoding="utf-8")


VARIANTS = {
    "qlora4_bf16_gc": {"quantization_bit": 4, "optim": "paged_adamw_8bit"},
    "lora_bf16_gc": {"optim": "adamw_torch"},
    "qlora4_bf16_gc_packing": {"quantization_bit": 4, "optim": "paged_adamw_8bit", "packing": True},
    "qlora8_bf16_gc": {"quantization_bit": 8, "optim": "adamw_8bit"},
}


def run_variant(name: str, model: Path, data: Path, work: Path, steps: int, seq: int, bs: int) -> dict:
    out = work / name
    base = {"model_name_or_path": str(model), "dataset": "long", "dataset_dir": str(data), "template": "qwen3",
            "cutoff_len": seq, "output_dir": str(out), "per_device_train_batch_size": bs, "max_steps": steps,
            "logging_steps": 1, "save_steps": steps, "learning_rate": 2e-4, "bf16": True, "lora_rank": 16,
            "lora_alpha": 32, "lora_target": "all", "overwrite_output_dir": True, "report_to": "none",
            "preprocessing_num_workers": 4, "flash_attn": "sdpa", **VARIANTS[name]}
    cfg = work / f"{name}.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(base), encoding="utf-8")
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "loraforge.cli", "train", str(cfg)], capture_output=True, text=True)
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    row = {"variant": name, "returncode": proc.returncode, "wall_s": round(time.time() - t, 1), "seq": seq, "bs": bs}
    if proc.returncode != 0:
        row["error_tail"] = (proc.stdout + proc.stderr)[-1500:]
        return row
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    results = json.loads((out / "all_results.json").read_text())
    # tokens/s over the steps after the first two (warm-up: kernels, allocator, paged optimizer)
    t2 = next(r for r in log if r["current_steps"] == 2)
    last = log[-1]
    elapsed = lambda r: sum(int(x) * 60**i for i, x in enumerate(reversed(r["elapsed_time"].split(":"))))  # noqa: E731
    dt = max(elapsed(last) - elapsed(t2), 1)
    row.update({"tokens_per_s_after_warmup": round((last["tokens_seen"] - t2["tokens_seen"]) / dt),
                "peak_gpu_memory_gib": results.get("train_peak_gpu_memory_gib"),
                "loss_first_last": [log[0]["loss"], last["loss"]], "steps": last["current_steps"],
                "adapter_written": (out / "adapter_model.safetensors").is_file()})
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.6b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", default="/tmp/lf-gpu")
    ap.add_argument("--out", default="benchmarks/results/train_gpu.json")
    args = ap.parse_args()
    import torch

    work = Path(args.work)
    model, data = work / f"qwen3-{args.size}", work / "data"
    t = time.time()
    build_model(args.size, model)
    write_data(data, 400)
    rows = [{"built_model_s": round(time.time() - t, 1), "size": args.size,
             "device": torch.cuda.get_device_name(0), "torch": torch.__version__}]
    for name in args.variants.split(","):
        rows.append(run_variant(name, model, data, work, args.steps, args.seq, args.bs))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/bench_train_gpu.py " + " ".join(sys.argv[1:])
    out.write_text(json.dumps({"command": cmd, "rows": rows}, indent=1), encoding="utf-8")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(out.read_text(), encoding="utf-8")


if __name__ == "__main__":
    main()
