"""The published Qwen3 shapes, shared by the GPU benchmark scripts (random weights of a real size).

`toy`/`tiny` only exercise a script on a CPU. Import from a script run as `python benchmarks/NAME.py`.
"""

from __future__ import annotations

SHAPES = {
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True),
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=8, tie_word_embeddings=False),
}
SHAPES["tiny"] = SHAPES["toy"]


def qwen3_config(size: str, **overrides):
    """A ``Qwen3Config`` of the named size (vocabulary, head_dim, RoPE base and special ids as released)."""
    from transformers import Qwen3Config

    kwargs = dict(vocab_size=151936, head_dim=16 if size in ("toy", "tiny") else 128, max_position_embeddings=40960,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                  pad_token_id=151643, **SHAPES[size])
    kwargs.update(overrides)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # a smaller test vocabulary has no such ids
        if kwargs[key] is not None and kwargs[key] >= kwargs["vocab_size"]:
            kwargs[key] = None
    return Qwen3Config(**kwargs)
