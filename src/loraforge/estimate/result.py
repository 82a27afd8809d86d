"""The estimate of one run: breakdown, verdict for a GPU, and suggestions; built from a scenario or a config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .advice import Suggestion, suggest
from .gpus import GPU, detect_gpus, find_gpu
from .model import CUDA_CONTEXT, GIB, Breakdown, auto_kept_layers, estimate_memory, trainable_params
from .scenario import Scenario, scenario_from_config

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass
class Estimate:
    """Per-GPU peak memory of a run and, when a GPU is known, whether it fits and what would make it fit."""

    scenario: Scenario
    breakdown: Breakdown
    gpu: GPU | None = None
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def needed_gib(self) -> float:
        """GiB each GPU must have (allocated peak + CUDA context + allocator head-room)."""
        return self.breakdown.total / GIB

    @property
    def fits(self) -> bool | None:
        """True/False for the GPU given or detected; None when no GPU is known (e.g. on a CPU machine)."""
        if self.gpu is None:
            return None
        return self.needed_gib <= self.gpu.memory_gib

    @property
    def headroom_gib(self) -> float | None:
        """GPU memory left over (negative: missing)."""
        return None if self.gpu is None else self.gpu.memory_gib - self.needed_gib

    def summary_lines(self) -> list[str]:
        """The breakdown, verdict and suggestions as terminal lines (what ``train`` prints before loading)."""
        from .report import summary_lines

        return summary_lines(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``--json``)."""
        from .report import to_dict

        return to_dict(self)


def _notes(s: Scenario, b: Breakdown) -> list[str]:
    notes = []
    if s.fast_path:
        notes.append("fast path (fast_path: auto): 16-bit norms, chunked loss, checkpoints in pinned host memory; "
                     "fitted to 3 H200 measurements of Qwen3-8B QLoRA (benchmarks/results/"
                     "memory_calibration_fast.json); `fast_path=off` estimates the standard path")
    elif s.fused_loss:
        notes.append("DeepSpeed keeps the standard decoder, but the loss is loraforge's chunked linear cross-entropy "
                     "(no full-vocabulary logits); `fast_path=off` estimates the full logits")
    if s.zero_stage >= 1 and s.quant_bits is not None:
        notes.append("DeepSpeed with QLoRA: fitted to ZeRO-2, ZeRO-3 and ZeRO-3 + offload runs of Qwen3-8B/14B on two "
                     "H200s, each within 7% (benchmarks/results/memory_calibration_zero.json)")
    elif s.zero_stage >= 1:
        notes.append("DeepSpeed figures follow ZeRO's published memory model; they are not calibrated on GPUs")
    if s.precision == "fp16":
        notes.append("fp16 mixed precision: the same bytes as bf16 (loss scaling adds no large tensors)")
    if b.paged_optimizer:
        notes.append(f"{b.paged_optimizer / GIB:.2f} GiB of paged optimizer states live in CUDA managed memory: "
                     "they use free GPU memory and move to host RAM under pressure (not counted above)")
    if s.quant_bits == 8:
        notes.append(f"LLM.int8 keeps outlier input columns in 16/32 bits; {s.int8_outlier_fraction:.0%} of the "
                     "columns assumed (trained models have few outliers)")
    if s.tokens > s.seq_len:
        notes.append(f"activations assume every sequence of the micro-batch is {s.seq_len} tokens long "
                     "(the worst case: padding to the longest, or packing)")
    return notes


def build_estimate(s: Scenario, gpu: GPU | None = None, *, advise: bool = True) -> Estimate:
    """Estimate ``s``; with a GPU, add the verdict and (when it does not fit) the cheapest fixes."""
    auto_note = None
    if s.checkpoint_auto and s.gradient_checkpointing:
        s, auto_note = _auto_checkpoint_layers(s, gpu)
    b = estimate_memory(s)
    est = Estimate(s, b, gpu, notes=_notes(s, b))
    if auto_note:
        est.notes.append(auto_note)
    if gpu is not None and est.fits is False and advise:
        est.suggestions = suggest(s, gpu)
    if gpu is not None and s.precision in ("bf16", "pure_bf16") and not gpu.bf16:
        est.notes.append(f"{gpu.name} has no bf16 support: set `fp16: true` instead of `bf16: true`")
    if trainable_params(s) == 0:
        est.notes.append("nothing is trainable in this setup")
    return est


def _auto_checkpoint_layers(s: Scenario, gpu: GPU | None) -> tuple[Scenario, str]:
    """``checkpoint_layers: auto`` on ``gpu``: training's rule (:func:`auto_kept_layers`), with the whole GPU free
    after the CUDA context and the weights."""
    from dataclasses import replace

    if gpu is None:
        return s, "checkpoint_layers: auto is chosen at train time from the GPU's free memory; estimated as `all`"
    base = estimate_memory(replace(s, kept_layers=0))
    kept, _, _ = auto_kept_layers(s, gpu.memory_gib * GIB - CUDA_CONTEXT - base.weights - base.adapter)
    return replace(s, kept_layers=kept), (f"checkpoint_layers: auto on {gpu.name}: the last {kept} of "
                                          f"{s.arch.num_layers} layers keep their activations (the rest recompute "
                                          "in backward)")


def gpu_for(name: str | None, memory_gib: float | None) -> GPU | None:
    """A GPU from ``--gpu NAME`` and/or ``--gpu-mem GiB`` (the size wins when both are given)."""
    base = find_gpu(name) if name else None
    if memory_gib is not None:
        label = base.name if base else f"{memory_gib:g} GiB GPU"
        return GPU(label, float(memory_gib), base.bf16 if base else True, f"{memory_gib:g} GiB (given)")
    return base


def estimate_for_config(cfg: "RunConfig", *, gpu: str | None = None, num_gpus: int | None = None) -> Estimate:
    """The estimate ``train`` prints before loading weights.

    ``gpu`` names a known GPU (T4, A100-80, ...); without it ``estimate_gpu`` from the config is used, then the
    GPUs detected on this machine (their count is the default ``num_gpus`` when the config sets none).
    On a machine without GPUs and no GPU named, ``fits`` is None and no suggestions are made.
    """
    detected = detect_gpus()
    name = gpu or cfg.model.estimate_gpu
    chosen = find_gpu(name) if name else (detected[0].as_gpu() if detected else None)
    if num_gpus is None and "nproc_per_node" not in cfg.explicit and len(detected) > 1:
        num_gpus = len(detected)
    s = scenario_from_config(cfg, num_gpus=num_gpus)
    return build_estimate(s, chosen)
