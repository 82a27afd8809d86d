"""training_loss.png: raw and smoothed training loss, plus evaluation loss when the run evaluated."""

from __future__ import annotations

import json
import math
from pathlib import Path


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled towards zero."""
    if not values:
        return []
    if weight is None:  # stronger smoothing for longer curves, as TensorBoard users expect
        weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], 0.0
    for i, v in enumerate(values, 1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**i) if weight > 0 else v)
    return out


def read_log(path: str | Path) -> list[dict]:
    """Rows of a trainer_log.jsonl file."""
    rows = []
    p = Path(path)
    if p.is_file():
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def plot_loss(output_dir: str | Path) -> Path | None:
    """Draw training_loss.png from output_dir/trainer_log.jsonl; returns the image path (None: nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(Path(output_dir) / "trainer_log.jsonl")
    train = [(r["current_steps"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["current_steps"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#1f77b4", alpha=0.35, label="train loss")
        ax.plot(steps, smooth(list(losses)), color="#1f77b4", label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="#d62728", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss of {Path(output_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(output_dir) / "training_loss.png"
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
