"""`loraforge predict` on the tiny random Qwen3: rows in order, batched = one-by-one greedy, metrics files,
resume after an interruption, determinism, sampling with a seed, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from loraforge.config import load_config  # noqa: E402
from loraforge.errors import DataError  # noqa: E402
from loraforge.evaluate.metrics import compute_metrics  # noqa: E402
from loraforge.evaluate.predict import PREDICTIONS_FILE, batch_plan, run_predict  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Greedy; the penalty keeps the random tiny model from answering only newlines, so answers differ per prompt.
PENALTY = 1.5
ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "把这句话翻译成英文。", "input": "今天天气很好", "output": "The weather is nice today."},
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "What is 12 times 6? Explain your reasoning step by step before answering.", "input": "",
     "output": "12 * 6 = 72\n#### 72"},
    {"instruction": "用一句话介绍北京。", "input": "", "output": "北京是中国的首都。"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("predict_data")
    (folder / "demo_eval.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"demo_eval": {"file_name": "demo_eval.json"}}))
    return folder


def make_cfg(tiny_qwen3_path, data_dir, out: Path, **extra):
    raw = {"model_name_or_path": str(tiny_qwen3_path), "template": "qwen3", "eval_dataset": "demo_eval",
           "dataset_dir": str(data_dir), "output_dir": str(out), "max_new_tokens": 6, "predict_batch_size": 3,
           "data_cache_dir": str(out.parent / "cache"), "repetition_penalty": PENALTY, **extra}
    return load_config(raw, purpose="predict")


@pytest.fixture(scope="module")
def loaded(tiny_qwen3_path, data_dir, tmp_path_factory):
    from loraforge.models.loader import load_model, load_tokenizer

    cfg = make_cfg(tiny_qwen3_path, data_dir, tmp_path_factory.mktemp("p") / "out")
    tokenizer = load_tokenizer(cfg.model)
    return load_model(cfg, tokenizer, is_trainable=False), tokenizer


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()]


def test_batch_plan_sorts_longest_first_and_keeps_every_index():
    plan = batch_plan([5, 1, 9, 3, 9], 2)
    assert plan == [[2, 4], [0, 3], [1]]


def test_predict_rows_metrics_and_batched_equals_single(tiny_qwen3_path, data_dir, tmp_path, loaded):
    model, tokenizer = loaded
    out = tmp_path / "run"
    out.mkdir()
    (out / "all_results.json").write_text(json.dumps({"train_loss": 1.25}))
    cfg = make_cfg(tiny_qwen3_path, data_dir, out)
    metrics = run_predict(cfg, model, tokenizer)
    rows = _rows(out)
    assert len({r["predict"] for r in rows}) > 3
    assert [r["index"] for r in rows] == list(range(len(ROWS)))
    assert [r["label"] for r in rows] == [r["output"] for r in ROWS]
    assert rows[2]["prompt"].startswith("<|im_start|>user\n把这句话翻译成英文。")
    assert rows[2]["prompt"].endswith("<|im_start|>assistant\n")
    # the same greedy answers as generating one sample at a time without padding
    for r in rows:
        ids = tokenizer(r["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=6, do_sample=False, repetition_penalty=PENALTY,
                             eos_token_id=[151645, 151643])[0, ids.shape[1]:]
        new = [t for t in new.tolist() if t not in (151645, 151643)]
        assert r["predict"] == tokenizer.decode(new, skip_special_tokens=True)
    # metrics: the recomputed scores of the written rows, plus timing
    scores = compute_metrics([r["predict"] for r in rows], [r["label"] for r in rows])
    for key, value in scores.items():
        assert metrics[f"predict_{key}"] == pytest.approx(value, abs=1e-4)
    assert metrics["predict_samples"] == len(ROWS)
    assert metrics["predict_runtime"] > 0 and metrics["predict_samples_per_second"] > 0
    assert metrics["predict_generated_tokens"] <= 6 * len(ROWS)
    assert json.loads((out / "predict_results.json").read_text()) == metrics
    merged = json.loads((out / "all_results.json").read_text())
    assert merged["train_loss"] == 1.25 and merged["predict_bleu-4"] == metrics["predict_bleu-4"]
    # a second run over a complete file generates nothing and reproduces the scores
    again = run_predict(cfg, model, tokenizer)
    assert again["predict_generated_tokens"] == 0 and again["predict_bleu-4"] == metrics["predict_bleu-4"]
    # starting over gives identical predictions (greedy is deterministic)
    fresh = run_predict(make_cfg(tiny_qwen3_path, data_dir, out, predict_overwrite=True), model, tokenizer)
    assert _rows(out) == rows and fresh["predict_rouge-l"] == metrics["predict_rouge-l"]


class _Interrupting:
    """Wraps a model; raises KeyboardInterrupt on the ``fail_at``-th generate call and counts prompts."""

    def __init__(self, model, fail_at: int | None):
        self.model, self.fail_at, self.calls, self.prompts = model, fail_at, 0, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        self.prompts += kwargs["input_ids"].shape[0]
        return self.model.generate(**kwargs)


def test_interrupted_run_keeps_rows_and_resumes(tiny_qwen3_path, data_dir, tmp_path, loaded):
    model, tokenizer = loaded
    reference = tmp_path / "reference"
    run_predict(make_cfg(tiny_qwen3_path, data_dir, reference), model, tokenizer)
    out = tmp_path / "resumed"
    cfg = make_cfg(tiny_qwen3_path, data_dir, out)
    first = _Interrupting(model, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_predict(cfg, first, tokenizer)
    kept = _rows(out)
    assert len(kept) == 3  # the first batch was flushed before the interruption
    with open(out / PREDICTIONS_FILE, "a", encoding="utf-8") as f:
        f.write('{"index": 5, "prompt": "half a li')  # a line cut off mid-write
    second = _Interrupting(model, fail_at=None)
    metrics = run_predict(cfg, second, tokenizer)
    assert second.prompts == len(ROWS) - 3
    assert _rows(out) == _rows(reference)
    assert metrics["predict_samples"] == len(ROWS)


def test_file_from_another_eval_set_is_refused(tiny_qwen3_path, data_dir, tmp_path, loaded):
    model, tokenizer = loaded
    out = tmp_path / "other"
    out.mkdir()
    (out / PREDICTIONS_FILE).write_text(json.dumps({"index": 0, "prompt": "something else", "predict": "x",
                                                    "label": "y"}) + "\n")
    with pytest.raises(DataError, match="does not match this eval set"):
        run_predict(make_cfg(tiny_qwen3_path, data_dir, out), model, tokenizer)


def test_sampling_is_seeded(tiny_qwen3_path, data_dir, tmp_path, loaded):
    model, tokenizer = loaded
    runs = []
    for name in ("a", "b"):
        cfg = make_cfg(tiny_qwen3_path, data_dir, tmp_path / name, do_sample=True, temperature=1.5, top_p=1.0,
                       top_k=0, predict_seed=7)
        run_predict(cfg, model, tokenizer)
        runs.append([r["predict"] for r in _rows(tmp_path / name)])
    assert runs[0] == runs[1]


def test_cli_predict(tiny_qwen3_path, data_dir, tmp_path, capsys):
    from loraforge.cli import main

    out = tmp_path / "cli"
    config = tmp_path / "predict.yaml"
    config.write_text(f"model_name_or_path: {tiny_qwen3_path}\ntemplate: qwen3\neval_dataset: demo_eval\n"
                      f"dataset_dir: {data_dir}\noutput_dir: {out}\ndata_cache_dir: {tmp_path / 'cache'}\n")
    assert main(["predict", str(config), "max_new_tokens=4", "predict_batch_size=8"]) == 0
    assert len(_rows(out)) == len(ROWS)
    assert "predict_bleu-4" in capsys.readouterr().out
    assert set(json.loads((out / "predict_results.json").read_text())) >= {
        "predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_sacrebleu",
        "predict_exact_match", "predict_runtime", "predict_samples_per_second"}


def test_max_length_caps_each_rows_prompt_plus_answer(tiny_qwen3_path, data_dir, tmp_path, loaded):
    """max_new_tokens: 0 -> LLaMA-Factory's max_length: every row gets max_length minus its own prompt."""
    model, tokenizer = loaded
    out = tmp_path / "run"
    cfg = make_cfg(tiny_qwen3_path, data_dir, out, max_new_tokens=0, max_length=36)
    run_predict(cfg, model, tokenizer)
    rows = _rows(out)
    lengths = set()
    for r in rows:
        ids = tokenizer(r["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        lengths.add(ids.shape[1])
        new = model.generate(ids, max_new_tokens=36 - ids.shape[1], do_sample=False, repetition_penalty=PENALTY,
                             eos_token_id=[151645, 151643])[0, ids.shape[1]:]
        new = [t for t in new.tolist() if t not in (151645, 151643)]
        assert r["predict"] == tokenizer.decode(new, skip_special_tokens=True)
    assert len(lengths) > 2  # the rows' budgets really differ


def test_eval_num_beams_sets_the_beam_width(tiny_qwen3_path, data_dir, tmp_path, loaded, monkeypatch):
    import loraforge.evaluate.predict as predict

    widths = []
    real = predict.generate_batch

    def spy(model, prompts, params, **kw):
        widths.append(params.generate_kwargs().get("num_beams", 1))
        return real(model, prompts, params, **kw)

    monkeypatch.setattr(predict, "generate_batch", spy)
    model, tokenizer = loaded
    run_predict(make_cfg(tiny_qwen3_path, data_dir, tmp_path / "a", eval_num_beams=2), model, tokenizer)
    run_predict(make_cfg(tiny_qwen3_path, data_dir, tmp_path / "b", num_beams=3), model, tokenizer)
    assert widths == [2, 2, 2, 3, 3, 3]  # 7 rows in batches of 3; eval_num_beams unset -> num_beams
