"""GGUF files read back with gguf.GGUFReader: hyper-parameters, tensor names and layouts, quantization rules,
tokenizer metadata, LoRA adapters. No llama.cpp needed (test_export_llamacpp.py runs the files in llama.cpp)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from loraforge.errors import ExportError  # noqa: E402
from loraforge.export.gguf import convert_to_gguf  # noqa: E402
from loraforge.export.gguf.lora import convert_lora_to_gguf  # noqa: E402
from loraforge.export.gguf.tokenizer import detect_pre_tokenizer  # noqa: E402
from conftest import make_random_lora  # noqa: E402

Q = gguf.GGMLQuantizationType
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_tiny(kind: str, tokenizer_dir: Path, out: Path, **overrides) -> Path:
    """A tiny random model of ``kind`` (qwen3/qwen2/llama) saved with the tokenizer of ``tokenizer_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.update(overrides)
    config = AutoConfig.for_model(kind, **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1 if name.endswith("norm.weight") else 0.05)
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def qwen3_headdim(tmp_path_factory, tiny_qwen3_path: Path) -> Path:
    # head_dim 32 while hidden/heads = 16: key_length must come from head_dim (as in Qwen3-0.6B: 128 vs 64)
    return build_tiny("qwen3", tiny_qwen3_path, tmp_path_factory.mktemp("q3") / "m", head_dim=32,
                      tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 5e5})


