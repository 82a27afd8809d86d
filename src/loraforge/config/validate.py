"""Cross-field checks that run before any model is loaded. Each problem names the keys as the user typed them."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .training import DEEPSPEED_SHORT_NAMES, TrainingArguments

if TYPE_CHECKING:
    from .parser import RunConfig

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("smollm2-135m-instruct", "tiny-random-qwen3")
SUPPORTED_STAGES = ("sft", "pt")


def _known_template(name: str) -> tuple[bool, list[str]]:
    try:
        from ..data.templates import template_names
    except ImportError:  # the data package is not importable: leave the check to run time
        return True, []
    names = list(template_names())
    return name in names, names


def check(cfg: "RunConfig", training: dict[str, Any], purpose: str, *, environment: bool = True) -> list[str]:
    """Return every cross-field problem of ``cfg`` for ``purpose``; empty when the config is usable.

    ``environment=False`` checks the config alone, not whether this machine can run it (GPUs, DeepSpeed).
    """
    p: list[str] = []
    m, d, f, g, e = cfg.model, cfg.data, cfg.finetuning, cfg.generation, cfg.export
    if not m.model_name_or_path:
        p.append("`model_name_or_path` is required: a local folder, a hub id, or a built-in name "
                 f"({', '.join(BUILTIN_MODELS)})")
    # fine-tuning method
    if purpose == "train" and f.stage not in SUPPORTED_STAGES:
        p.append(f"`stage: {f.stage}` is not supported yet; loraforge trains `sft` and `pt`")
    if m.quantization_bit is not None and f.finetuning_type != "lora":
        p.append(f"`quantization_bit: {m.quantization_bit}` needs `finetuning_type: lora` (QLoRA), "
                 f"got `finetuning_type: {f.finetuning_type}`; quantized weights cannot be trained directly")
    if f.lora_rank <= 0:
        p.append(f"`lora_rank` must be a positive integer, got {f.lora_rank}")
    if f.lora_alpha is not None and f.lora_alpha <= 0:
        p.append(f"`lora_alpha` must be positive, got {f.lora_alpha}")
    if not 0.0 <= f.lora_dropout < 1.0:
        p.append(f"`lora_dropout` must be in [0, 1), got {f.lora_dropout}")
    if f.pissa_init and m.quantization_bit is not None:
        p.append("`pissa_init: true` cannot initialise from a quantized base (`quantization_bit`); "
                 "train PiSSA in 16 bits or drop pissa_init")
    if f.use_dora and f.pissa_init:
        p.append("`use_dora` and `pissa_init` cannot be combined; choose one")
    if f.loraplus_lr_ratio is not None and f.loraplus_lr_ratio <= 0:
        p.append(f"`loraplus_lr_ratio` must be positive, got {f.loraplus_lr_ratio}")
    if f.finetuning_type == "freeze" and f.freeze_trainable_layers == 0:
        p.append("`freeze_trainable_layers: 0` trains nothing; use a positive (last N) or negative (first N) count")
    if f.create_new_adapter and not m.adapter_name_or_path:
        p.append("`create_new_adapter: true` needs `adapter_name_or_path` (the adapter to build on)")
    if m.adapter_name_or_path and f.finetuning_type != "lora":
        p.append(f"`adapter_name_or_path` needs `finetuning_type: lora`, got `{f.finetuning_type}`")
    # precision
    fp16 = bool(training.get("fp16", False))
    bf16 = bool(training.get("bf16", False))
    if fp16 and bf16:
        p.append("`fp16: true` and `bf16: true` are both set; choose one (bf16 on Ampere or newer, fp16 on T4/V100)")
    if f.pure_bf16 and fp16:
        p.append("`pure_bf16: true` cannot be combined with `fp16: true`")
    # gradient checkpointing: HF's key and LLaMA-Factory's negative one must agree
    gc = training.get("gradient_checkpointing")
    if gc is True and m.disable_gradient_checkpointing:
        p.append("`gradient_checkpointing: true` and `disable_gradient_checkpointing: true` contradict each other")
    # data
    if d.cutoff_len <= 0:
        p.append(f"`cutoff_len` must be positive, got {d.cutoff_len}")
    if d.val_size < 0:
        p.append(f"`val_size` must be a share in (0, 1) or a count >= 1, got {d.val_size}")
    if d.val_size > 0 and d.eval_dataset:
        p.append("`val_size` and `eval_dataset` are both set; use one way to get evaluation data")
    if d.val_size >= 1 and not float(d.val_size).is_integer():
        p.append(f"`val_size: {d.val_size}` is above 1 so it is read as a count, and must be a whole number")
    if d.max_samples is not None and d.max_samples <= 0:
        p.append(f"`max_samples` must be positive, got {d.max_samples}")
    if not 0.0 <= d.max_bad_ratio <= 1.0:
        p.append(f"`max_bad_ratio` must be between 0 and 1, got {d.max_bad_ratio}")
    if d.interleave_probs and d.mix_strategy == "concat":
        p.append("`interleave_probs` needs `mix_strategy: interleave_under` or `interleave_over`")
    if d.template and d.prompt_template:
        p.append("`template` and `prompt_template` are both set; a plain-text prompt_template replaces the chat "
                 "template, so keep one")
    if d.template and not d.template.endswith((".yaml", ".yml")):
        ok, names = _known_template(d.template)
        if not ok:
            import difflib
            close = difflib.get_close_matches(d.template, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(names))}"
            p.append(f"unknown `template: {d.template}`{hint}")
    if purpose == "train":
        if training.get("do_train", True) is not False and not d.dataset:
            p.append("`dataset` is required for training: name(s) registered in "
                     f"{os.path.join(d.dataset_dir, 'dataset_info.json')}")
        eval_strategy = str(training.get("eval_strategy", "no"))
        if eval_strategy != "no" and not (d.val_size > 0 or d.eval_dataset):
            p.append(f"`eval_strategy: {eval_strategy}` needs evaluation data: set `val_size` or `eval_dataset`")
        sampling = training.get("train_sampling_strategy", "random")
        if f.disable_shuffling and sampling not in ("random", "sequential"):
            p.append(f"`disable_shuffling: true` and `train_sampling_strategy: {sampling}` contradict each other; "
                     "keep one")
        if training.get("load_best_model_at_end") and eval_strategy == "no":
            p.append("`load_best_model_at_end: true` needs an `eval_strategy`")
        max_steps = training.get("max_steps", -1)
        epochs = training.get("num_train_epochs", 3.0)
        if (max_steps is None or max_steps <= 0) and epochs is not None and epochs <= 0:
            p.append("set `num_train_epochs` > 0 or `max_steps` > 0")
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if key in training and training[key] is not None and training[key] <= 0:
                p.append(f"`{key}` must be positive, got {training[key]}")
        lr = training.get("learning_rate")
        if lr is not None and lr <= 0:
            p.append(f"`learning_rate` must be positive, got {lr}")
        if (training.get("save_strategy", "steps") == "steps"
                and training.get("save_steps", 500) is not None and training.get("save_steps", 500) <= 0):
            p.append("`save_steps` must be positive with `save_strategy: steps`")
        ds = training.get("deepspeed")
        if isinstance(ds, str) and ds not in DEEPSPEED_SHORT_NAMES and not Path(ds).is_file():
            p.append(f"`deepspeed: {ds}` is neither a JSON file nor a short name ({', '.join(DEEPSPEED_SHORT_NAMES)})")
        from ..train.distributed import distributed_problems  # multi-GPU setups refused before launch

        p += distributed_problems(cfg, training, environment=environment)  # environment: GPUs, DeepSpeed installed
        resume = training.get("resume_from_checkpoint")
        if isinstance(resume, str) and resume.lower() not in ("true", "last") and not Path(resume).is_dir():
            p.append(f"`resume_from_checkpoint: {resume}` is not a folder; give a checkpoint folder, or `true` "
                     "for the newest checkpoint in output_dir")
    if purpose in ("predict", "eval") and not (d.eval_dataset or d.dataset):
        p.append(f"`eval_dataset` (or `dataset` with `val_size`) is required for {purpose}")
    if purpose == "export" and not e.export_dir:
        p.append("`export_dir` is required for export")
    if g.max_new_tokens <= 0 and g.max_length <= 0:
        p.append(f"`max_new_tokens: {g.max_new_tokens}` asks for `max_length` to bound generation, but it is "
                 f"{g.max_length}; set a positive max_new_tokens (or max_length)")
    elif g.max_new_tokens > 0 and "max_length" in cfg.explicit:  # LLaMA-Factory: max_new_tokens wins
        cfg.notes.append(f"`max_length` is not used because `max_new_tokens: {g.max_new_tokens}` is positive; set "
                         "`max_new_tokens: 0` to cap prompt + answer at max_length")
    if g.do_sample and g.temperature <= 0:
        p.append("`do_sample: true` needs `temperature` > 0; use `do_sample: false` for greedy decoding")
    return p


def resolve_deepspeed(value: str | dict | None) -> str | dict | None:
    """Turn a short name (z2, z3_offload, ...) into the path of the JSON shipped with loraforge."""
    if isinstance(value, str) and value in DEEPSPEED_SHORT_NAMES:
        from importlib import resources

        return str(resources.files("loraforge") / "resources" / "deepspeed" / f"{value}.json")
    return value


def adjust_training_values(cfg: "RunConfig", values: dict[str, Any]) -> dict[str, Any]:
    """Fill loraforge defaults into the HF training values and adapt them to the machine (e.g. no GPU)."""
    import torch

    values.setdefault("output_dir", "saves/run")
    values.setdefault("report_to", "none")
    values.setdefault("logging_steps", 10)
    values.setdefault("include_num_input_tokens_seen", "non_padding")  # tokens seen and tokens/s in the log
    if cfg.purpose == "train":
        values.setdefault("do_train", True)
    # Gradient checkpointing is applied by loraforge's model loader (so it works with QLoRA and adapters);
    # the Trainer must not apply it a second time.
    for key in ("gradient_checkpointing", "activation_checkpointing"):
        if values.pop(key, None) is False:
            cfg.model.disable_gradient_checkpointing = True
    # transformers >= 5.2x renamed gradient_checkpointing to activation_checkpointing; set whichever exists
    hf_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    values["activation_checkpointing" if "activation_checkpointing" in hf_fields else "gradient_checkpointing"] = False
    if "deepspeed" in values:
        values["deepspeed"] = resolve_deepspeed(values["deepspeed"])
    if cfg.finetuning.disable_shuffling:  # LLaMA-Factory's key for transformers' sequential train sampler
        values["train_sampling_strategy"] = "sequential"
    if not torch.cuda.is_available():
        for key in ("fp16", "bf16"):
            if values.get(key):
                cfg.notes.append(f"no CUDA GPU: `{key}: true` turned off, training runs in fp32 on the CPU")
                values[key] = False
        if values.get("optim", "adamw_torch") in ("adamw_torch_fused",):
            values["optim"] = "adamw_torch"
        values["use_cpu"] = True
    values.setdefault("remove_unused_columns", False)
    values.setdefault("label_names", ["labels"])
    return values
