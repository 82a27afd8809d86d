"""Tiny random peft-wrapped decoders (Qwen3 / Qwen2 / Llama / Mistral) for the fast-path and checkpointing tests."""

from __future__ import annotations

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(arch: str, *, dropout: float = 0.0, rslora: bool = False):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    if arch == "qwen2":
        extra["use_sliding_window"] = False
    config_cls = {"qwen3": "Qwen3Config", "qwen2": "Qwen2Config", "llama": "LlamaConfig",
                  "mistral": "MistralConfig"}[arch]
    config = getattr(transformers, config_cls)(**SIZES, **extra)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False,
                      use_rslora=rslora, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
