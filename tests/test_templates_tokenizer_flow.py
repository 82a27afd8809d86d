"""`template: tokenizer` through the real pipeline on tiny-random-qwen3 (whose tokenizer carries the real Qwen3
chat template): the datasets equal those of the named `qwen3` template (also across data workers, which receive
the template by pickling), `data preview` shows the trained spans, and a short training run saves a tokenizer
that still carries the model's own chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from loraforge.cli import main  # noqa: E402
from loraforge.config import load_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [{"conversations": [{"from": "human", "value": f"What is {n} + {n}?"},
                           {"from": "gpt", "value": f"{2 * n}."},
                           {"from": "human", "value": "And doubled?"},
                           {"from": "gpt", "value": f"{4 * n}."}],
         "system": "Be brief." if n % 2 else ""} for n in range(12)]


@pytest.fixture()
def project(tmp_path: Path, tiny_qwen3_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "chat.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"chat": {
        "file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "system": "system"}}}))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_qwen3_path}\ndataset: chat\ndataset_dir: {data}\ncutoff_len: 64\n"
                   f"data_cache_dir: {tmp_path / 'cache'}\noutput_dir: {tmp_path / 'out'}\nreport_to: none\n"
                   "per_device_train_batch_size: 4\nmax_steps: 2\nlora_rank: 4\nlogging_steps: 1\n", encoding="utf-8")
    return cfg


def _datasets(project: Path, **over):
    from loraforge.data.loader import build_datasets
    from loraforge.data.templates import resolve_template
    from loraforge.models.loader import load_tokenizer

    cfg = load_config(str(project), [f"{k}={v}" for k, v in over.items()], purpose="data", build_training_args=False)
    tokenizer = load_tokenizer(cfg.model)
    template = resolve_template(cfg.data, tokenizer)
    bundle = build_datasets(cfg, tokenizer, template, purpose="data")
    return template, bundle.train


def test_datasets_equal_the_named_qwen3_templates(project):
    named, expected = _datasets(project, template="qwen3")
    ours, got = _datasets(project, template="tokenizer", preprocessing_num_workers=2)
    assert (named.name, ours.name) == ("qwen3", "tokenizer")
    assert got["input_ids"] == expected["input_ids"]
    assert got["labels"] == expected["labels"]


def test_preview_and_short_training_run(project, tmp_path, capsys):
    assert main(["data", "preview", str(project), "--no-color", "template=tokenizer", "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert "template tokenizer" in out
    assert "<|im_start|>assistant\n[[<think>\n\n</think>\n\n4.<|im_end|>\n]]" in out  # the last answer
    assert main(["train", str(project), "template=tokenizer"]) == 0
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    original = AutoTokenizer.from_pretrained(str(load_config(str(project), purpose="data",
                                                             build_training_args=False).model.model_name_or_path))
    assert saved.chat_template == original.chat_template
