"""Training group: the Hugging Face training arguments, plus LLaMA-Factory keys that transformers 5 dropped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from transformers import Seq2SeqTrainingArguments

from ._field import arg

# DeepSpeed short names resolve to JSON files shipped in examples/deepspeed/ (and in the package).
DEEPSPEED_SHORT_NAMES = ("z0", "z2", "z2_offload", "z3", "z3_offload")


@dataclass
class TrainingArguments(Seq2SeqTrainingArguments):
    """Hugging Face ``Seq2SeqTrainingArguments`` with loraforge defaults and LLaMA-Factory's legacy keys.

    ``warmup_ratio`` and ``overwrite_output_dir`` were removed from transformers 5; LLaMA-Factory YAMLs still
    carry them, so they are declared here (``save_safetensors`` and ``logging_dir`` are in ``compat.NEUTRAL_KEYS``).
    """

    output_dir: Optional[str] = arg("saves/run", "Where the adapter/model, logs, plots and checkpoints are written.")
    optim: str = arg("adamw_torch", "Optimizer: adamw_torch, adamw_torch_fused, adamw_8bit, paged_adamw_8bit, "
                     "paged_adamw_32bit, sgd, adafactor, ... (any transformers OptimizerNames value).")
    overwrite_output_dir: bool = arg(False, "Start over in an output_dir that already holds checkpoints "
                                     "(otherwise loraforge stops, or resumes when resume_from_checkpoint is set).")
    warmup_ratio: float = arg(0.0, "Share of total steps used for linear warmup (used when warmup_steps is 0).")
    resume_from_checkpoint: Optional[Union[bool, str]] = arg(
        None, "Resume from this checkpoint folder, or `true` for the newest complete checkpoint in output_dir.")
    nproc_per_node: Optional[int] = arg(None, "Processes (GPUs) per node; >1 relaunches under torchrun.")
    fsdp: Optional[Union[bool, str]] = arg(None, "FSDP through accelerate: true (tuned by fsdp_config, e.g. "
                                           "examples/fsdp/fsdp1_qlora.json) or legacy options 'full_shard auto_wrap'.")

    def __post_init__(self):
        if self.warmup_ratio and not self.warmup_steps:
            # transformers 5 reads a float in [0, 1) as a ratio of total steps.
            self.warmup_steps = float(self.warmup_ratio)
        super().__post_init__()
