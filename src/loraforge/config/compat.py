"""LLaMA-Factory keys for features loraforge does not have yet, and renamed keys.

A key listed in :data:`NEUTRAL_KEYS` is accepted when it holds its neutral value (so LLaMA-Factory YAMLs load
unchanged) and rejected with a clear message otherwise, instead of being silently ignored. Such a key is never
also a dataclass field: every declared field is used (tests/test_config_keys.py walks them all).
"""

from __future__ import annotations

# key -> (neutral values, what the key is for)
NEUTRAL_KEYS: dict[str, tuple[tuple, str]] = {
    "use_unsloth": ((False, None), "Unsloth kernels"),
    "use_unsloth_gc": ((False, None), "Unsloth gradient checkpointing"),
    "enable_liger_kernel": ((False, None), "Liger kernels"),
    "mixture_of_depths": ((None,), "mixture-of-depths conversion"),
    "shift_attn": ((False, None), "shift short attention (LongLoRA)"),
    "moe_aux_loss_coef": ((None,), "MoE auxiliary loss"),
    "use_badam": ((False, None), "BAdam optimizer"),
    "use_galore": ((False, None), "GaLore optimizer"),
    "use_apollo": ((False, None), "APOLLO optimizer"),
    "use_llama_pro": ((False, None), "LLaMA Pro block expansion"),
    "use_adam_mini": ((False, None), "Adam-mini optimizer"),
    "use_muon": ((False, None), "Muon optimizer"),
    "use_swanlab": ((False, None), "SwanLab logging"),
    "use_ray": ((False, None), "Ray training"),
    "train_mm_proj_only": ((False, None), "multimodal projector training"),
    "freeze_vision_tower": ((True, None), "vision towers"),
    "freeze_multi_modal_projector": ((True, None), "multimodal projectors"),
    "freeze_language_model": ((False, None), "multimodal training"),
    "ref_model": ((None,), "reference models (DPO/PPO)"),
    "reward_model": ((None,), "reward models (PPO)"),
    "pref_beta": ((0.1, None), "preference training (DPO/KTO)"),
    "pref_ftx": ((0.0, 0, None), "preference training (DPO/KTO)"),
    "pref_loss": (("sigmoid", None), "preference training (DPO/KTO)"),
    "early_stopping_steps": ((None,), "early stopping"),
    "export_quantization_bit": ((None,), "GPTQ export (use export_format: gguf)"),
    "export_quantization_dataset": ((None,), "GPTQ export (use export_format: gguf)"),
    "export_quantization_nsamples": ((128, None), "GPTQ export (use export_format: gguf)"),
    "export_quantization_maxlen": ((1024, None), "GPTQ export (use export_format: gguf)"),
    "export_legacy_format": ((False, None), ".bin exports (loraforge always writes safetensors)"),
    "vllm_enforce_eager": ((False, None), "the vLLM backend"),
    "infer_backend": (("huggingface", "hf", None), "the vLLM/SGLang inference backends"),
    "om_hub_token": ((None,), "the Modelers (openMind) hub"),
    "adapter_folder": ((None,), "a separate adapter folder (list adapters in adapter_name_or_path)"),
    # transformers 5 always loads weights with low host memory and ignores this flag
    "low_cpu_mem_usage": ((True, None), "loading with full host memory (transformers 5 always loads lazily)"),
    "save_safetensors": ((True, None), ".bin checkpoints (loraforge always writes safetensors)"),
    # transformers 5 takes the TensorBoard folder from TENSORBOARD_LOGGING_DIR, not from the arguments
    "logging_dir": ((None,), "a TensorBoard folder from the config (set TENSORBOARD_LOGGING_DIR)"),
    # loraforge reads dataset files fully and shuffles them whole, so there is no streaming shuffle buffer
    "buffer_size": ((16384, None), "a streaming shuffle buffer"),
    "media_dir": ((None,), "image/video inputs"),
    "image_max_pixels": ((768 * 768, None), "image/video inputs"),
    "image_min_pixels": ((32 * 32, None), "image/video inputs"),
    "video_max_pixels": ((256 * 256, None), "image/video inputs"),
    "video_min_pixels": ((16 * 16, None), "image/video inputs"),
    "video_fps": ((2.0, None), "image/video inputs"),
    "video_maxlen": ((128, None), "image/video inputs"),
    # LLaMA-Factory's `fp8` picks a backend; loraforge's `fp8: true` is its own (FP8 base-weight matmuls)
    "fp8_backend": (("auto", None), "torchao, Transformer Engine or MS-AMP FP8 (loraforge's own is `fp8: true`)"),
    "fp8_enable_fsdp_float8_all_gather": ((False, None), "FP8 all-gather under FSDP"),
}

# LLaMA-Factory key -> the transformers training argument config/ turns it into (nothing else reads the key)
TRANSLATED_KEYS: dict[str, str] = {
    "warmup_ratio": "warmup_steps",
    "disable_shuffling": "train_sampling_strategy",
}

# old name -> current name
RENAMED_KEYS: dict[str, str] = {
    "evaluation_strategy": "eval_strategy",
    "new_special_tokens": "add_special_tokens",
    "no_cuda": "use_cpu",
}
