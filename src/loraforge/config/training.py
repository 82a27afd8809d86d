"""Training group: the Hugging Face training arguments, plus LLaMA-Factory keys that transformers 5 dropped."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from transformers import Seq2SeqTrainingArguments

from ._field import arg

if TYPE_CHECKING:
    from .parser import RunConfig

# DeepSpeed short names resolve to JSON files shipped in examples/deepspeed/ (and in the package).
DEEPSPEED_SHORT_NAMES = ("z0", "z2", "z2_offload", "z3", "z3_offload")


#: transformers' own default on torch 2.8+ (and so LLaMA-Factory's); fused AdamW runs on CUDA and on the CPU
DEFAULT_OPTIM = "adamw_torch_fused"


@dataclass
class TrainingArguments(Seq2SeqTrainingArguments):
    """Hugging Face ``Seq2SeqTrainingArguments`` with loraforge defaults and LLaMA-Factory's legacy keys.

    ``warmup_ratio`` and ``overwrite_output_dir`` were removed from transformers 5; LLaMA-Factory YAMLs still
    carry them, so they are declared here (``save_safetensors`` and ``logging_dir`` are in ``compat.NEUTRAL_KEYS``).
    """

    output_dir: Optional[str] = arg("saves/run", "Where the adapter/model, logs, plots and checkpoints are written.")
    optim: str = arg(DEFAULT_OPTIM, "Optimizer: adamw_torch_fused (the default, as in transformers on torch 2.8+: "
                     "torch's AdamW in one fused kernel, which also lets the non-finite guard skip a step without a "
                     "host sync), adamw_torch (the same AdamW, foreach kernels), adamw_8bit, paged_adamw_8bit, "
                     "paged_adamw_32bit, sgd, adafactor, ... (any transformers OptimizerNames value).")
    overwrite_output_dir: bool = arg(False, "Start over in an output_dir that already holds checkpoints "
                                     "(otherwise loraforge stops, or resumes when resume_from_checkpoint is set).")
    warmup_ratio: float = arg(0.0, "Share of total steps used for linear warmup (used when warmup_steps is 0).")
    resume_from_checkpoint: Optional[Union[bool, str]] = arg(
        None, "Resume from this checkpoint folder; `true` from the newest complete checkpoint in output_dir (an error "
        "when there is none); `auto` from it when there is one, else start fresh (restart a preempted job with the "
        "same command). A run that already finished is left as it is.")
    nproc_per_node: Optional[int] = arg(None, "Processes (GPUs) per node; >1 relaunches under torchrun.")
    fsdp: Optional[Union[bool, str]] = arg(None, "FSDP through accelerate: true (tuned by fsdp_config, e.g. "
                                           "examples/fsdp/fsdp1_qlora.json) or legacy options 'full_shard auto_wrap'.")

    def __post_init__(self):
        if self.warmup_ratio and not self.warmup_steps:
            # transformers 5 reads a float in [0, 1) as a ratio of total steps.
            self.warmup_steps = float(self.warmup_ratio)
        super().__post_init__()


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
        from .engines import resolve_deepspeed

        values["deepspeed"] = resolve_deepspeed(values["deepspeed"])
    if cfg.finetuning.disable_shuffling:  # LLaMA-Factory's key for transformers' sequential train sampler
        values["train_sampling_strategy"] = "sequential"
    if not torch.cuda.is_available():
        for key in ("fp16", "bf16"):
            if values.get(key):
                cfg.notes.append(f"no CUDA GPU: `{key}: true` turned off, training runs in fp32 on the CPU")
                values[key] = False
        values["use_cpu"] = True
    values.setdefault("remove_unused_columns", False)
    values.setdefault("label_names", ["labels"])
    return values