def test_qwen3_header_names_and_tokenizer(qwen3_headdim: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    out = convert_to_gguf(qwen3_headdim, tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(out.path)
    assert field(r, "general.architecture") == "qwen3"
    assert field(r, "qwen3.attention.key_length") == 32 and field(r, "qwen3.attention.value_length") == 32
    assert field(r, "qwen3.attention.head_count") == 4 and field(r, "qwen3.attention.head_count_kv") == 2
    assert field(r, "qwen3.rope.freq_base") == pytest.approx(5e5)
    assert field(r, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(r, "qwen3.context_length") == 2048 and field(r, "qwen3.block_count") == 2
    names = set(tensors(r))
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight",
            "blk.0.ffn_down.weight"} <= names
    assert tensors(r)["blk.0.attn_q.weight"].shape.tolist() == [64, 4 * 32]  # ggml order: (in, out)

    tok = AutoTokenizer.from_pretrained(str(qwen3_headdim))
    vocab = tok.get_vocab()
    types = r.get_field("tokenizer.ggml.token_type").contents()
    assert types[vocab["<|im_end|>"]] == 3 and types[vocab["<think>"]] == 4 and types[vocab["hello"]] == 1
    tokens = r.get_field("tokenizer.ggml.tokens").contents()
    assert len(tokens) == 151936 and tokens[vocab["Ġworld"]] == "Ġworld" and tokens[-1] == "[PAD151935]"
    assert types[-1] == 5
    assert field(r, "tokenizer.ggml.pre") == "qwen2" and field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.eos_token_id") == vocab["<|im_end|>"]
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.chat_template") == tok.chat_template
    assert len(r.get_field("tokenizer.ggml.merges").contents()) == 151387


def test_untied_qwen2_with_biases_and_quantization_rules(smollm2_path: Path, tmp_path: Path):
    src = build_tiny("qwen2", smollm2_path, tmp_path / "q2", intermediate_size=80)  # ffn_down rows of 80
    from safetensors.torch import load_file

    hf = load_file(str(src / "model.safetensors"))
    for quant, matrix_type in (("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)):
        r = gguf.GGUFReader(convert_to_gguf(src, tmp_path / f"{quant}.gguf", quant).path)
        t = tensors(r)
        assert "output.weight" in t and t["blk.0.attn_q.bias"].tensor_type == Q.F32
        assert t["blk.0.attn_norm.weight"].tensor_type == Q.F32
        assert t["blk.0.attn_q.weight"].tensor_type == matrix_type
        assert t["blk.0.ffn_down.weight"].tensor_type == Q.F16  # 80 is not a multiple of 32: f16 fallback
        embd_type = Q.Q8_0  # q4_0 keeps the embedding and output matrix at 8 bits
        assert t["token_embd.weight"].tensor_type == embd_type and t["output.weight"].tensor_type == embd_type
        deq = gguf.quants.dequantize(t["blk.1.mlp.weight".replace("mlp", "ffn_gate")].data, matrix_type)
        ref = hf["model.layers.1.mlp.gate_proj.weight"].numpy()
        tol = 0.002 if quant == "q8_0" else 0.02
        assert np.abs(deq.reshape(ref.shape) - ref).max() < tol
        f16 = np.asarray(t["blk.0.ffn_down.weight"].data).reshape(hf["model.layers.0.mlp.down_proj.weight"].shape)
        assert np.array_equal(f16, hf["model.layers.0.mlp.down_proj.weight"].numpy().astype(np.float16))


def test_llama_rope_rows_are_interleaved_and_rope_freqs_written(smollm2_path: Path, tmp_path: Path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    src = build_tiny("llama", smollm2_path, tmp_path / "ll", head_dim=16, rope_parameters=rope)
    from safetensors.torch import load_file

    hf = load_file(str(src / "model.safetensors"))
    r = gguf.GGUFReader(convert_to_gguf(src, tmp_path / "f32.gguf", "f32").path)
    t = tensors(r)
    for name, hf_name, heads in (("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2)):
        ours = np.asarray(t[f"blk.0.{name}.weight"].data)
        ref = hf[f"model.layers.0.self_attn.{hf_name}.weight"].numpy()
        half = 8
        for h in range(heads):
            for j in range(half):  # llama.cpp pairs (x_j, x_{j+d/2}) as rows 2j, 2j+1 of each head
                assert np.array_equal(ours[h * 16 + 2 * j], ref[h * 16 + j])
                assert np.array_equal(ours[h * 16 + 2 * j + 1], ref[h * 16 + half + j])
    assert np.array_equal(np.asarray(t["blk.0.attn_v.weight"].data), hf["model.layers.0.self_attn.v_proj.weight"].numpy())
    freqs = np.asarray(t["rope_freqs.weight"].data)
    assert freqs.shape == (8,) and freqs[0] == pytest.approx(1.0) and freqs[-1] == pytest.approx(8.0)
    assert field(r, "tokenizer.ggml.pre") == "smollm"


def test_sharded_source_and_bf16(smollm2_path: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    src = build_tiny("qwen3", smollm2_path, tmp_path / "m", num_hidden_layers=4)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="2MB")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, tmp_path / "sharded" / name)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    r = gguf.GGUFReader(convert_to_gguf(tmp_path / "sharded", tmp_path / "bf16.gguf", "bf16").path)
    t = tensors(r)
    assert len(t) == 3 + 4 * 11 and t["blk.3.ffn_up.weight"].tensor_type == Q.BF16
    raw = np.asarray(t["blk.3.ffn_up.weight"].data).view(np.uint16).reshape(128, 64)
    ref = model.model.layers[3].mlp.up_proj.weight.detach().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(raw, ref)  # bf16 source -> bf16 GGUF is bit-exact
    assert field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_BF16)


def test_pre_tokenizer_detection(qwen3_tokenizer_dir: Path, smollm2_path: Path):
    from transformers import AutoTokenizer

    assert detect_pre_tokenizer(AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))) == "qwen2"
    assert detect_pre_tokenizer(AutoTokenizer.from_pretrained(str(smollm2_path))) == "smollm"


def test_refuses_unsupported_architecture_and_tokenizer(tiny_qwen3_path: Path, tmp_path: Path):
    src = tmp_path / "m"
    shutil.copytree(tiny_qwen3_path, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
    with pytest.raises(ExportError, match="model_type: gemma2"):
        convert_to_gguf(src, tmp_path / "x.gguf", "f16")
    (src / "config.json").write_text(json.dumps(config))
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError, match="byte-level"):
        convert_to_gguf(src, tmp_path / "x.gguf", "f16")


def test_kquant_without_llama_cpp_says_how_to_get_it(tiny_qwen3_path: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ExportError, match="llama-cpp-python") as err:
        convert_to_gguf(tiny_qwen3_path, tmp_path / "k.gguf", "q4_k_m")
    assert "pip install" in str(err.value) and "q8_0" in str(err.value)
    assert not list(tmp_path.iterdir())


def _adapter(base: Path, out: Path, **lora_kw) -> Path:
    return make_random_lora(base, out, targets=("q_proj", "v_proj", "down_proj"), **lora_kw)


def test_lora_adapter_gguf(tiny_qwen3_path: Path, tmp_path: Path):
    adapter = _adapter(tiny_qwen3_path, tmp_path / "ad", use_rslora=True)
    base_config = json.loads((tiny_qwen3_path / "config.json").read_text())
    r = gguf.GGUFReader(convert_lora_to_gguf(adapter, base_config, tmp_path / "lora.gguf"))
    assert field(r, "general.type") == "adapter" and field(r, "adapter.type") == "lora"
    assert field(r, "adapter.lora.alpha") == pytest.approx(8 * 2.0)  # rsLoRA: alpha/sqrt(r) == alpha'/r
    t = tensors(r)
    assert len(t) == 2 * 3 * 4
    assert t["blk.0.attn_q.weight.lora_a"].shape.tolist() == [64, 4]      # ggml (in, r)
    assert t["blk.0.attn_q.weight.lora_b"].shape.tolist() == [4, 64]      # ggml (r, out)
    assert t["blk.3.ffn_down.weight.lora_b"].shape.tolist() == [4, 64]


def test_lora_refuses_dora(tiny_qwen3_path: Path, tmp_path: Path):
    adapter = _adapter(tiny_qwen3_path, tmp_path / "dora", use_dora=True)
    with pytest.raises(ExportError, match="DoRA"):
        convert_lora_to_gguf(adapter, json.loads((tiny_qwen3_path / "config.json").read_text()), tmp_path / "x.gguf")


def test_failed_conversion_leaves_no_truncated_file(smollm2_path: Path, tmp_path: Path, monkeypatch):
    import loraforge.export.gguf.writer as writer

    src = build_tiny("qwen3", smollm2_path, tmp_path / "m")
    calls = []

    def failing_encode(tensor, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return real(tensor, qtype)

    real = writer.encode
    monkeypatch.setattr(writer, "encode", failing_encode)
    with pytest.raises(OSError, match="No space"):
        convert_to_gguf(src, tmp_path / "m.gguf", "q8_0")
    assert len(calls) == 5 and not (tmp_path / "m.gguf").exists()
