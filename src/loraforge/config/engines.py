"""DeepSpeed and FSDP settings checked with the rest of the config, before any process starts or weight loads.

A multi-GPU setup that cannot work (8-bit weights with ZeRO-3, FSDP2 with QLoRA, a DeepSpeed JSON that
contradicts the batch size, ...) fails in seconds with the reason, instead of after a 14B model has been loaded
on every GPU. The engines themselves run in train/ (torchrun relaunch, process groups); this module only reads
their configs, plus two facts about the machine (visible CUDA GPUs, DeepSpeed installed) that
``check_environment=False`` leaves out.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .training import DEEPSPEED_SHORT_NAMES, TrainingArguments

if TYPE_CHECKING:
    from .parser import RunConfig

INSTALL_DEEPSPEED = "pip install 'loraforge[deepspeed]'"
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload",
                "auto_wrap")
_OFF = {"", "false", "no", "off", "0", "none"}


def cuda_device_count() -> int:
    """CUDA GPUs visible to this process (honours CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def deepspeed_installed() -> bool:
    """True when the `deepspeed` package can be imported (it is an optional extra)."""
    return importlib.util.find_spec("deepspeed") is not None


def _inside_multiprocess_job() -> bool:
    """This process is one of several started by torchrun (which sets WORLD_SIZE)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@lru_cache(maxsize=1)
def training_defaults() -> dict[str, Any]:
    """The default of every training argument, read from the dataclass (never restated by hand)."""
    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def resolve_deepspeed(value: str | dict | None) -> str | dict | None:
    """Turn a short name (z2, z3_offload, ...) into the path of the JSON shipped with loraforge."""
    if isinstance(value, str) and value in DEEPSPEED_SHORT_NAMES:
        from importlib import resources

        return str(resources.files("loraforge") / "resources" / "deepspeed" / f"{value}.json")
    return value


def load_deepspeed_config(value: str | dict) -> tuple[dict | None, str | None]:
    """``(config, None)`` for a short name, a JSON path or an inline mapping; ``(None, problem)`` otherwise."""
    value = resolve_deepspeed(value)
    if isinstance(value, dict):
        return value, None
    path = Path(str(value))
    if not path.is_file():
        return None, None  # config validation already reports a missing file or unknown short name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return None, (f"`deepspeed: {value}` is not valid JSON (line {err.lineno}, column {err.colno}: "
                      f"{err.msg})")
    if not isinstance(data, dict):
        return None, f"`deepspeed: {value}` must hold a JSON object, got {type(data).__name__}"
    return data, None


def zero_stage(ds_config: Mapping[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config: 0 when absent, -1 when it is not a number."""
    zero = ds_config.get("zero_optimization") or {}
    try:
        return int(zero.get("stage", 0))
    except (TypeError, ValueError):
        return -1


def fsdp_enabled(value: Any) -> bool:
    """True when the ``fsdp`` key turns FSDP on (``full_shard auto_wrap``, a list of options, or true)."""
    if value is None or value is False:
        return False
    if isinstance(value, (list, tuple)):
        return bool(value)
    return str(value).strip().lower() not in _OFF


def _fsdp_config(value: Any) -> tuple[dict, str | None]:
    if value is None:
        return {}, None
    if isinstance(value, dict):
        data = value
    else:
        path = Path(str(value))
        if not path.is_file():
            return {}, f"`fsdp_config: {value}` is not a file; give a JSON file or a mapping"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            return {}, f"`fsdp_config: {value}` is not valid JSON (line {err.lineno}: {err.msg})"
    # accelerate-style names (fsdp_version, fsdp_state_dict_type) mean the same as the short ones
    return {(k[5:] if k.startswith("fsdp_") else k): v for k, v in data.items()}, None


def _value(training: Mapping[str, Any], name: str) -> Any:
    return training[name] if name in training else training_defaults()[name]


def _deepspeed_mismatches(ds: Mapping[str, Any], training: Mapping[str, Any]) -> list[str]:
    """Explicit (non-"auto") DeepSpeed values that contradict the config; the HF Trainer would stop on them later."""
    pairs = [
        (ds.get("train_micro_batch_size_per_gpu"), "train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
        (ds.get("gradient_accumulation_steps"), "gradient_accumulation_steps", "gradient_accumulation_steps"),
        (ds.get("gradient_clipping"), "gradient_clipping", "max_grad_norm"),
        ((ds.get("fp16") or {}).get("enabled"), "fp16.enabled", "fp16"),
        ((ds.get("bf16") or {}).get("enabled"), "bf16.enabled", "bf16"),
    ]
    out = []
    for ds_value, ds_key, key in pairs:
        if ds_value is None or ds_value == "auto":
            continue
        ours = _value(training, key)
        if isinstance(ours, bool) or isinstance(ds_value, bool):
            same = bool(ds_value) == bool(ours)
        else:
            try:
                same = float(ds_value) == float(ours)
            except (TypeError, ValueError):
                same = False
        if not same:
            out.append(f"the DeepSpeed config sets `{ds_key}: {json.dumps(ds_value)}` but the config has "
                       f"`{key}: {ours}`; set it to \"auto\" in the JSON (loraforge fills it in) or make them agree")
    return out


def _deepspeed_problems(cfg: "RunConfig", training: Mapping[str, Any], gpus: int | None) -> list[str]:
    value = training["deepspeed"]
    p: list[str] = []
    if gpus is not None and not deepspeed_installed():
        p.append(f"`deepspeed: {value if not isinstance(value, dict) else '{...}'}` needs the DeepSpeed package, "
                 f"which is not installed: {INSTALL_DEEPSPEED} (on a machine with CUDA GPUs)")
    if gpus == 0:
        p.append("DeepSpeed runs on CUDA GPUs and none is visible; drop `deepspeed` to train on the CPU "
                 "(several CPU processes: FORCE_TORCHRUN=1 nproc_per_node=2, which uses DDP with gloo)")
    ds, problem = load_deepspeed_config(value)
    if problem:
        return p + [problem]
    if ds is None:
        return p
    stage = zero_stage(ds)
    zero = ds.get("zero_optimization") or {}
    if stage not in (0, 1, 2, 3):
        return p + [f"the DeepSpeed config's `zero_optimization.stage` must be 0, 1, 2 or 3, got "
                    f"{zero.get('stage')!r}"]
    if zero.get("offload_param") and stage != 3:
        p.append(f"the DeepSpeed config offloads parameters (`offload_param`) with ZeRO stage {stage}; parameter "
                 "offload needs stage 3 (use `deepspeed: z3_offload`, or `z2_offload` to offload only the "
                 "optimizer)")
    if zero.get("offload_optimizer") and stage == 0:
        p.append("the DeepSpeed config offloads the optimizer with ZeRO stage 0; optimizer offload needs stage 1-3 "
                 "(use `deepspeed: z2_offload`)")
    bits = cfg.model.quantization_bit
    if stage == 3 and bits == 8:
        p.append("`quantization_bit: 8` cannot be combined with DeepSpeed ZeRO-3: bitsandbytes 8-bit weights "
                 "cannot be partitioned; use `quantization_bit: 4` (its weights are stored in the compute dtype "
                 "so ZeRO-3 can shard them) or ZeRO-2 (`deepspeed: z2`)")
    if stage == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is False:
        p.append("the DeepSpeed config sets `stage3_gather_16bit_weights_on_model_save: false`, so the saved "
                 "adapter/model would be empty (only DeepSpeed shards would be written); set it to true")
    p += _deepspeed_mismatches(ds, training)
    return p


def _fsdp_problems(cfg: "RunConfig", training: Mapping[str, Any], gpus: int | None) -> list[str]:
    value = training["fsdp"]
    p: list[str] = []
    items = value if isinstance(value, (list, tuple)) else str(value).split()
    if not (len(items) == 1 and str(items[0]).lower() == "true"):
        unknown = [str(i) for i in items if str(i) not in FSDP_OPTIONS]
        if unknown:
            p.append(f"`fsdp: {value}` has unknown option(s) {', '.join(unknown)}; use a space-separated list "
                     f"of {', '.join(FSDP_OPTIONS)} (e.g. `fsdp: full_shard auto_wrap`)")
    if gpus == 0:
        p.append("FSDP in loraforge runs on CUDA GPUs and none is visible; drop `fsdp` to train on the CPU "
                 "(several CPU processes: FORCE_TORCHRUN=1 nproc_per_node=2, which uses DDP with gloo)")
    fsdp_cfg, problem = _fsdp_config(training.get("fsdp_config"))
    if problem:
        return p + [problem]
    try:
        version = int(fsdp_cfg.get("version", 2))
    except (TypeError, ValueError):
        version = 0
    if version not in (1, 2):
        p.append(f"`fsdp_config.version` must be 1 or 2, got {fsdp_cfg.get('version')!r}")
    bits = cfg.model.quantization_bit
    if bits == 8:
        p.append("`quantization_bit: 8` cannot be combined with FSDP: bitsandbytes 8-bit weights cannot be "
                 "sharded; use `quantization_bit: 4` (FSDP-QLoRA stores the 4-bit weights in the compute dtype)")
    if bits == 4 and version == 2:
        p.append("FSDP-QLoRA needs FSDP1: FSDP2 (the default) gathers bitsandbytes 4-bit weights back as plain "
                 "tensors and loses their quantization state; set `fsdp_config: {version: 1}` (see "
                 "examples/fsdp/fsdp1_qlora.json) or use DeepSpeed ZeRO-3 (`deepspeed: z3`)")
    if bits == 4 and str(fsdp_cfg.get("cpu_ram_efficient_loading", "false")).lower() != "true":
        p.append("FSDP-QLoRA needs `fsdp_config.cpu_ram_efficient_loading: true`: only then does transformers load "
                 "the 4-bit weights in the compute dtype, unplaced, ready for FSDP to shard (see "
                 "examples/fsdp/fsdp1_qlora.json)")
    state_dict_type = str(fsdp_cfg.get("state_dict_type", "FULL_STATE_DICT")).upper()
    if "FULL_STATE_DICT" not in state_dict_type:
        p.append(f"`fsdp_config.state_dict_type: {fsdp_cfg.get('state_dict_type')}` would leave no usable "
                 "adapter/model in output_dir (the Trainer writes final weights only with FULL_STATE_DICT); "
                 "use FULL_STATE_DICT")
    orig = str(fsdp_cfg.get("use_orig_params", "true")).lower()
    if version == 1 and orig == "false" and cfg.finetuning.finetuning_type == "freeze":
        p.append("FSDP1 with `use_orig_params: false` cannot mix frozen and trainable weights in one wrapped "
                 "layer (`finetuning_type: freeze`); set `use_orig_params: true`")
    return p


def distributed_problems(cfg: "RunConfig", training: Mapping[str, Any], *, environment: bool = True) -> list[str]:
    """Every reason the multi-process setup in ``training`` (the HF keys as given) cannot work; empty when fine.

    Called by config validation (:mod:`.validate`) for ``purpose="train"``. ``environment=False`` checks the config alone and
    skips what depends on this machine (GPU count, DeepSpeed installed, FORCE_TORCHRUN); the launcher adds the
    checks on the launch variables (NNODES, MASTER_ADDR, ...).
    """
    p: list[str] = []
    ds = training.get("deepspeed")
    if isinstance(ds, str) and ds not in DEEPSPEED_SHORT_NAMES and not Path(ds).is_file():
        p.append(f"`deepspeed: {ds}` is neither a JSON file nor a short name ({', '.join(DEEPSPEED_SHORT_NAMES)})")
    ds_on = ds not in (None, "", {})
    fsdp_on = fsdp_enabled(training.get("fsdp"))
    if ds_on and fsdp_on:
        return p + ["`deepspeed` and `fsdp` are both set; they are two different sharding engines, choose one "
                "(DeepSpeed ZeRO-3 or FSDP both shard a QLoRA model)"]
    gpus = cuda_device_count() if environment else None
    if ds_on:
        p += _deepspeed_problems(cfg, training, gpus)
    if fsdp_on:
        p += _fsdp_problems(cfg, training, gpus)
    nproc = training.get("nproc_per_node")
    if nproc is not None and nproc <= 0:
        p.append(f"`nproc_per_node` must be a positive number of processes, got {nproc}")
    elif nproc is not None and gpus and nproc > gpus:
        p.append(f"`nproc_per_node: {nproc}` but only {gpus} GPU(s) are visible (CUDA_VISIBLE_DEVICES="
                 f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use at most {gpus}")
    several = nproc != 1 and ((nproc or 0) > 1 or (environment and (
        (nproc is None and bool(gpus and gpus > 1)) or _inside_multiprocess_job()
        or os.environ.get("FORCE_TORCHRUN", "").lower() in ("1", "true", "yes"))))
    if cfg.model.quantization_device_map == "auto" and (several or ds_on or fsdp_on):
        p.append("`quantization_device_map: auto` spreads one model over all GPUs inside one process and cannot be "
                 "combined with several training processes, DeepSpeed or FSDP; drop it, or set `nproc_per_node: 1` "
                 "to train one model split over the GPUs")
    backend = training.get("ddp_backend")
    if backend == "nccl" and gpus == 0:
        p.append("`ddp_backend: nccl` needs CUDA GPUs and none is visible; use `ddp_backend: gloo` on the CPU")
    timeout = training.get("ddp_timeout")
    if timeout is not None and timeout <= 0:
        p.append(f"`ddp_timeout` must be a positive number of seconds, got {timeout}")
    return p
