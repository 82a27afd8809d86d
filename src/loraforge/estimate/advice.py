"""The cheapest changes that make a run fit: each candidate is applied, re-estimated and kept only if it fits.

Candidates are ordered by what they cost the user: first those that leave the results unchanged (checkpointing,
smaller micro-batches with more accumulation, ZeRO sharding), then those that slow training (offload), then
those that change what is learnt (8-bit optimizer, quantized base, shorter sequences), then new hardware.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

from .gpus import GPU, KNOWN_GPUS
from .model import estimate_memory
from .scenario import Scenario


@dataclass(frozen=True)
class Suggestion:
    """One change (or a combination) and its re-estimated per-GPU need."""

    change: str  # what to do, in words
    overrides: tuple[str, ...]  # config keys to set (key=value), usable as `loraforge train` overrides
    cost: str  # what it costs
    needed_gib: float  # re-estimated total per GPU
    fits: bool

    def line(self) -> str:
        """One line for the terminal."""
        keys = f"  [{' '.join(self.overrides)}]" if self.overrides else ""
        return f"{self.change}: needs {self.needed_gib:.1f} GiB ({self.cost}){keys}"

    def to_dict(self) -> dict:
        """JSON form."""
        return {"change": self.change, "overrides": list(self.overrides), "cost": self.cost,
                "needed_gib": round(self.needed_gib, 2), "fits": self.fits}


Candidate = tuple[str, tuple[str, ...], str, Scenario]


def _fits(s: Scenario, gpu_gib: float) -> tuple[bool, float]:
    need = estimate_memory(s).total / 2**30
    return need <= gpu_gib, need


def _micro_batches(s: Scenario, gpu_gib: float) -> Iterator[Candidate]:
    """The largest smaller micro-batch that fits, with accumulation raised to keep the effective batch."""
    effective = s.batch_size * s.grad_accum
    for b in range(s.batch_size - 1, 0, -1):
        if effective % b:
            continue
        t = replace(s, batch_size=b, grad_accum=effective // b)
        if _fits(t, gpu_gib)[0] or b == 1:
            yield (f"micro-batch {b} with gradient accumulation {t.grad_accum} (same effective batch "
                   f"{effective})", (f"per_device_train_batch_size={b}", f"gradient_accumulation_steps={t.grad_accum}"),
                   "slower steps, same results", t)
            return


def _shorter_sequences(s: Scenario, gpu_gib: float) -> Iterator[Candidate]:
    length = s.seq_len
    while length > 256:
        length //= 2
        t = replace(s, seq_len=length)
        if _fits(t, gpu_gib)[0]:
            yield (f"cutoff_len {length}", (f"cutoff_len={length}",), "longer examples are truncated", t)
            return


def _under_deepspeed(s: Scenario, **changes) -> Scenario:
    """``s`` under DeepSpeed: the fast path's modules give way to the standard decoder; its loss stays."""
    return replace(s, fast_path=False, fused_loss=s.fused_loss or s.fast_path, **changes)


def _zero(s: Scenario, gpu_gib: float) -> Iterator[Candidate]:
    if s.num_gpus < 2:
        return
    if s.zero_stage < 3:
        for stage in (2, 3):
            if stage > s.zero_stage:
                t = _under_deepspeed(s, zero_stage=stage)
                yield (f"DeepSpeed ZeRO-{stage} across the {s.num_gpus} GPUs", (f"deepspeed=z{stage}",),
                       "more communication, same results", t)
    if not s.offload_optimizer and s.zero_stage <= 2:
        t = _under_deepspeed(s, zero_stage=2, offload_optimizer=True)
        yield ("DeepSpeed ZeRO-2 with optimizer offload to CPU", ("deepspeed=z2_offload",),
               "slower steps, more host RAM", t)
    if not s.offload_params:
        t = _under_deepspeed(s, zero_stage=3, offload_optimizer=True, offload_params=True)
        yield ("DeepSpeed ZeRO-3 with parameter and optimizer offload to CPU", ("deepspeed=z3_offload",),
               "much slower steps, much more host RAM", t)


def _method(s: Scenario, gpu_gib: float) -> Iterator[Candidate]:
    if s.method in ("full", "freeze"):
        yield ("LoRA instead of " + s.method, ("finetuning_type=lora",), "fewer trainable parameters",
               replace(s, method="lora"))
    if s.method in ("full", "freeze", "lora"):
        yield ("QLoRA 8-bit base", ("finetuning_type=lora", "quantization_bit=8"), "quantized base, slower",
               replace(s, method="qlora-8"))
    if s.method != "qlora-4":
        yield ("QLoRA 4-bit base", ("finetuning_type=lora", "quantization_bit=4"), "quantized base",
               replace(s, method="qlora-4"))


