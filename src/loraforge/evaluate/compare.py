"""`loraforge eval --compare`: the same eval set through several variants of a model, side by side.

A variant is written ``[label=]target[:4bit|:8bit]`` where ``target`` is ``base`` (the config's base model, no
adapter), an adapter folder (applied to the config's base model, not merged) or a model folder (an exported or
merged model). Each variant is loaded, measured (process RSS, CUDA memory, weight bytes), run through
:func:`run_predict` into ``<output_dir>/compare/<label>/``, and unloaded. The table is written as
``comparison.md``, ``comparison.json`` and a bar chart ``comparison.png``.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ConfigError
from .memory import cuda_allocated_mb, rss_mb, weights_mb
from .predict import run_predict

if TYPE_CHECKING:
    from ..config import RunConfig

logger = logging.getLogger(__name__)

SCORE_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "sacrebleu", "exact_match")


@dataclass
class Variant:
    """One model to evaluate: ``kind`` is base, adapter or model; ``bits`` loads the base in 4/8 bits."""

    label: str
    kind: str
    path: str | None = None
    bits: int | None = None


def parse_variants(spec: str | Sequence[str] | None, cfg: "RunConfig") -> list[Variant]:
    """Variants from ``--variants`` / ``compare:`` (comma-separated), defaulting to base + the config's adapter."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        if not cfg.model.adapter_name_or_path:
            raise ConfigError(["`eval --compare` needs variants: pass --variants base,path/to/adapter,... or set "
                               "`compare:` (or `adapter_name_or_path`, compared against the base)"], source=cfg.source)
        items = ["base", cfg.model.adapter_name_or_path]
    else:
        items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    variants = [_parse_one(item) for item in items]
    labels = [v.label for v in variants]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError([f"variant label(s) {', '.join(dupes)} appear twice; name them with label=path"],
                          source=cfg.source)
    return variants


def _parse_one(item: str) -> Variant:
    label = None
    if "=" in item:
        label, item = (s.strip() for s in item.split("=", 1))
    bits = None
    match = re.fullmatch(r"(.+):(4|8)bit", item)
    if match:
        item, bits = match.group(1), int(match.group(2))
    if item == "base":
        return Variant(label or ("base" if bits is None else f"base-{bits}bit"), "base", None, bits)
    path = Path(item)
    if (path / "adapter_config.json").is_file():
        kind = "adapter"
    elif (path / "config.json").is_file():
        kind = "model"
    else:
        raise ConfigError([f"variant {item!r} is neither `base`, an adapter folder (with adapter_config.json) nor "
                           "a model folder (with config.json); check the path"])
    name = label or path.name or str(path)
    return Variant(name if bits is None or label else f"{name}-{bits}bit", kind, str(path), bits)


def variant_config(cfg: "RunConfig", variant: Variant) -> "RunConfig":
    """A copy of ``cfg`` that loads ``variant``."""
    vcfg = copy.copy(cfg)
    vcfg.model = copy.deepcopy(cfg.model)
    if variant.kind == "base":
        vcfg.model.adapter_name_or_path = None
    elif variant.kind == "adapter":
        vcfg.model.adapter_name_or_path = variant.path
    else:
        vcfg.model.model_name_or_path = variant.path
        vcfg.model.adapter_name_or_path = None
    if variant.bits is not None:
        vcfg.model.quantization_bit = variant.bits
    return vcfg


def _folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "variant"


def run_compare(cfg: "RunConfig", variants: Sequence[Variant], *, output_dir: str | Path | None = None) -> list[dict]:
    """Evaluate every variant on the config's eval set; write and return the comparison rows."""
    import torch

    from ..models.loader import load_model, load_tokenizer

    out = Path(output_dir or (cfg.training.output_dir if cfg.training else "saves/eval")) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in variants:
        vcfg = variant_config(cfg, variant)
        logger.info("variant %s: %s%s", variant.label, variant.kind, f" {variant.path}" if variant.path else "")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        before = rss_mb()
        tokenizer = load_tokenizer(vcfg.model)
        model = load_model(vcfg, tokenizer, is_trainable=False)
        memory = {"weights_mb": round(weights_mb(model), 3), "rss_mb": round(rss_mb(), 1),
                  "rss_delta_mb": round(rss_mb() - before, 1), "cuda_allocated_mb": cuda_allocated_mb()}
        metrics = run_predict(vcfg, model, tokenizer, output_dir=out / _folder_name(variant.label))
        rows.append({"variant": variant.label, "kind": variant.kind, "path": variant.path, "bits": variant.bits,
                     "scores": {k: metrics.get(f"predict_{k}") for k in SCORE_KEYS},
                     "samples": metrics["predict_samples"],
                     "samples_per_second": metrics["predict_samples_per_second"], "memory": memory})
        del model, tokenizer
    write_comparison(rows, out)
    return rows


def comparison_markdown(rows: Sequence[dict]) -> str:
    """The comparison as a markdown table (scores ×100; memory in MiB)."""
    head = ["variant", "source", *SCORE_KEYS, "samples/s", "weights MiB", "RSS MiB (+load)", "CUDA MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["memory"]
        source = r["path"] or "base model"
        if r["bits"]:
            source += f" ({r['bits']}-bit)"
        cells = [r["variant"], source, *(_fmt(r["scores"][k]) for k in SCORE_KEYS), _fmt(r["samples_per_second"]),
                 _fmt(m["weights_mb"], 1), f"{_fmt(m['rss_mb'], 1)} (+{_fmt(m['rss_delta_mb'], 1)})",
                 _fmt(m["cuda_allocated_mb"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_comparison(rows: Sequence[dict], out: Path) -> dict[str, Path]:
    """Write comparison.md, comparison.json and comparison.png under ``out``; return their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = {"markdown": out / "comparison.md", "json": out / "comparison.json", "chart": out / "comparison.png"}
    n = rows[0]["samples"] if rows else 0
    paths["markdown"].write_text(f"# Comparison on {n} eval samples\n\n" + comparison_markdown(rows), encoding="utf-8")
    paths["json"].write_text(json.dumps({"samples": n, "variants": list(rows)}, indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
    fig = Figure(figsize=(max(6.0, 1.6 * len(SCORE_KEYS)), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(rows))
    for j, r in enumerate(rows):
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(SCORE_KEYS))]
        bars = ax.bar(xs, [r["scores"][k] or 0.0 for k in SCORE_KEYS], width, label=r["variant"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(SCORE_KEYS)), SCORE_KEYS)
    ax.set_ylabel("score (0-100)")
    ax.set_title(f"loraforge eval --compare ({n} samples)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["chart"])
    return paths
