"""LLaMA-Factory keys for features loraforge does not have yet, and renamed keys.

A key listed in :data:`NEUTRAL_KEYS` is accepted when it holds its neutral value (so LLaMA-Factory YAMLs load
unchanged) and rejected with a clear message otherwise, instead of being silently ignored.
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
    "vllm_enforce_eager": ((False, None), "the vLLM backend"),
}

# old name -> current name
RENAMED_KEYS: dict[str, str] = {
    "evaluation_strategy": "eval_strategy",
    "new_special_tokens": "add_special_tokens",
    "no_cuda": "use_cpu",
}
