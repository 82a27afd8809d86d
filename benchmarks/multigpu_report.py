"""Numbers of one multi-GPU benchmark run, and the JSON + markdown written from them (used by bench_multigpu.py).

Kept apart from the driver so the arithmetic (tokens/s per GPU, scaling efficiency, loss agreement) can be read
and checked on its own. Import from a script run as `python benchmarks/NAME.py`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

LOSS_TOLERANCE = 0.01  # the bar: each step's loss within 1% of the one-GPU run's


def read_losses(out_dir: Path) -> dict[int, float]:
    """Per-step training loss from loraforge's trainer_log.jsonl (written by rank 0)."""
    path = out_dir / "trainer_log.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {int(r["current_steps"]): float(r["loss"]) for r in rows if "loss" in r and "current_steps" in r}


def summarize(ranks: list[dict], *, gpus: int, tokens_per_step: int) -> dict:
    """Per-run numbers from the rank reports: the slowest rank sets each step's time."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    timed = min(len(r["step_s"]) for r in ranks)
    out = {"gpus": gpus, "ranks_reported": len(ranks), "steps_timed": timed,
           "peak_alloc_gib_per_gpu": [r["peak_alloc_gib"] for r in ranks],
           "peak_reserved_gib_per_gpu": [r["peak_reserved_gib"] for r in ranks],
           "train_peak_alloc_gib_per_gpu": [r.get("train_peak_alloc_gib") for r in ranks],
           "alloc_at_train_begin_gib_per_gpu": [r.get("alloc_at_train_begin_gib") for r in ranks],
           "load_peak_alloc_gib_per_gpu": [r.get("load_peak_alloc_gib") for r in ranks],
           "host_rss_gib_per_rank": [r.get("host_rss_gib") for r in ranks],
           "tokens_seen_reported": ranks[0].get("tokens_seen")}
    if timed:
        step_s = statistics.median(max(r["step_s"][i] for r in ranks) for i in range(timed))
        out.update(median_step_s=round(step_s, 4), tokens_per_s_total=round(tokens_per_step / step_s, 1),
                   tokens_per_s_per_gpu=round(tokens_per_step / step_s / gpus, 1))
    return out


def compare_losses(losses: dict[int, float], reference: dict[int, float]) -> dict:
    """Step-by-step relative difference to the reference (one-GPU) losses."""
    steps = sorted(set(losses) & set(reference))
    if not steps:
        return {"loss_steps_compared": 0}
    rel = {s: abs(losses[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in steps}
    worst = max(rel, key=rel.get)
    return {"loss_steps_compared": len(steps), "loss_max_rel_diff": round(rel[worst], 5),
            "loss_worst_step": worst, "loss_within_1pct": all(v <= LOSS_TOLERANCE for v in rel.values())}


def scaling(run: dict, baseline: dict | None) -> float | None:
    """Tokens/s per GPU against the one-GPU run's (1.0 = perfect scaling)."""
    if not baseline or not run.get("tokens_per_s_per_gpu") or not baseline.get("tokens_per_s_per_gpu"):
        return None
    return round(run["tokens_per_s_per_gpu"] / baseline["tokens_per_s_per_gpu"], 3)


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return " / ".join(_fmt(v, digits) for v in value)
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(result: dict) -> str:
    """The tables for docs/multi_gpu.md: throughput and memory, then losses step by step."""
    s = result["settings"]
    lines = [f"# Multi-GPU benchmark ({result['device'].get('gpu', 'no GPU')} x {s['gpus']})", "",
             f"`{result['command']}`", "",
             *[f"runs carried from an earlier call: `{c}`" for c in result.get("earlier_commands", [])],
             *([""] if result.get("earlier_commands") else []),
             f"Qwen3-{s['size']} (random weights, real tokenizer), QLoRA {s['quantization']}, LoRA r{s['lora_rank']} "
             f"on all 7 projections, seq {s['seq']}, global batch {s['global_batch']} sequences per step, "
             f"{s['steps']} steps ({s['warmup']} untimed).", "",
             "| run | GPUs | per-GPU batch x accum | tokens/s per GPU | scaling | peak alloc per GPU (GiB) | "
             "peak reserved (GiB) | host RAM used, peak (before) GiB | max loss diff vs 1 GPU | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        if name == "seed":
            continue
        status = "ok" if r.get("ok") else (r.get("skipped") or f"failed ({r.get('exit')})")
        diff = r.get("loss_max_rel_diff")
        lines.append(
            f"| {name} | {r.get('gpus', '-')} | {r.get('per_device', '-')} x {r.get('accum', '-')} | "
            f"{_fmt(r.get('tokens_per_s_per_gpu'), 0)} | {_fmt(r.get('scaling_vs_1gpu'), 3)} | "
            f"{_fmt(r.get('peak_alloc_gib_per_gpu'))} | {_fmt(r.get('peak_reserved_gib_per_gpu'))} | "
            f"{_fmt(r.get('host_used_peak_gib'))} ({_fmt(r.get('host_used_before_gib'))}) | "
            f"{'-' if diff is None else f'{diff:.2%}'} | {status} |")
    steps = sorted({int(k) for r in result["runs"].values() for k in (r.get("losses") or {})})
    named = [n for n, r in result["runs"].items() if r.get("losses") and n != "seed"]
    if steps and named:
        lines += ["", "Loss per step:", "", "| step | " + " | ".join(named) + " |",
                  "|---|" + "---|" * len(named)]
        for step in steps:
            cells = [_fmt((result["runs"][n]["losses"] or {}).get(str(step)), 4) for n in named]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    seed = result["runs"].get("seed")
    if seed:
        lines += ["", "Seed scenario (emulated): " + seed.get("description", ""), ""]
        if seed.get("ok"):
            est = seed.get("estimate") or {}
            lines += [f"- losses: {', '.join(_fmt(v, 3) for v in (seed.get('losses') or {}).values())}",
                      f"- peak allocated per GPU: {_fmt(seed.get('peak_alloc_gib_per_gpu'), 2)} GiB; reserved "
                      f"{_fmt(seed.get('peak_reserved_gib_per_gpu'), 2)} GiB (cap {s.get('seed_cap_gib')} GiB)",
                      f"- `loraforge estimate`: allocated {_fmt(est.get('allocated_gib'), 2)} GiB, needed "
                      f"{_fmt(est.get('needed_gib'), 2)} GiB, host {_fmt(est.get('host_gib'), 1)} GiB; estimate / "
                      f"measured allocated = {_fmt(seed.get('estimate_vs_measured'), 3)}",
                      f"- host used (whole machine, peak): {_fmt(seed.get('host_used_peak_gib'))} GiB; "
                      f"tokens/s per GPU {_fmt(seed.get('tokens_per_s_per_gpu'), 0)}"]
        else:
            lines.append(f"- not measured: {seed.get('skipped') or seed.get('error') or seed.get('exit')}")
    return "\n".join(lines) + "\n"


def write(out_dir: Path, result: dict) -> None:
    """multigpu.json and multigpu.md in ``out_dir`` (rewritten after every run, so a timeout keeps the rest)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "multigpu.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out_dir / "multigpu.md").write_text(markdown(result), encoding="utf-8")
