"""Fit the memory model's free constants to the measured table and write the calibration report.

    python benchmarks/fit_memory_model.py            # prints the fit, writes benchmarks/results/memory_calibration.md

The model counts saved tensors one by one (src/loraforge/estimate/activations.py), so its constants have a
physical meaning; the fit checks them instead of replacing them: a scale on the counted activations, the bytes
per token and vocabulary entry at the loss backward, and a constant (workspaces). A weighted least-squares fit
(relative errors) over every measured row gives values next to 1.0, 12 and 0, so the model keeps those.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from loraforge.estimate.calibration import TABLE, compare, load_rows, scenario_for_row
from loraforge.estimate.model import (
    ACTIVATION_SCALE, GIB, LOGITS_BYTES_PER_VOCAB, estimate_memory)

OUT = Path(__file__).resolve().parent / "results" / "memory_calibration.md"


def fit(rows: list[dict]) -> dict[str, float]:
    """Least-squares (relative) fit of activation scale, logits bytes per vocab-token and a constant (GiB)."""
    design, target = [], []
    for row in rows:
        b = estimate_memory(scenario_for_row(row))
        rest = b.allocated - b.activations - b.logits
        vocab_tokens = b.logits / LOGITS_BYTES_PER_VOCAB
        measured = row["peak_alloc"]
        design.append([b.activations / ACTIVATION_SCALE / measured, vocab_tokens / measured, GIB / measured])
        target.append((measured - rest) / measured)
    coef, *_ = np.linalg.lstsq(np.array(design), np.array(target), rcond=None)
    return {"activation_scale": float(coef[0]), "logits_bytes_per_vocab_token": float(coef[1]),
            "constant_gib": float(coef[2])}


def report(rows: list[dict], fitted: dict[str, float]) -> str:
    """The markdown table of measured vs predicted peaks."""
    doc = json.loads(TABLE.read_text(encoding="utf-8"))
    comps = compare(rows)
    within = sum(abs(c.error) <= 0.10 for c in comps)
    worst_under = min(c.error for c in comps)
    lines = [
        "# Memory calibration: measured vs estimated peak GPU memory",
        "",
        f"GPU: {doc['gpu']}. {doc['description']}",
        "",
        "Commands (on the GPU machine, with `" + doc["environment"] + "`):",
        "",
        *[f"    {c}" for c in doc["commands"]],
        "",
        "Estimate: `loraforge.estimate` allocated peak (no CUDA context, no head-room), checked by",
        "`tests/test_estimate_calibration.py`. The run-2 rows that are not repeats of run 1 (14B, rank 64 on",
        "q/v, fp16, freeze, 8-bit AdamW, bf16 norms, ...) were predicted before they were measured, with the",
        "same constants; all landed within 3.6%. One physical detail was added afterwards: with an 8-bit optimizer",
        "the Trainer keeps 32-bit states for embeddings, and under autocast the 16-bit weight casts stay cached",
        "until the forward ends (full fine-tuning, 8-bit AdamW row: -3.6% -> -0.3%).",
        "",
        f"**{within}/{len(comps)} rows within ±10%; largest under-estimate {worst_under:+.1%}; "
        f"mean |error| {np.mean([abs(c.error) for c in comps]):.1%}.**",
        "",
        "| configuration | run | measured GiB | estimated GiB | error | peak at |",
        "|---|---|---|---|---|---|",
    ]
    run_of = {r["name"]: r.get("run", 1) for r in rows}
    for c in comps:
        lines.append(f"| {c.name} | {run_of[c.name]} | {c.measured_gib:.3f} | {c.predicted_gib:.3f} | "
                     f"{c.error:+.1%} | {c.phase} |")
    lines += [
        "",
        "## Fitted constants",
        "",
        "Weighted least squares over all rows (free: activation scale, logits bytes per token and vocabulary "
        "entry, a constant):",
        "",
        f"- activation scale: {fitted['activation_scale']:.3f} (model: {ACTIVATION_SCALE})",
        f"- loss backward bytes per token x vocab: {fitted['logits_bytes_per_vocab_token']:.2f} "
        f"(model: {LOGITS_BYTES_PER_VOCAB:g} = fp32 log-softmax output + its gradient + the input gradient)",
        f"- constant: {fitted['constant_gib']:+.3f} GiB (model: 0; the 64 MiB of cuBLAS workspaces are counted)",
        "",
        "The fit lands next to the counted values, so the model keeps them (1.0, 12, 0): no per-row or per-size "
        "factors. The counted activations err about 3% high on the fp32-norm QLoRA rows, the safe side.",
        "",
        "## What the table shows",
        "",
        "- With checkpointing, the loss over Qwen's 151,936-entry vocabulary dominates: 12 bytes x vocab per token "
        "(14 GiB for 8,192 tokens), more than the 4-bit 8B weights.",
        "- loraforge's QLoRA preparation keeps norm weights in fp32; bitsandbytes layers return their input dtype, "
        "so the residual stream becomes fp32: qwen3-8b qlora-4 b4 s2048 with checkpointing needs 24.7 GiB "
        "instead of 22.5 GiB with bf16 norms, and qwen3-4b qlora-4 at 2,048 tokens without checkpointing "
        "21.8 GiB instead of 16.8 GiB.",
        "- bitsandbytes 8-bit layers keep their inputs on the autograd context, outside the hooks checkpointing "
        "uses, so QLoRA-8 keeps every block's linear inputs even with checkpointing.",
        "- Random weights make LLM.int8 treat many down_proj input columns as outliers (99% at 8B, 30% at 4B, 0 at "
        "0.6B; recorded per row and fed to the model); trained models have few, so the estimator assumes 1%.",
        "- Full fine-tuning peaks in the optimizer step: fp32 weights + fp32 gradients + two fp32 Adam moments + "
        "the 4-byte foreach temporary = 20 bytes per parameter.",
        "- Reserved memory (what the caching allocator holds) ran 3-27% above allocated; the verdict adds the "
        "CUDA context (0.75 GiB measured outside PyTorch) and a 5% margin.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    rows = load_rows()
    fitted = fit(rows)
    print(json.dumps(fitted, indent=1))
    OUT.write_text(report(rows, fitted), encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
