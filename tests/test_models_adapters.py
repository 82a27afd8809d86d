"""A saved adapter (PEFT format) reloads through load_model and reproduces the logits; stacked adapters merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraforge.config import load_config
from loraforge.models.loader import load_model, load_tokenizer, summarize_model


def cfg_for(tmp_path: Path, purpose: str = "train", **keys):
    values = {"model_name_or_path": "tiny-random-qwen3", "lora_rank": 4}
    if purpose == "train":
        values.update(dataset="unused", output_dir=str(tmp_path / "out"))
    values.update(keys)
    return load_config(values, [], purpose=purpose)


INPUTS = torch.tensor([[151644, 872, 198, 9707, 1879, 0, 151645, 198, 151644, 77091, 198]])


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUTS).logits.float()


def train_and_save(tmp_path: Path, name: str, seed: int, **keys) -> tuple[Path, torch.Tensor]:
    cfg = cfg_for(tmp_path, **keys)
    torch.manual_seed(seed)
    model = load_model(cfg, tokenizer_for(cfg), is_trainable=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        model(input_ids=INPUTS, labels=INPUTS).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path / name
    model.save_pretrained(str(out))
    return out, logits(model)


def load_for_inference(tmp_path: Path, adapters: str, **keys):
    cfg = cfg_for(tmp_path, purpose="chat", adapter_name_or_path=adapters, **keys)
    return load_model(cfg, tokenizer_for(cfg), is_trainable=False)


_TOKENIZER: list = []


def tokenizer_for(cfg):
    """tiny-random-qwen3's tokenizer, loaded once per module (these tests add no tokens)."""
    if not _TOKENIZER:
        _TOKENIZER.append(load_tokenizer(cfg.model))
    return _TOKENIZER[0]


@pytest.fixture(scope="module")
def base_logits(tmp_path_factory) -> torch.Tensor:
    tmp = tmp_path_factory.mktemp("base")
    cfg = cfg_for(tmp, purpose="chat")
    return logits(load_model(cfg, tokenizer_for(cfg), is_trainable=False))


def test_saved_adapter_reloads_and_reproduces_logits(tmp_path: Path, base_logits: torch.Tensor):
    folder, trained = train_and_save(tmp_path, "adapter", seed=0)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert not torch.allclose(trained, base_logits, atol=1e-3)  # training changed something
    model = load_for_inference(tmp_path, str(folder))
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model), trained, atol=2e-5, rtol=1e-4)


def test_adapter_resumes_training_with_its_weights(tmp_path: Path):
    folder, trained = train_and_save(tmp_path, "adapter", seed=0)
    cfg = cfg_for(tmp_path, adapter_name_or_path=str(folder), lora_rank=16)  # the saved rank wins
    model = load_model(cfg, tokenizer_for(cfg), is_trainable=True)
    assert model.peft_config["default"].r == 4
    assert summarize_model(model).trainable_params > 0
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(logits(model), trained, atol=2e-5, rtol=1e-4)


def test_stacked_adapters_merge_then_new_adapter(tmp_path: Path):
    first, first_logits = train_and_save(tmp_path, "first", seed=0)
    # training on top of `first` with create_new_adapter: first is merged, a fresh (zero-B) LoRA is added
    second, second_logits = train_and_save(tmp_path, "second", seed=1, adapter_name_or_path=str(first),
                                           create_new_adapter=True)
    cfg = cfg_for(tmp_path, adapter_name_or_path=str(first), create_new_adapter=True)
    fresh = load_model(cfg, tokenizer_for(cfg), is_trainable=True)
    torch.testing.assert_close(logits(fresh), first_logits, atol=2e-5, rtol=1e-4)
    # inference with both: first merged, second applied; equals what the second run ended with
    both = load_for_inference(tmp_path, f"{first},{second}")
    torch.testing.assert_close(logits(both), second_logits, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(second_logits, first_logits, atol=1e-3)


def test_qlora4_adapter_reloads(tmp_path: Path):
    folder, trained = train_and_save(tmp_path, "q4", seed=0, quantization_bit=4)
    model = load_for_inference(tmp_path, str(folder), quantization_bit=4)
    torch.testing.assert_close(logits(model), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("purpose", ["train", "chat"])
def test_an_evaluation_leaves_4bit_weights_as_loaded(tmp_path: Path, purpose: str):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at an eval-mode, no-grad forward
    (block scales rounded to bf16): loraforge's loader keeps the loaded layout, so an evaluation or a chat turn
    leaves every base weight bit-identical (and later dequantizations, merges and the fast path read it right)."""
    bnb = pytest.importorskip("bitsandbytes")
    from loraforge.kernels.lora import dequantize_weight

    cfg = cfg_for(tmp_path, purpose=purpose, quantization_bit=4)
    model = load_model(cfg, tokenizer_for(cfg), is_trainable=purpose == "train")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    before = [dequantize_weight(m, torch.float32).clone() for m in layers]
    logits(model)  # eval mode, no gradients
    for m, w in zip(layers, before):
        assert torch.equal(dequantize_weight(m, torch.float32), w)


def test_pissa_adapter_reloads_and_converts_to_plain_lora(tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.models.adapters import save_pissa_initial
    from loraforge.models.builtin import resolve_builtin

    cfg = cfg_for(tmp_path, pissa_init=True, pissa_iter=4)
    model = load_model(cfg, tokenizer_for(cfg), is_trainable=True)
    initial = save_pissa_initial(model, str(tmp_path / "out"))
    assert initial is not None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        model(input_ids=INPUTS, labels=INPUTS).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = logits(model)
    model.save_pretrained(str(tmp_path / "pissa"))
    model.save_pretrained(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=initial)
    # the PiSSA adapter itself: loraforge rebuilds the same residual base (fixed-seed fast SVD)
    torch.testing.assert_close(logits(load_for_inference(tmp_path, str(tmp_path / "pissa"))), trained,
                               atol=2e-5, rtol=1e-4)
    # converted (pissa_convert): a rank-2r LoRA on the original weights, loadable by plain peft
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(str(resolve_builtin("tiny-random-qwen3")))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, str(tmp_path / "plain"))), trained,
                               atol=2e-5, rtol=1e-4)
