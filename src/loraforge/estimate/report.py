"""Terminal lines and JSON for an :class:`~loraforge.estimate.result.Estimate`."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .activations import norms_fp32, regime
from .model import GIB, trainable_params

if TYPE_CHECKING:
    from .result import Estimate


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(int(n))


def _rows(est: "Estimate") -> list[tuple[str, float]]:
    s, b = est.scenario, est.breakdown
    r = regime(s, trainable_layer=s.method in ("full", "freeze"))
    if s.quant_bits:
        fp32_norms = norms_fp32(s) and regime(s, trainable_layer=False).autocast
        weights = f"weights ({s.quant_bits}-bit linears, 16-bit embeddings" + (", fp32 norms)" if fp32_norms else ")")
    elif s.method == "full":
        weights = "weights (none frozen)"
    else:
        weights = "weights (frozen, " + ("fp32)" if s.precision == "fp32" else "16-bit)")
    master = "fp32" if r.autocast or s.precision == "fp32" else "16-bit + fp32 master" if s.zero_stage else "16-bit"
    trained = "adapter" if s.uses_lora else "trained layers" if s.method == "freeze" else "trained weights"
    acts = "activations (" + ("checkpoints" if s.gradient_checkpointing else "all blocks") + ")"
    return [
        (weights, b.weights), (f"{trained} ({master})", b.adapter),
        ("gradients" + ("" if b.gradients else " (not yet allocated at this peak)"), b.gradients),
        ("optimizer states" + (" (paged, see note)" if b.paged_optimizer else ""), b.optimizer),
        (acts, b.activations), ("logits / loss", b.logits),
        ("temporaries (cuBLAS, casts, buffers)", b.temporaries),
        ("framework (CUDA context + allocator margin)", b.framework),
    ]


def scenario_line(est: "Estimate") -> list[str]:
    """Two lines saying what was estimated."""
    s = est.scenario
    a = s.arch
    zero = ""
    if s.zero_stage:
        off = [w for w, on in (("optimizer", s.offload_optimizer), ("parameters", s.offload_params)) if on]
        zero = f", DeepSpeed ZeRO-{s.zero_stage}" + (f" offloading {' and '.join(off)} to CPU" if off else "")
    accum = f" x {s.grad_accum} accumulation" if s.grad_accum > 1 else ""
    return [
        f"memory estimate: {a.name} ({_count(a.total_params())} parameters), {s.method_label()}",
        f"  {_count(trainable_params(s))} trainable; micro-batch {s.batch_size} x {s.seq_len} tokens{accum}, "
        f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.optim}, {s.precision}, "
        f"{s.num_gpus} GPU{'s' if s.num_gpus > 1 else ''}{zero}",
    ]


def summary_lines(est: "Estimate") -> list[str]:
    """The full terminal report."""
    b = est.breakdown
    lines = scenario_line(est)
    width = 58
    lines.append(f"  per GPU, at the peak ({b.phase}):".ljust(width + 2) + "GiB")
    for label, value in _rows(est):
        lines.append(f"    {label}".ljust(width) + f"{value / GIB:8.2f}")
    lines.append("    total".ljust(width) + f"{b.total / GIB:8.2f}")
    host = ", ".join(f"{k} {v / GIB:.1f}" for k, v in b.host.items())
    lines.append(f"  host RAM, whole machine: {b.host_total / GIB:.1f} GiB ({host})")
    if est.gpu is None:
        lines.append("  verdict: no GPU given or detected; pass --gpu NAME or --gpu-mem GiB for a verdict")
    elif est.fits:
        lines.append(f"  verdict: FITS on {est.gpu.name} ({est.gpu.memory_gib:g} GiB per GPU), "
                     f"{est.headroom_gib:.1f} GiB to spare")
    else:
        lines.append(f"  verdict: DOES NOT FIT on {est.gpu.name} ({est.gpu.memory_gib:g} GiB per GPU): "
                     f"{-est.headroom_gib:.1f} GiB short")
        if est.suggestions:
            lines.append("  cheapest changes that fit (each re-estimated):")
            lines += [f"    {i}. {sug.line()}" for i, sug in enumerate(est.suggestions, 1)]
        else:
            lines.append("  no single change found that fits; use a larger GPU or more GPUs with ZeRO-3")
    lines += [f"  note: {n}" for n in est.notes]
    return lines


def to_dict(est: "Estimate") -> dict[str, Any]:
    """The estimate as plain JSON data (GiB)."""
    s = est.scenario
    scenario = {k: v for k, v in asdict(s).items() if k != "arch"}
    scenario["lora_targets"] = list(s.lora_targets)
    arch = asdict(s.arch)
    arch["total_params"] = s.arch.total_params()
    return {
        "model": arch,
        "scenario": scenario,
        "trainable_params": trainable_params(s),
        "per_gpu_gib": est.breakdown.to_dict(),
        "needed_gib": round(est.needed_gib, 3),
        "gpu": None if est.gpu is None else asdict(est.gpu),
        "fits": est.fits,
        "headroom_gib": None if est.headroom_gib is None else round(est.headroom_gib, 3),
        "suggestions": [sug.to_dict() for sug in est.suggestions],
        "notes": list(est.notes),
    }
