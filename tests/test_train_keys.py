"""Training keys from LLaMA-Factory that change what a run does: compute_accuracy, eval_on_each_dataset,
include_effective_tokens_per_second, disable_shuffling, data_shared_file_system, ignore_pad_token_for_loss."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from loraforge.config import load_config
from loraforge.data.collator import build_collator
from loraforge.evaluate.accuracy import argmax_logits, token_accuracy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [{"instruction": f"Spell {n}.", "input": "", "output": f"{n} is spelt {n}."} for n in range(10, 22)]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.json").write_text(json.dumps(ROWS[:8]), encoding="utf-8")
    (d / "b.json").write_text(json.dumps(ROWS[8:]), encoding="utf-8")
    (d / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}}))
    return d


def test_token_accuracy_is_next_token_exactness_averaged_over_rows():
    labels = np.array([[-100, 5, 6, 7], [-100, -100, 8, -100]])
    preds = np.array([[5, 6, 0, 9], [1, 8, 3, 4]])  # row 0: 2 of 3 right; row 1: 1 of 1 (padding ignored)
    assert token_accuracy(preds, labels) == pytest.approx((2 / 3 + 1) / 2)
    assert token_accuracy(np.array([[1, 2]]), np.array([[-100, -100]])) == 0.0
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 3] = logits[0, 1, 1] = 1.0
    assert argmax_logits((logits, None), None).tolist() == [[3, 1]]


def test_ignore_pad_token_for_loss_labels_the_padding():
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    for value, pad_label in ((True, -100), (False, 0)):
        cfg = load_config({"model_name_or_path": "x", "dataset": "d", "ignore_pad_token_for_loss": value},
                          build_training_args=False)
        assert build_collator(cfg, tok)(rows)["labels"].tolist() == [[-100, 6, 7], [5, pad_label, pad_label]]


def test_run_reports_per_dataset_accuracy_and_effective_tokens(data_dir, tmp_path, tiny_qwen3_path, monkeypatch):
    import transformers

    from loraforge.train.workflow import run_train

    samplers, locals_ = [], []
    real_sampler = transformers.Trainer._get_train_sampler
    real_first = transformers.TrainingArguments.main_process_first

    def sampler_spy(self, *args, **kwargs):
        samplers.append(real_sampler(self, *args, **kwargs))
        return samplers[-1]

    def first_spy(self, local=True, desc="work"):
        locals_.append(local)
        return real_first(self, local=local, desc=desc)

    monkeypatch.setattr(transformers.Trainer, "_get_train_sampler", sampler_spy)
    monkeypatch.setattr(transformers.TrainingArguments, "main_process_first", first_spy)
    base = {"model_name_or_path": "tiny-random-qwen3", "dataset": "a", "eval_dataset": "a,b",
            "dataset_dir": str(data_dir), "template": "qwen3", "cutoff_len": 48, "per_device_train_batch_size": 4,
            "max_steps": 2, "learning_rate": 1e-3, "report_to": "none", "do_eval": True, "save_steps": 100,
            "data_cache_dir": str(tmp_path / "cache")}
    on = {"compute_accuracy": True, "eval_on_each_dataset": True, "include_effective_tokens_per_second": True,
          "disable_shuffling": True, "data_shared_file_system": True}
    metrics = run_train(load_config({**base, **on, "output_dir": str(tmp_path / "on")})).metrics
    for name in ("a", "b"):
        assert metrics[f"eval_{name}_loss"] > 0
        assert 0.0 <= metrics[f"eval_{name}_accuracy"] <= 1.0
    assert "eval_loss" not in metrics
    assert metrics["effective_tokens_per_sec"] > 0
    assert isinstance(samplers[-1], SequentialSampler) and locals_[-1] is False

    metrics = run_train(load_config({**base, "output_dir": str(tmp_path / "off")})).metrics
    assert metrics["eval_loss"] > 0
    assert not any(k.endswith("accuracy") or k.startswith("eval_a_") for k in metrics)
    assert "effective_tokens_per_sec" not in metrics
    assert isinstance(samplers[-1], RandomSampler) and locals_[-1] is True
