"""Cross-field checks that run before any model is loaded, one function per argument group.

Each problem names the keys as the user typed them and says what to change. Training values are the HF keys as
given, read through :func:`.engines.training_defaults` for the ones left out, so no Hugging Face default is
restated here. This module imports nothing above ``config/``: the known template names come in as an argument.
"""

from __future__ import annotations

import difflib
import os
from collections import ChainMap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping

from .engines import distributed_problems, resolve_deepspeed, training_defaults  # noqa: F401 - re-exported
from .finetuning import fp8_setting, micro_batch_tokens_setting
from .model import checkpoint_layers_setting
from .training import adjust_training_values  # noqa: F401 - re-exported for existing importers

if TYPE_CHECKING:
    from .data import DataArguments
    from .export import ExportArguments
    from .generation import GeneratingArguments
    from .parser import RunConfig

BUILTIN_MODELS = ("smollm2-135m-instruct", "tiny-random-qwen3")
SUPPORTED_STAGES = ("sft", "pt")


def check(cfg: "RunConfig", training: dict[str, Any], purpose: str, *, environment: bool = True,
          template_names: Collection[str] | None = None) -> list[str]:
    """Return every cross-field problem of ``cfg`` for ``purpose``; empty when the config is usable.

    ``environment=False`` checks the config alone, not whether this machine can run it (GPUs, DeepSpeed).
    ``template_names``: the registered chat templates; None leaves an unknown `template` to be reported when
    the template is resolved (data/), still before any weight loads.
    """
    hf = ChainMap(training, training_defaults())
    return (model_problems(cfg)
            + finetuning_problems(cfg, purpose)
            + data_problems(cfg.data, purpose, training, template_names)
            + training_problems(cfg, training, hf, purpose, environment=environment)
            + generation_problems(cfg.generation, cfg)
            + export_problems(cfg.export, purpose))


def model_problems(cfg: "RunConfig") -> list[str]:
    m = cfg.model
    if not m.model_name_or_path:
        return ["`model_name_or_path` is required: a local folder, a hub id, or a built-in name "
                f"({', '.join(BUILTIN_MODELS)})"]
    return []


def finetuning_problems(cfg: "RunConfig", purpose: str) -> list[str]:
    m, f = cfg.model, cfg.finetuning
    p: list[str] = []
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
    for check, value in ((micro_batch_tokens_setting, f.micro_batch_tokens), (fp8_setting, f.fp8)):
        try:
            check(value)
        except ValueError as err:
            p.append(str(err))
    if f.finetuning_type == "freeze" and f.freeze_trainable_layers == 0:
        p.append("`freeze_trainable_layers: 0` trains nothing; use a positive (last N) or negative (first N) count")
    if f.create_new_adapter and not m.adapter_name_or_path:
        p.append("`create_new_adapter: true` needs `adapter_name_or_path` (the adapter to build on)")
    if m.adapter_name_or_path and f.finetuning_type != "lora":
        p.append(f"`adapter_name_or_path` needs `finetuning_type: lora`, got `{f.finetuning_type}`")
    return p


def data_problems(d: "DataArguments", purpose: str, given: Mapping[str, Any],
                  template_names: Collection[str] | None) -> list[str]:
    """``given``: the training keys as the user wrote them."""
    p: list[str] = []
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
    if d.template and template_names is not None and not d.template.endswith((".yaml", ".yml")) \
            and d.template not in template_names:
        close = difflib.get_close_matches(d.template, list(template_names), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(template_names))}"
        p.append(f"unknown `template: {d.template}`{hint}")
    # loraforge trains unless told not to (HF's own default, do_train false, does not count here)
    if purpose == "train" and given.get("do_train", True) is not False and not d.dataset:
        p.append("`dataset` is required for training: name(s) registered in "
                 f"{os.path.join(d.dataset_dir, 'dataset_info.json')}")
    if purpose in ("predict", "eval") and not (d.eval_dataset or d.dataset):
        p.append(f"`eval_dataset` (or `dataset` with `val_size`) is required for {purpose}")
    return p


def _plain(value: Any) -> Any:
    """An enum default (IntervalStrategy.NO) as the string a user would write ("no")."""
    return getattr(value, "value", value)


