"""Architectures: built-in shapes give the real parameter counts; config.json files and hub ids resolve offline."""

from __future__ import annotations

import json

import pytest

from loraforge.errors import ModelLoadError
from loraforge.estimate.architectures import BUILTIN_ARCHITECTURES, resolve_architecture

# Totals as published on each model card / counted from the released safetensors (tied embeddings once).
PUBLISHED = {
    "qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976, "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360, "qwen3-14b": 14_768_307_200, "qwen3-32b": 32_762_123_264,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512, "qwen2.5-14b": 14_770_033_664, "llama3-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824, "smollm2-135m": 134_515_008,
}


def test_every_builtin_has_a_published_count():
    assert set(PUBLISHED) == set(BUILTIN_ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_builtin_parameter_counts(name):
    assert BUILTIN_ARCHITECTURES[name].total_params() == PUBLISHED[name]


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-8b", "qwen2.5-7b", "llama3.2-1b", "smollm2-135m"])
def test_counts_match_transformers_modules(name):
    """Build the model on the meta device (no memory) and count what transformers really creates."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    a = BUILTIN_ARCHITECTURES[name]
    kw = dict(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
              num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
              tie_word_embeddings=a.tie_word_embeddings)
    if a.qk_norm:
        config = Qwen3Config(head_dim=a.head_dim, **kw)
    elif a.qkv_bias:
        config = Qwen2Config(**kw)
    else:
        config = LlamaConfig(head_dim=a.head_dim, **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == a.total_params()
    lora = a.lora_params(16, ("q_proj", "v_proj"))
    assert lora == a.num_layers * 16 * (2 * a.hidden_size + a.q_dim + a.kv_dim)


def test_real_qwen3_config_json(qwen3_tokenizer_dir):
    arch = resolve_architecture(str(qwen3_tokenizer_dir))  # the folder holds the official config.json
    assert arch.total_params() == 596_049_920  # 0.596B including the (tied) embeddings
    assert arch.qk_norm and arch.tie_word_embeddings and not arch.qkv_bias
    assert arch == resolve_architecture(str(qwen3_tokenizer_dir / "config.json"))
    assert (arch.hidden_size, arch.num_layers, arch.kv_dim) == (1024, 28, 1024)


def test_aliases_and_hub_ids_of_builtins():
    assert resolve_architecture("Qwen/Qwen3-8B").name == "qwen3-8b"
    assert resolve_architecture("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    assert resolve_architecture("meta-llama/Llama-3.2-1B-Instruct").name == "llama3.2-1b"
    assert resolve_architecture("smollm2-135m-instruct").name == "smollm2-135m"


def test_tiny_random_qwen3_builtin():
    arch = resolve_architecture("tiny-random-qwen3")
    assert (arch.hidden_size, arch.num_layers, arch.vocab_size) == (64, 4, 151936)


def test_uncached_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as err:
        resolve_architecture("someone/unknown-model-7b")
    assert "qwen3-8b" in str(err.value)  # the fix lists the built-in names


def test_unknown_name_and_bad_config(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model"):
        resolve_architecture("qwen9-1t")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(ModelLoadError, match="lacks vocab_size"):
        resolve_architecture(str(tmp_path))
    moe = tmp_path / "moe.json"
    moe.write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 128, "hidden_size": 2048}))
    with pytest.raises(ModelLoadError, match="mixture-of-experts"):
        resolve_architecture(str(moe))


def test_local_llama_style_config(tmp_path):
    config = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = resolve_architecture(str(tmp_path))
    assert arch.num_kv_heads == 32 and arch.head_dim == 128
    assert arch.total_params() == 6_738_415_616  # Llama-2-7B
