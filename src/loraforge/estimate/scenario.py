"""What is estimated: the model shapes plus every setting that changes memory, read from a run config.

A :class:`Scenario` is a plain value; ``dataclasses.replace`` makes the variants that the advice re-estimates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .architectures import LINEAR_NAMES, Architecture, resolve_architecture

if TYPE_CHECKING:
    from ..config import RunConfig

METHODS = ("full", "freeze", "lora", "qlora-8", "qlora-4")
PRECISIONS = ("bf16", "fp16", "fp32", "pure_bf16")


@dataclass(frozen=True)
class OptimizerSpec:
    """Bytes of state per trainable parameter, and of the temporary the step allocates (foreach AdamW)."""

    states: int  # number of full-size state tensors (Adam: 2)
    bytes_per_state: float | None  # None: the parameter's own dtype
    temp_states: int  # full-size temporaries during the step
    paged: bool = False  # states in CUDA managed memory: pageable to host RAM, not counted as allocated


#: ``optim``'s default in loraforge's config (``config.training.DEFAULT_OPTIM``; kept here too, because the estimator
#: does not import transformers; a test holds the two equal)
DEFAULT_OPTIM = "adamw_torch_fused"

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw_torch": OptimizerSpec(2, None, 1),
    "adamw_torch_fused": OptimizerSpec(2, None, 0),
    "adamw_apex_fused": OptimizerSpec(2, None, 0),
    "adamw_8bit": OptimizerSpec(2, 1.016, 0),
    "adamw_bnb_8bit": OptimizerSpec(2, 1.016, 0),
    "paged_adamw_8bit": OptimizerSpec(2, 1.016, 0, paged=True),
    "paged_adamw_32bit": OptimizerSpec(2, 4, 0, paged=True),
    "paged_adamw": OptimizerSpec(2, 4, 0, paged=True),
    "lion_8bit": OptimizerSpec(1, 1.016, 0),
    "lion_32bit": OptimizerSpec(1, 4, 0),
    "paged_lion_8bit": OptimizerSpec(1, 1.016, 0, paged=True),
    "adafactor": OptimizerSpec(0, None, 0),
    "sgd": OptimizerSpec(0, None, 0),
    "adagrad": OptimizerSpec(1, None, 0),
    "rmsprop": OptimizerSpec(1, None, 1),
}
OPTIM_SHORT = {"adamw": "adamw_torch", "adamw-fused": "adamw_torch_fused", "adamw-8bit": "adamw_8bit",
               "8bit": "adamw_8bit", "paged": "paged_adamw_8bit", "paged-adamw-8bit": "paged_adamw_8bit",
               "paged-adamw-32bit": "paged_adamw_32bit", "paged-8bit": "paged_adamw_8bit",
               "paged-32bit": "paged_adamw_32bit"}

# DeepSpeed short names shipped with loraforge -> (stage, offload optimizer, offload params).
DEEPSPEED_PRESETS = {"z0": (0, False, False), "z2": (2, False, False), "z2_offload": (2, True, False),
                     "z3": (3, False, False), "z3_offload": (3, True, True)}


def optimizer_spec(name: str) -> OptimizerSpec:
    """The state layout of a transformers ``optim`` name (or a short name such as ``adamw-8bit``)."""
    key = OPTIM_SHORT.get(name.lower(), name.lower())
    if key in OPTIMIZERS:
        return OPTIMIZERS[key]
    raise ConfigError([f"optimizer {name!r} is not known to the estimator; use one of "
                       f"{', '.join(sorted(set(OPTIMIZERS) | set(OPTIM_SHORT)))}"])


@dataclass(frozen=True)
class Scenario:
    """Everything the memory of one training step depends on. Sizes are per GPU (per process)."""

    arch: Architecture
    method: str = "lora"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LINEAR_NAMES
    freeze_layers: int = 2
    batch_size: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    gradient_checkpointing: bool = True
    optim: str = DEFAULT_OPTIM
    precision: str = "bf16"
    num_gpus: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    double_quant: bool = True
    upcast_norms: bool | None = None  # None: what loraforge's loader does (QLoRA keeps norms in fp32)
    fast_path: bool = False  # loraforge's fast path (16-bit norms, chunked loss, checkpoints in host memory)
    fused_loss: bool = False  # the chunked loss alone (DeepSpeed keeps the standard decoder, not the loss)
    kept_layers: int = 0  # with checkpointing: the last layers that keep their activations (checkpoint_layers)
    checkpoint_auto: bool = False  # checkpoint_layers: auto (kept_layers follows the GPU of the estimate)
    int8_outlier_fraction: float = 0.01  # share of LLM.int8 input columns kept in 16/32 bits

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for name in ("lora_rank", "batch_size", "seq_len", "grad_accum", "num_gpus"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.kept_layers <= self.arch.num_layers:
            problems.append(f"layers that keep their activations must be 0 to {self.arch.num_layers}, "
                            f"got {self.kept_layers}")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"DeepSpeed ZeRO stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            problems.append("offloading parameters needs ZeRO stage 3 (--zero 3)")
        if self.offload_optimizer and self.zero_stage == 0:
            problems.append("offloading the optimizer needs ZeRO stage 1, 2 or 3 (--zero 2)")
        unknown = [t for t in self.lora_targets if t not in LINEAR_NAMES]
        if unknown:
            problems.append(f"LoRA targets {', '.join(unknown)} are not linear layers of a decoder block "
                            f"({', '.join(LINEAR_NAMES)}, or all)")
        if problems:
            raise ConfigError(problems)
        optimizer_spec(self.optim)

    @property
    def quant_bits(self) -> int | None:
        """4 or 8 for QLoRA, else None."""
        return int(self.method[-1]) if self.method.startswith("qlora") else None

    @property
    def uses_lora(self) -> bool:
        """LoRA adapters are trained (lora, qlora-8, qlora-4)."""
        return self.method in ("lora", "qlora-8", "qlora-4")

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch on one GPU."""
        return self.batch_size * self.seq_len

    def method_label(self) -> str:
        """Human description of the method, e.g. 'QLoRA 4-bit (nf4, double quant) r=8 on 7 modules'."""
        targets = "all linear layers" if set(self.lora_targets) == set(LINEAR_NAMES) else ",".join(self.lora_targets)
        if self.method == "full":
            return "full fine-tuning"
        if self.method == "freeze":
            return f"freeze tuning (last {self.freeze_layers} layers trained)"
        base = {"lora": "LoRA (16-bit base)", "qlora-8": "QLoRA 8-bit (LLM.int8)",
                "qlora-4": "QLoRA 4-bit (nf4" + (", double quant)" if self.double_quant else ")")}[self.method]
        return f"{base}, r={self.lora_rank} on {targets}"