def training_problems(cfg: "RunConfig", given: Mapping[str, Any], hf: Mapping[str, Any], purpose: str, *,
                      environment: bool) -> list[str]:
    """Precision and checkpointing always; the rest (schedule, evaluation, engines, resume) when training."""
    d, f = cfg.data, cfg.finetuning
    p: list[str] = []
    if hf["fp16"] and hf["bf16"]:
        p.append("`fp16: true` and `bf16: true` are both set; choose one (bf16 on Ampere or newer, fp16 on T4/V100)")
    if f.pure_bf16 and hf["fp16"]:
        p.append("`pure_bf16: true` cannot be combined with `fp16: true`")
    # HF's key and LLaMA-Factory's negative one must agree
    if given.get("gradient_checkpointing") is True and cfg.model.disable_gradient_checkpointing:
        p.append("`gradient_checkpointing: true` and `disable_gradient_checkpointing: true` contradict each other")
    try:
        layers = checkpoint_layers_setting(cfg.model.checkpoint_layers)
    except ValueError as err:
        p.append(str(err))
    else:
        if layers != "all" and cfg.model.disable_gradient_checkpointing:
            p.append(f"`checkpoint_layers: {layers}` chooses layers to checkpoint, but gradient checkpointing is off "
                     "(`disable_gradient_checkpointing: true`); drop one of the two")
    if purpose != "train":
        return p
    eval_strategy = str(_plain(hf["eval_strategy"]))
    if eval_strategy != "no" and not (d.val_size > 0 or d.eval_dataset):
        p.append(f"`eval_strategy: {eval_strategy}` needs evaluation data: set `val_size` or `eval_dataset`")
    sampling = str(_plain(hf.get("train_sampling_strategy", "random")))
    if f.disable_shuffling and "train_sampling_strategy" not in hf:  # added in transformers 5.x (2026)
        p.append("`disable_shuffling: true` needs a transformers whose TrainingArguments has "
                 "`train_sampling_strategy`; upgrade it: pip install -U transformers")
    elif f.disable_shuffling and sampling not in ("random", "sequential"):
        p.append(f"`disable_shuffling: true` and `train_sampling_strategy: {sampling}` contradict each other; "
                 "keep one")
    if hf["load_best_model_at_end"] and eval_strategy == "no":
        p.append("`load_best_model_at_end: true` needs an `eval_strategy`")
    if d.eval_on_each_dataset and not d.eval_dataset:
        p.append("`eval_on_each_dataset: true` needs `eval_dataset` (the sets to evaluate one by one); a "
                 "`val_size` split is a single set")
    elif d.eval_on_each_dataset and hf["load_best_model_at_end"] and not given.get("metric_for_best_model"):
        p.append("`eval_on_each_dataset: true` reports eval_<name>_loss per dataset and no eval_loss, so "
                 "`load_best_model_at_end` needs `metric_for_best_model: eval_<name>_loss` naming one of them")
    max_steps, epochs = hf["max_steps"], hf["num_train_epochs"]
    if (max_steps is None or max_steps <= 0) and epochs is not None and epochs <= 0:
        p.append("set `num_train_epochs` > 0 or `max_steps` > 0")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if hf[key] is not None and hf[key] <= 0:
            p.append(f"`{key}` must be positive, got {hf[key]}")
    if hf["learning_rate"] is not None and hf["learning_rate"] <= 0:
        p.append(f"`learning_rate` must be positive, got {hf['learning_rate']}")
    if str(_plain(hf["save_strategy"])) == "steps" and hf["save_steps"] is not None and hf["save_steps"] <= 0:
        p.append("`save_steps` must be positive with `save_strategy: steps`")
    p += distributed_problems(cfg, given, environment=environment)  # DeepSpeed/FSDP refused before launch
    resume = hf["resume_from_checkpoint"]
    if isinstance(resume, str) and resume.lower() not in ("true", "last", "auto") and not Path(resume).is_dir():
        p.append(f"`resume_from_checkpoint: {resume}` is not a folder; give a checkpoint folder, `true` for the "
                 "newest checkpoint in output_dir, or `auto` to resume when there is one and start fresh otherwise")
    return p


def generation_problems(g: "GeneratingArguments", cfg: "RunConfig") -> list[str]:
    p: list[str] = []
    if g.max_new_tokens <= 0 and g.max_length <= 0:
        p.append(f"`max_new_tokens: {g.max_new_tokens}` asks for `max_length` to bound generation, but it is "
                 f"{g.max_length}; set a positive max_new_tokens (or max_length)")
    elif g.max_new_tokens > 0 and "max_length" in cfg.explicit:  # LLaMA-Factory: max_new_tokens wins
        cfg.notes.append(f"`max_length` is not used because `max_new_tokens: {g.max_new_tokens}` is positive; set "
                         "`max_new_tokens: 0` to cap prompt + answer at max_length")
    if g.do_sample and g.temperature <= 0:
        p.append("`do_sample: true` needs `temperature` > 0; use `do_sample: false` for greedy decoding")
    return p


def export_problems(e: "ExportArguments", purpose: str) -> list[str]:
    if purpose == "export" and not e.export_dir:
        return ["`export_dir` is required for export"]
    return []
