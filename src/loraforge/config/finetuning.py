"""Finetuning group: what is trained (LoRA, freeze, full) and how adapters are built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ._field import arg


@dataclass
class FinetuningArguments:
    stage: str = arg("sft", "Training stage: sft (supervised fine-tuning) or pt (plain-text continued pre-training).",
                     ("sft", "pt", "rm", "ppo", "dpo", "kto"))
    finetuning_type: str = arg("lora", "What is trained.", ("lora", "freeze", "full"))
    pure_bf16: bool = arg(False, "Keep the whole model in bf16 (no fp32 master weights).")
    plot_loss: bool = arg(False, "Write training_loss.png (raw and smoothed loss, eval loss).")
    compute_accuracy: bool = arg(False, "Report eval_accuracy: the share of label tokens the model predicts exactly.")
    disable_shuffling: bool = arg(False, "Train on the examples in dataset order (sequential sampler, no shuffling).")
    include_effective_tokens_per_second: bool = arg(
        False, "Add effective_tokens_per_sec (non-padding tokens trained per second, per process) to the results.")
    # lora
    lora_rank: int = arg(8, "LoRA rank r.")
    lora_alpha: Optional[int] = arg(None, "LoRA alpha (default: 2 x lora_rank).")
    lora_dropout: float = arg(0.0, "Dropout on the LoRA path.")
    lora_target: str = arg("all", "Modules that get LoRA: `all` (every linear layer but lm_head) or a comma list.")
    additional_target: Optional[str] = arg(None, "Extra modules trained fully and saved with the adapter.")
    loraplus_lr_ratio: Optional[float] = arg(None, "LoRA+: learning rate of B is this times that of A.")
    loraplus_lr_embedding: float = arg(1e-6, "LoRA+: learning rate of embedding adapters.")
    use_rslora: bool = arg(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = arg(False, "Weight-decomposed LoRA (DoRA).")
    pissa_init: bool = arg(False, "Initialise LoRA with PiSSA (principal singular vectors).")
    pissa_iter: int = arg(16, "PiSSA fast-SVD iterations (-1 = exact SVD).")
    pissa_convert: bool = arg(False, "Convert the PiSSA adapter to a normal LoRA adapter when saving.")
    create_new_adapter: bool = arg(False, "Add a new adapter on top of adapter_name_or_path instead of training it.")
    # freeze
    freeze_trainable_layers: int = arg(2, "Freeze tuning: train the last N layers (negative: the first N).")
    freeze_trainable_modules: str = arg("all", "Freeze tuning: module names inside those layers (comma list or all).")
    freeze_extra_modules: Optional[str] = arg(None, "Freeze tuning: extra modules to train (e.g. embed_tokens,lm_head).")
    # speed
    fast_path: str = arg("auto", "loraforge's fused kernels for covered models (Qwen2/2.5, Qwen3, Llama, Mistral) and "
                         "methods (LoRA/QLoRA): `auto` uses them when covered, `on` fails when not, `off` never.",
                         ("auto", "on", "off"))
    fp8: Union[bool, str] = arg(
        "auto", "FP8 (e4m3) matmuls for the frozen base weights on the fast path (Hopper GPUs or newer), with "
        "per-token scales: `backward` runs in FP8 what backward computes with them (each LoRA projection's "
        "input-gradient GEMM, and the forward GEMMs of a checkpointed layer replayed for its backward), while the "
        "forward pass and the loss stay 16-bit (the loss within 0.1% of 16-bit); `true` the forward pass's GEMMs "
        "too (the loss runs ~1% higher on real weights), `false` none. `auto` is `backward` where it can run (the "
        "fast path, bf16, a GPU of compute capability 9.0+) and `false` elsewhere. Adapters, norms, attention, the "
        "loss and evaluation stay 16-bit.")
    # how the samples of one optimizer step are run
    micro_batch_tokens: Union[int, bool, str] = arg(
        "auto", "Token-budget batching: the per_device_train_batch_size x gradient_accumulation_steps samples of "
        "one optimizer step run in as few packed micro-batches (no padding, no attention between samples) as this "
        "many tokens each allow, with exactly the optimizer steps of `off`. `auto` sizes the budget from the GPU's "
        "free memory (4096 tokens on CPU); an integer sets it; `off` runs per_device_train_batch_size padded "
        "samples per micro-batch.")
    # guards
    max_nonfinite_steps: int = arg(3, "Stop after this many consecutive non-finite loss/grad-norm updates.")


def fp8_setting(value: Union[bool, str, None]) -> Union[bool, str]:
    """``fp8`` as False, True (forward and input-gradient GEMMs), ``"backward"`` (the GEMMs backward runs: input
    gradients, and a checkpointed layer's replay) or
    ``"auto"`` (``backward`` where it can run). Raises ValueError with the accepted forms."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "on", "yes"):
        return True
    if text in ("false", "off", "no", "none"):
        return False
    if text in ("backward", "auto"):
        return text
    raise ValueError(f"`fp8` must be auto, true, false or backward (FP8 only for the matmuls backward runs), "
                     f"got {value!r}")


def micro_batch_tokens_setting(value: Union[int, bool, str, None]) -> Union[int, str, None]:
    """``micro_batch_tokens`` as ``"auto"``, a positive token count, or None for ``off``.

    YAML reads a bare ``off``/``on`` as a boolean, so False means off and True means auto. Raises ValueError
    with the accepted forms when the value is none of them.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "auto"
    if isinstance(value, str):
        text = value.strip().lower().replace("_", "")
        if text in ("auto", "on", "true"):
            return "auto"
        if text in ("off", "false", "no", "none"):
            return None
        if text.isdigit():
            value = int(text)
    if isinstance(value, int) and value > 0:
        return value
    raise ValueError(f"`micro_batch_tokens` must be auto, off or a positive number of tokens per micro-batch "
                     f"(e.g. 8192), got {value!r}")