def _deepspeed_settings(value: Any, source: str | None) -> tuple[int, bool, bool]:
    if value is None or value is False:
        return 0, False, False
    if isinstance(value, str) and value in DEEPSPEED_PRESETS:
        return DEEPSPEED_PRESETS[value]
    if isinstance(value, str):
        path = Path(value)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError([f"`deepspeed: {path}` cannot be read as JSON ({err}); give a DeepSpeed JSON file "
                               f"or a short name ({', '.join(DEEPSPEED_PRESETS)})"], source=source) from None
    if not isinstance(value, dict):
        raise ConfigError([f"`deepspeed` must be a JSON file, a short name or a mapping, got {value!r}"], source=source)
    zero = value.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))

    def _on_cpu(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

    return stage, _on_cpu("offload_optimizer"), _on_cpu("offload_param")


# the families loraforge.models.fast covers (kept here: the estimator reads no model code)
FAST_PATH_FAMILIES = ("qwen2", "qwen3", "llama", "mistral")


def scenario_from_config(cfg: "RunConfig", *, num_gpus: int | None = None) -> Scenario:
    """The scenario that ``loraforge train`` would run with this config (HF keys read from ``cfg.explicit``)."""
    m, f, d, x = cfg.model, cfg.finetuning, cfg.data, cfg.explicit
    if not m.model_name_or_path:
        raise ConfigError(["`model_name_or_path` is required to estimate memory"], source=cfg.source)
    arch = resolve_architecture(m.model_name_or_path)
    if f.finetuning_type == "lora" and m.quantization_bit in (4, 8):
        method = f"qlora-{m.quantization_bit}"
    else:
        method = f.finetuning_type
    targets = tuple(t.strip() for t in f.lora_target.split(",") if t.strip())
    if not targets or targets == ("all",):
        targets = LINEAR_NAMES
    if x.get("bf16"):
        precision = "pure_bf16" if f.pure_bf16 else "bf16"
    elif x.get("fp16"):
        precision = "fp16"
    else:
        precision = "pure_bf16" if f.pure_bf16 else "fp32"
    gc = x.get("gradient_checkpointing")
    checkpointing = bool(gc) if gc is not None else not m.disable_gradient_checkpointing
    stage, off_opt, off_par = _deepspeed_settings(x.get("deepspeed"), cfg.source)
    gpus = num_gpus or int(x.get("nproc_per_node") or 1)
    covered = (f.fast_path != "off" and method in ("lora", "qlora-4", "qlora-8") and not f.use_dora
               and not f.pissa_init and not x.get("fsdp") and not m.upcast_layernorm
               and arch.model_type in FAST_PATH_FAMILIES)
    fast = covered and stage == 0
    return Scenario(
        arch=arch, method=method, lora_rank=f.lora_rank, lora_targets=targets,
        freeze_layers=abs(f.freeze_trainable_layers), batch_size=int(x.get("per_device_train_batch_size", 8)),
        seq_len=d.cutoff_len, grad_accum=int(x.get("gradient_accumulation_steps", 1)),
        gradient_checkpointing=checkpointing, optim=str(x.get("optim", DEFAULT_OPTIM)), precision=precision,
        num_gpus=gpus, zero_stage=stage, offload_optimizer=off_opt, offload_params=off_par,
        double_quant=m.double_quantization, upcast_norms=True if m.upcast_layernorm else None, fast_path=fast,
        fused_loss=covered, kept_layers=_kept_layers(m, arch.num_layers, checkpointing),
        checkpoint_auto=checkpointing and str(m.checkpoint_layers).strip().lower() == "auto")


def _kept_layers(m: Any, layers: int, checkpointing: bool) -> int:
    """``checkpoint_layers: N`` as the number of last layers that keep their activations (``auto`` is decided at
    train time from the free memory, so it is estimated as ``all``)."""
    from ..config.model import checkpoint_layers_setting

    setting = checkpoint_layers_setting(m.checkpoint_layers)
    if not checkpointing or not isinstance(setting, int):
        return 0
    return max(layers - min(setting, layers), 0)
