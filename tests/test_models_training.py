"""LoRA, QLoRA (4-bit nf4 + double quant, 8-bit), freeze and full fine-tuning lower the loss on tiny-random-qwen3.

A plain torch loop on one repeated batch: this checks the model set-up; the Trainer path is tested in train/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraforge.config import load_config
from loraforge.models.adapters import find_linear_modules, loraplus_param_groups
from loraforge.models.loader import load_model, load_tokenizer, summarize_model

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(tmp_path: Path, **keys):
    values = {"model_name_or_path": "tiny-random-qwen3", "dataset": "unused", "output_dir": str(tmp_path / "out"),
              "learning_rate": 1e-2, "lora_rank": 8}
    values.update(keys)
    cfg = load_config(values, [], purpose="train")
    torch.manual_seed(0)
    tokenizer = tokenizer_for(cfg)
    return cfg, tokenizer, load_model(cfg, tokenizer, is_trainable=True)


_PLAIN_TOKENIZER: list = []


def tokenizer_for(cfg):
    """The stock tokenizer is loaded once per module (0.5 s each time); one with added tokens is loaded afresh."""
    if cfg.model.add_tokens or cfg.model.add_special_tokens:
        return load_tokenizer(cfg.model)
    if not _PLAIN_TOKENIZER:
        _PLAIN_TOKENIZER.append(load_tokenizer(cfg.model))
    return _PLAIN_TOKENIZER[0]


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151643, (2, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_steps(model, lr: float, steps: int = 4) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    inputs, losses = batch(), []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


MODES = {
    "lora": {},
    "qlora4-nf4-double": {"quantization_bit": 4, "quantization_type": "nf4", "double_quantization": True},
    "qlora8": {"quantization_bit": 8},
    "freeze": {"finetuning_type": "freeze", "freeze_trainable_layers": 2},
    "full": {"finetuning_type": "full", "learning_rate": 1e-3},
    "dora": {"use_dora": True},
    "pissa": {"pissa_init": True, "pissa_iter": 4},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_loss_falls(tmp_path: Path, mode: str):
    cfg, _, model = make(tmp_path, **MODES[mode])
    losses = train_steps(model, cfg.training.learning_rate)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.25, losses


def test_lora_all_targets_every_linear_but_lm_head(tmp_path: Path):
    from peft.tuners.lora import LoraLayer

    _, _, model = make(tmp_path)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == 7 * 4
    assert not any("lm_head" in n or "embed_tokens" in n for n in adapted)
    assert sorted(model.peft_config["default"].target_modules) == sorted(SEVEN)
    assert model.peft_config["default"].lora_alpha == 16  # default 2 x rank
    assert find_linear_modules(model.get_base_model()) == SEVEN
    summary = summarize_model(model)
    assert summary.adapter_modules == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj x 4 layers"
    # r=8 on 4 layers: q(64->64) k,v(64->32) o(64->64) gate,up(64->128) down(128->64)
    per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert summary.trainable_params == 4 * per_layer
    assert summary.quantization == "none" and summary.method == "lora"


def test_lora_target_list_rank_alpha_dropout_rslora(tmp_path: Path):
    _, _, model = make(tmp_path, lora_target="q_proj, v_proj", lora_rank=4, lora_alpha=8, lora_dropout=0.1,
                       use_rslora=True, additional_target="norm")
    config = model.peft_config["default"]
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (4, 8, 0.1, True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)
    assert config.modules_to_save == ["norm"]
    assert any(p.requires_grad for n, p in model.named_parameters() if "modules_to_save" in n and "model.norm" in n)


def test_qlora4_weights_and_summary(tmp_path: Path):
    import bitsandbytes as bnb

    _, _, model = make(tmp_path, quantization_bit=4, quantization_type="nf4", double_quantization=True)
    layer = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)
    state = layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantization
    assert layer.weight.numel() == 64 * 128 // 2  # two 4-bit values per byte
    summary = summarize_model(model)
    _, _, plain = make(tmp_path)
    assert summary.total_params == summarize_model(plain).total_params  # 4-bit weights counted logically
    assert summary.quantization == "bitsandbytes 4-bit nf4 + double quantization, compute float32"
    assert "lm_head" not in summary.adapter_modules
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)


def test_qlora8_and_fp4(tmp_path: Path):
    import bitsandbytes as bnb

    _, _, model = make(tmp_path, quantization_bit=8)
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    assert summarize_model(model).quantization == "bitsandbytes 8-bit (LLM.int8)"
    _, _, model = make(tmp_path, quantization_bit=4, quantization_type="fp4", double_quantization=False)
    state = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.quant_state
    assert state.quant_type == "fp4" and not state.nested


def test_freeze_trains_only_the_last_layers_and_extra_modules(tmp_path: Path):
    _, _, model = make(tmp_path, finetuning_type="freeze", freeze_trainable_layers=1,
                       freeze_trainable_modules="mlp", freeze_extra_modules="norm")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight",
                         "model.layers.3.mlp.down_proj.weight", "model.norm.weight"}
    _, _, model = make(tmp_path, finetuning_type="freeze", freeze_trainable_layers=-1)
    layers = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert layers == {"0"}
    assert summarize_model(model).method == "freeze"


def test_full_and_pure_bf16(tmp_path: Path):
    _, _, model = make(tmp_path, finetuning_type="full")
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    _, _, model = make(tmp_path, finetuning_type="full", pure_bf16=True)
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    assert summarize_model(model).dtype == "bfloat16 (100%)"


def test_gradient_checkpointing_default_and_off(tmp_path: Path):
    _, _, model = make(tmp_path)
    base = model.get_base_model()
    assert base.is_activation_checkpointing and base.config.use_cache is False
    _, _, model = make(tmp_path, disable_gradient_checkpointing=True)
    assert not model.get_base_model().is_activation_checkpointing


def test_loraplus_groups(tmp_path: Path):
    _, _, model = make(tmp_path)
    groups = loraplus_param_groups(model, lr=1e-4, ratio=16.0, weight_decay=0.01, embedding_lr=1e-6)
    by_name = {g["name"]: g for g in groups}
    assert by_name["lora_B"]["lr"] == pytest.approx(1.6e-3) and by_name["other"]["lr"] == pytest.approx(1e-4)
    assert all(g["weight_decay"] == 0.01 for g in groups)
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == sum(1 for p in model.parameters() if p.requires_grad)
    b_ids = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    assert {id(p) for p in by_name["lora_B"]["params"]} == b_ids
    opt = torch.optim.AdamW(groups)
    assert len(opt.param_groups) == len(groups)


def test_added_tokens_get_trainable_rows(tmp_path: Path):
    _, tokenizer, model = make(tmp_path, add_special_tokens="<|persona|>")
    new_id = tokenizer.convert_tokens_to_ids("<|persona|>")
    assert new_id == 151669
    assert tokenizer("a<|persona|>b")["input_ids"].count(new_id) == 1
    assert model.peft_config["default"].trainable_token_indices == {"embed_tokens": [new_id]}


def test_rope_scaling_extends_positions(tmp_path: Path):
    _, _, model = make(tmp_path, rope_scaling="linear", cutoff_len=81920)
    config = model.get_base_model().config
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
    assert config.max_position_embeddings == 81920


def test_attention_choice(tmp_path: Path):
    _, _, model = make(tmp_path, flash_attn="disabled")
    assert model.get_base_model().config._attn_implementation == "eager"
    _, _, model = make(tmp_path, flash_attn="sdpa")
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_offload_folder_goes_with_an_auto_device_map(tmp_path: Path, monkeypatch):
    """accelerate offloads what fits in no memory into `offload_folder`; only an `auto` device map offloads."""
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("offload_folder"))
        kwargs.pop("device_map", None)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    make(tmp_path, quantization_device_map="auto", offload_folder=str(tmp_path / "off"))
    make(tmp_path, offload_folder=str(tmp_path / "off"))
    assert seen == [str(tmp_path / "off"), None]
