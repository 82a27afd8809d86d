"""Config parsing and validation: LLaMA-Factory keys, typos, invalid combinations, overrides."""

from __future__ import annotations

import pytest

from loraforge.cli import main
from loraforge.config import load_config, parse_overrides
from loraforge.errors import ConfigError

BASE = {"model_name_or_path": "tiny-random-qwen3", "dataset": "demo", "output_dir": "out"}


def test_llamafactory_keys_are_typed_and_grouped():
    cfg = load_config({**BASE, "learning_rate": "1e-4", "lora_target": ["q_proj", "v_proj"], "warmup_ratio": 0.1,
                       "quantization_bit": 4, "lora_rank": "16", "use_unsloth": False, "save_safetensors": True,
                       "overwrite_output_dir": True, "flash_attn": "sdpa", "report_to": "none"})
    assert cfg.training.learning_rate == pytest.approx(1e-4)  # PyYAML reads 1e-4 as a string
    assert cfg.finetuning.lora_target == "q_proj,v_proj"
    assert cfg.finetuning.lora_rank == 16 and cfg.model.quantization_bit == 4
    assert cfg.training.warmup_steps == pytest.approx(0.1)  # transformers 5 reads a float < 1 as a ratio
    assert cfg.training.overwrite_output_dir is True


def test_misspelt_key_names_the_closest_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config({**BASE, "lora_rnak": 8, "learning_rat": 1e-4})
    text = str(err.value)
    assert "unknown key `lora_rnak`" in text and "did you mean lora_rank" in text
    assert "unknown key `learning_rat`" in text and "learning_rate" in text
    assert len(err.value.problems) == 2


def test_invalid_combinations_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config({**BASE, "quantization_bit": 4, "finetuning_type": "full", "fp16": True, "bf16": True,
                     "val_size": 0.1, "eval_dataset": "other"})
    problems = err.value.problems
    assert len(problems) == 3
    assert any("quantization_bit: 4` needs `finetuning_type: lora`" in p for p in problems)
    assert any("`fp16: true` and `bf16: true`" in p for p in problems)
    assert any("`val_size` and `eval_dataset`" in p for p in problems)


def test_neutral_unsupported_keys_accepted_and_others_rejected():
    load_config({**BASE, "use_unsloth": False, "mixture_of_depths": None, "shift_attn": False, "use_badam": False})
    with pytest.raises(ConfigError) as err:
        load_config({**BASE, "use_unsloth": True, "use_badam": True})
    assert len(err.value.problems) == 2
    assert "Unsloth kernels" in err.value.problems[0] and "not support" in err.value.problems[0]


def test_bad_types_and_choices():
    with pytest.raises(ConfigError) as err:
        load_config({**BASE, "lora_rank": "eight", "quantization_bit": 3, "finetuning_type": "qlora"})
    text = "\n".join(err.value.problems)
    assert "`lora_rank`" in text and "integer" in text
    assert "`quantization_bit: 3`" in text and "4, 8" in text
    assert "`finetuning_type: 'qlora'`" in text


def test_overrides_forms():
    assert parse_overrides(["a=1", "--b", "x", "--c=2.5", "--flag"]) == {"a": 1, "b": "x", "c": 2.5, "flag": True}


def test_gradient_checkpointing_keys_agree():
    cfg = load_config({**BASE, "gradient_checkpointing": False})
    assert cfg.model.disable_gradient_checkpointing is True
    with pytest.raises(ConfigError, match="contradict"):
        load_config({**BASE, "gradient_checkpointing": True, "disable_gradient_checkpointing": True})


def test_cli_prints_documented_messages(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: tiny-random-qwen3\ndataset: demo\nlora_rnak: 8\n", encoding="utf-8")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key `lora_rnak`" in err and "did you mean lora_rank" in err
    assert "Traceback" not in err
    assert main(["train", str(cfg), "lora_rnak=", "--fp16", "true", "--bf16", "true"]) == 2


def test_missing_config_file_is_one_line(capsys):
    assert main(["train", "does-not-exist.yaml"]) == 2
    err = capsys.readouterr().err
    assert "does-not-exist.yaml" in err and "does not exist" in err and "Traceback" not in err
