"""Compare the memory model with the measured table ``benchmarks/results/memory_calibration.json``.

Each measured row becomes a :class:`Scenario` with the same settings; the only measured input besides the
settings is the share of LLM.int8 outlier columns, a property of the (random) weights that the calibration
script records per module. The predicted value compared is the allocated peak (what
``torch.cuda.max_memory_allocated`` reports), without the CUDA context and head-room that the verdict adds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .activations import INPUT_OF, regime
from .architectures import LINEAR_NAMES, BUILTIN_ARCHITECTURES
from .model import GIB, estimate_memory
from .scenario import Scenario

TABLE = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "memory_calibration.json"


@dataclass(frozen=True)
class Comparison:
    """One measured row against the model."""

    name: str
    measured_gib: float
    predicted_gib: float
    phase: str

    @property
    def error(self) -> float:
        """Relative error of the prediction (+: over-estimate)."""
        return self.predicted_gib / self.measured_gib - 1


def load_rows(path: str | Path = TABLE) -> list[dict[str, Any]]:
    """The measured rows (rows that failed or were not run are left out)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return [r for r in doc["rows"] if not r.get("error") and "peak_alloc" in r]


def _uniform_outlier_fraction(s: Scenario, per_module: dict[str, float]) -> float:
    """The single outlier share that keeps as many bytes as the measured per-module shares."""
    r = regime(s, trainable_layer=False)
    dims = {"attn_in": s.arch.hidden_size, "attn_out": s.arch.q_dim, "mlp_in": s.arch.hidden_size,
            "mlp_hidden": s.arch.intermediate_size}
    dtypes = {"attn_in": r.normed, "attn_out": r.compute, "mlp_in": r.normed, "mlp_hidden": r.mlp}
    weight = {m: dims[INPUT_OF[m]] * dtypes[INPUT_OF[m]] for m in LINEAR_NAMES}
    return sum(per_module.get(m, 0.0) * weight[m] for m in LINEAR_NAMES) / sum(weight.values())


def scenario_for_row(row: dict[str, Any]) -> Scenario:
    """The scenario the calibration script ran for ``row``."""
    s = Scenario(
        arch=BUILTIN_ARCHITECTURES[f"qwen3-{row['size']}"], method=row["method"], lora_rank=row.get("rank", 16),
        lora_targets=tuple(row.get("targets") or LINEAR_NAMES), batch_size=row["bs"], seq_len=row["seq"],
        gradient_checkpointing=row["gc"], optim=row["optim"], precision=row.get("precision", "bf16"),
        freeze_layers=row.get("freeze_layers", 2), upcast_norms=row.get("upcast_norms"),
        int8_outlier_fraction=0.0)
    if row.get("int8_outlier_fraction"):
        from dataclasses import replace

        s = replace(s, int8_outlier_fraction=_uniform_outlier_fraction(s, row["int8_outlier_fraction"]))
    return s


def compare(rows: list[dict[str, Any]] | None = None) -> list[Comparison]:
    """Model vs measurement for every row."""
    out = []
    for row in rows if rows is not None else load_rows():
        b = estimate_memory(scenario_for_row(row))
        out.append(Comparison(row["name"], row["peak_alloc"] / GIB, b.allocated / GIB, b.phase))
    return out
