"""LLaMA-Factory's habit: `train predict.yaml` with `do_predict: true`, `do_train: false` (or no `dataset`),
`eval_dataset` and `predict_with_generate: true` runs `loraforge predict`, writing the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from loraforge.train.workflow import predict_only  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "用一句话介绍北京。", "input": "", "output": "北京是中国的首都。"}]


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("text,overrides,expected", [
    ("do_predict: true\ndo_train: false\ndataset: x\n", [], True),
    ("do_predict: true\neval_dataset: x\n", [], True),  # LLaMA-Factory's example: no do_train, no dataset
    ("do_predict: true\ndataset: x\n", [], False),  # loraforge trains when there is data, then predicts
    ("do_predict: true\ndo_train: true\n", [], False),
    ("eval_dataset: x\n", [], False),
    ("dataset: x\n", ["do_predict=true", "do_train=false"], True),
    ("do_predict: true\ndo_train: false\n", ["--do_train", "true"], False),
])
def test_predict_only_rule(tmp_path, text, overrides, expected):
    assert predict_only(_write(tmp_path / "c.yaml", text), overrides) is expected


def test_train_command_runs_predict(tiny_qwen3_path, tmp_path, capsys):
    from loraforge.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "demo_eval.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"demo_eval": {"file_name": "demo_eval.json"}}))
    common = (f"model_name_or_path: {tiny_qwen3_path}\nstage: sft\nfinetuning_type: lora\neval_dataset: demo_eval\n"
              f"dataset_dir: {data}\ntemplate: qwen3\ncutoff_len: 256\nmax_samples: 50\noverwrite_cache: true\n"
              f"data_cache_dir: {tmp_path / 'cache'}\nmax_new_tokens: 5\nrepetition_penalty: 1.5\n")
    # the shape of LLaMA-Factory's examples/extras/nlg_eval/llama3_lora_predict.yaml
    via_train = tmp_path / "via_train"
    config = _write(tmp_path / "predict.yaml", common + f"do_predict: true\npredict_with_generate: true\n"
                    f"output_dir: {via_train}\noverwrite_output_dir: true\nper_device_eval_batch_size: 1\n"
                    "report_to: none\n")
    assert main(["train", config]) == 0
    assert "running `loraforge predict`" in capsys.readouterr().out
    assert not (via_train / "adapter_model.safetensors").exists()  # nothing was trained
    direct = tmp_path / "direct"
    assert main(["predict", config, f"output_dir={direct}"]) == 0

    def rows(folder: Path) -> list[dict]:
        return [json.loads(line) for line in (folder / "generated_predictions.jsonl").read_text().splitlines()]

    assert rows(via_train) == rows(direct)
    assert [r["label"] for r in rows(via_train)] == [r["output"] for r in ROWS]
    metrics = json.loads((via_train / "predict_results.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-l", "predict_exact_match"} <= set(metrics)
