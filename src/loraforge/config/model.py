"""Model group: where the base model, adapters and tokenizer come from and how they are loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ._field import arg


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = arg(
        None, "Local folder, Hugging Face hub id (ModelScope with USE_MODELSCOPE_HUB=1), or a built-in name: "
        "smollm2-135m-instruct, tiny-random-qwen3.")
    adapter_name_or_path: Optional[str] = arg(
        None, "One or more LoRA adapters (comma-separated paths) applied on top of the base model.")
    cache_dir: Optional[str] = arg(None, "Where downloaded models and converted built-in models are stored.")
    model_revision: str = arg("main", "Model revision (branch, tag or commit) on the hub.")
    use_fast_tokenizer: bool = arg(True, "Use the fast (Rust) tokenizer.")
    resize_vocab: bool = arg(False, "Resize token embeddings to the tokenizer's size.")
    split_special_tokens: bool = arg(False, "Tokenize special tokens as plain text (split them).")
    add_tokens: Optional[str] = arg(None, "Comma-separated normal tokens to add to the tokenizer.")
    add_special_tokens: Optional[str] = arg(None, "Comma-separated special tokens to add to the tokenizer.")
    rope_scaling: Optional[str] = arg(None, "RoPE scaling to extend the context.", ("linear", "dynamic", "yarn", "llama3"))
    flash_attn: str = arg("auto", "Attention kernel: auto, sdpa, fa2 (flash-attention 2), disabled (eager).",
                          ("auto", "disabled", "sdpa", "fa2"))
    disable_gradient_checkpointing: bool = arg(False, "Turn off gradient checkpointing (on by default).")
    checkpoint_layers: Union[int, str] = arg(
        "all", "With gradient checkpointing on, how many decoder layers recompute in backward: `all`; `auto` (as many "
        "as the GPU's free memory requires, from the memory model: the other, last layers keep their activations "
        "and skip the recompute); or a number (the first N layers recompute, the rest keep their activations).")
    use_reentrant_gc: bool = arg(False, "Use reentrant gradient checkpointing (non-reentrant is the default).")
    upcast_layernorm: bool = arg(False, "Keep layer norm weights in fp32.")
    upcast_lmhead_output: bool = arg(False, "Compute lm_head output in fp32.")
    train_from_scratch: bool = arg(False, "Randomly initialise the model instead of loading weights.")
    trust_remote_code: bool = arg(False, "Allow model code from the hub to run (needed by some architectures).")
    hf_hub_token: Optional[str] = arg(None, "Hugging Face token (default: HF_TOKEN from the environment).")
    ms_hub_token: Optional[str] = arg(None, "ModelScope token (default: MODELSCOPE_API_TOKEN).")
    infer_dtype: str = arg("auto", "Dtype for inference.", ("auto", "float16", "bfloat16", "float32"))
    offload_folder: str = arg("offload", "Folder for weights that `quantization_device_map: auto` offloads to disk "
                              "when they fit in neither GPU nor CPU memory.")
    use_cache: bool = arg(True, "Use the KV cache in generation.")
    print_param_status: bool = arg(False, "Print every parameter's name, dtype and trainability.")
    # quantization
    quantization_method: str = arg("bitsandbytes", "Quantization backend for QLoRA.", ("bitsandbytes", "bnb"))
    quantization_bit: Optional[int] = arg(None, "Load the base model in 4 or 8 bits (QLoRA).", (4, 8))
    quantization_type: str = arg("nf4", "4-bit data type.", ("nf4", "fp4"))
    double_quantization: bool = arg(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    quantization_device_map: Optional[str] = arg(None, "Device map for quantized loading ('auto' to spread).")
    # memory estimate shown before training
    estimate_gpu: Optional[str] = arg(None, "GPU name for the pre-training memory check (default: detected).")


def checkpoint_layers_setting(value: Union[int, str, None]) -> Union[int, str]:
    """``checkpoint_layers`` as ``"all"``, ``"auto"`` or a layer count >= 0; ValueError naming the accepted forms."""
    if value is None:
        return "all"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("all", "auto"):
            return text
        if text.isdigit():
            return int(text)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"`checkpoint_layers` must be all, auto or a number of layers (0 or more), got {value!r}")