def _optimizer(s: Scenario, gpu_gib: float) -> Iterator[Candidate]:
    if s.method in ("full", "freeze") and s.optim not in ("adamw_8bit", "paged_adamw_8bit", "adafactor"):
        yield ("8-bit AdamW", ("optim=adamw_8bit",), "8-bit optimizer states", replace(s, optim="adamw_8bit"))


def _checkpointing(s: Scenario, gpu_gib: float) -> Iterator[Candidate]:
    if not s.gradient_checkpointing:
        yield ("gradient checkpointing on", ("disable_gradient_checkpointing=false",), "about 30% slower steps",
               replace(s, gradient_checkpointing=True))


def _fast_path(s: Scenario, gpu_gib: float) -> Iterator[Candidate]:
    """The fast path where it was turned off (or DeepSpeed kept it out) and the model and method are covered."""
    from .scenario import FAST_PATH_FAMILIES

    covered = (s.method in ("lora", "qlora-4", "qlora-8") and s.arch.model_type in FAST_PATH_FAMILIES
               and not s.upcast_norms)
    if s.fast_path or not covered:
        return
    if s.zero_stage == 0:
        yield ("the fast path (fast_path: auto)", ("fast_path=auto",), "none: the same training, faster",
               replace(s, fast_path=True, fused_loss=True))
    elif s.num_gpus > 1 or s.zero_stage:
        yield ("plain DDP on the fast path instead of DeepSpeed", ("deepspeed=null", "fast_path=auto"),
               "none: the same training, faster; each GPU holds the whole 4-bit model",
               replace(s, zero_stage=0, offload_optimizer=False, offload_params=False, fast_path=True,
                       fused_loss=True))


# cheapest first
GENERATORS: tuple[Callable[[Scenario, float], Iterator[Candidate]], ...] = (
    _fast_path, _checkpointing, _micro_batches, _zero, _optimizer, _method, _shorter_sequences)


def suggest(s: Scenario, gpu: GPU, *, limit: int = 4) -> list[Suggestion]:
    """Up to ``limit`` single changes that make ``s`` fit on ``gpu`` (cheapest first); when none does, the
    cheapest combination found greedily; and the smallest known GPU that holds the run as it is."""
    found: list[Suggestion] = []
    for generate in GENERATORS:
        for change, overrides, cost, variant in generate(s, gpu.memory_gib):
            ok, need = _fits(variant, gpu.memory_gib)
            if ok and all(f.change != change for f in found):
                found.append(Suggestion(change, overrides, cost, need, True))
    found = found[:limit]
    if not found:
        combo = _greedy(s, gpu)
        if combo is not None:
            found.append(combo)
    bigger = smallest_gpu_that_fits(s)
    if bigger is not None and bigger.memory_gib > gpu.memory_gib:
        need = estimate_memory(s).total / 2**30
        found.append(Suggestion(f"a GPU with more memory, e.g. {bigger.name} ({bigger.memory_gib:g} GiB)", (),
                                "new hardware", need, True))
    return found


def _greedy(s: Scenario, gpu: GPU) -> Suggestion | None:
    """Apply the candidates cumulatively, cheapest first, until the run fits."""
    current, changes, keys, costs = s, [], [], []
    for generate in GENERATORS:
        options = list(generate(current, gpu.memory_gib))
        if not options:
            continue
        # within a family take the strongest option (the last one) unless an earlier one already fits
        pick = next((o for o in options if _fits(o[3], gpu.memory_gib)[0]), options[-1])
        change, overrides, cost, current = pick
        changes.append(change)
        keys.extend(overrides)
        costs.append(cost)
        ok, need = _fits(current, gpu.memory_gib)
        if ok:
            merged = {k.split("=")[0]: k for k in keys}
            return Suggestion(" + ".join(changes), tuple(merged.values()), "; ".join(costs), need, True)
    return None


def smallest_gpu_that_fits(s: Scenario) -> GPU | None:
    """The known GPU with the least memory on which ``s`` fits as it is."""
    need = estimate_memory(s).total / 2**30
    for gpu in sorted(KNOWN_GPUS.values(), key=lambda g: g.memory_gib):
        if need <= gpu.memory_gib:
            return gpu
    return None
