"""load_conversations / build_datasets: mixing, sampling, splitting, reporting, caching, workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.config import load_config
from loraforge.data.loader import build_datasets, load_conversations
from loraforge.data.mixing import mix, split_eval
from loraforge.errors import DataError
from test_data_fakes import FakeChatML, alpaca_rows, char_tokenizer, sharegpt_rows, write_info, write_json


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    write_json(d / "a.json", alpaca_rows(40))
    write_json(d / "s.json", sharegpt_rows(20), lines=True)
    write_info(d, {"a": {"file_name": "a.json"},
                   "s": {"file_name": "s.json", "formatting": "sharegpt", "columns": {"system": "system"}}})
    return d


def _cfg(data_dir: Path, **kw):
    raw = {"model_name_or_path": "unused", "dataset": "a", "dataset_dir": str(data_dir), "cutoff_len": 256,
           "data_cache_dir": str(data_dir.parent / "cache"), **kw}
    return load_config(raw, purpose="data", build_training_args=False)


def test_mix_strategies():
    a, b = ["a0", "a1", "a2"], ["b0"]
    assert mix([a, b], "concat") == ["a0", "a1", "a2", "b0"]
    assert mix([a, b], "interleave_under") == ["a0", "b0"]
    assert mix([a, b], "interleave_over") == ["a0", "b0", "a1", "b0", "a2", "b0"]
    drawn = mix([list(range(1000)), [-1] * 1000], "interleave_under", [0.8, 0.2], seed=1)
    share = sum(x == -1 for x in drawn) / len(drawn)
    assert 0.1 < share < 0.3


def test_split_eval_fraction_and_count():
    train, held = split_eval(list(range(10)), 0.25)
    assert (len(train), len(held)) == (7, 3) and sorted(train + held) == list(range(10))
    train, held = split_eval(list(range(10)), 4)
    assert len(held) == 4
    with pytest.raises(DataError, match="leaves none"):
        split_eval(list(range(3)), 3)


def test_load_conversations_counts_and_max_samples(data_dir):
    cfg = _cfg(data_dir, max_samples=5)
    convs, report = load_conversations(cfg.data, "a, s")
    assert len(convs) == 10 and convs[0].meta["dataset"] == "a" and convs[-1].meta["dataset"] == "s"
    assert [(d.name, d.read, d.kept, d.dropped) for d in report.datasets] == [("a", 5, 5, 0), ("s", 5, 5, 0)]
    convs, _ = load_conversations(_cfg(data_dir, mix_strategy="interleave_under").data, ["a", "s"])
    assert [c.meta["dataset"] for c in convs[:4]] == ["a", "s", "a", "s"] and len(convs) == 40


def test_num_samples_oversamples(data_dir):
    info = json.loads((data_dir / "dataset_info.json").read_text())
    info["a"]["num_samples"] = 50
    write_info(data_dir, info)
    convs, report = load_conversations(_cfg(data_dir).data, "a")
    assert len(convs) == 50 and len({c.source for c in convs}) == 40
    assert any("num_samples" in n for n in report.notes)


def _with_bad_rows(data_dir: Path, n_bad: int) -> None:
    rows = alpaca_rows(40)
    for i in range(n_bad):
        del rows[3 + i]["output"]
    write_json(data_dir / "a.json", rows)


def test_a_few_bad_rows_are_dropped_and_reported(data_dir):
    _with_bad_rows(data_dir, 2)  # 5% of 40: allowed
    convs, report = load_conversations(_cfg(data_dir).data, "a")
    assert len(convs) == 38 and report.dropped == 2
    assert str(report.problems[0]).startswith("a: a.json:row 3: `output`: missing")
    assert "a [train]: 40 rows read, 38 kept, 2 dropped" in "\n".join(report.lines())


def test_too_many_bad_rows_fail_with_file_row_and_field(data_dir):
    _with_bad_rows(data_dir, 3)  # 7.5% > 5%
    with pytest.raises(DataError) as err:
        load_conversations(_cfg(data_dir).data, "a")
    text = str(err.value)
    assert "3 of 40 rows are bad" in text and "a.json:row 3: `output`" in text and "max_bad_ratio" in text
    convs, _ = load_conversations(_cfg(data_dir, max_bad_ratio=0.1).data, "a")
    assert len(convs) == 37


def test_nothing_usable_fails(data_dir):
    write_json(data_dir / "a.json", [{"question": "x", "answer": "y"}] * 3)
    with pytest.raises(DataError, match="no usable rows"):
        load_conversations(_cfg(data_dir).data, "a")


def test_dataset_dir_relative_to_the_config_file(data_dir, tmp_path, monkeypatch):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(f"model_name_or_path: unused\ndataset: a\ndataset_dir: data\n"
                        f"data_cache_dir: {tmp_path / 'cache'}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(cfg_path), purpose="data", build_training_args=False)
    bundle = build_datasets(cfg, char_tokenizer(), FakeChatML())
    assert len(bundle.train) == 40


def test_build_datasets_columns_labels_and_val_split(data_dir, tok):
    cfg = _cfg(data_dir, dataset="a,s", val_size=0.1)
    bundle = build_datasets(cfg, tok, FakeChatML())
    assert set(bundle.train.column_names) == {"input_ids", "attention_mask", "labels"}
    assert (len(bundle.train), len(bundle.eval), len(bundle.eval_conversations)) == (54, 6, 6)
    row = bundle.train[0]
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])
    trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert tok.decode(trained).endswith("<|im_end|>\n") and "<|im_start|>" not in tok.decode(trained)
    assert bundle.report.tokens["train"].examples == 54


def test_eval_dataset_and_predict_purpose(data_dir, tok):
    cfg = _cfg(data_dir, dataset="a", eval_dataset="s")
    bundle = build_datasets(cfg, tok, FakeChatML())
    assert len(bundle.train) == 40 and len(bundle.eval) == 20 and len(bundle.eval_conversations) == 20
    pred = build_datasets(cfg, tok, FakeChatML(), purpose="predict")
    assert pred.train is None and len(pred.eval_conversations) == 20


def test_truncation_is_counted_and_untrainable_examples_dropped(data_dir, tok):
    bundle = build_datasets(_cfg(data_dir, dataset="s", cutoff_len=50), tok, FakeChatML())
    stats = bundle.report.tokens["train"]
    assert stats.truncated == 20 and stats.max > 50
    assert max(len(x) for x in bundle.train["input_ids"]) <= 50
    with pytest.raises(DataError, match="no trained token left after truncation to cutoff_len=30"):
        build_datasets(_cfg(data_dir, dataset="s", cutoff_len=30), tok, FakeChatML())


def test_template_refusals_are_row_problems(data_dir, tok):
    rows = sharegpt_rows(20)
    rows[4]["conversations"][2]["from"] = "observation"
    write_json(data_dir / "s.json", rows)
    bundle = build_datasets(_cfg(data_dir, dataset="s", max_bad_ratio=0.1), tok, FakeChatML(refuse_role="observation"))
    assert len(bundle.train) == 19
    assert "s.json:row 4: `template`" in str(bundle.report.problems[0])


def test_packing_and_neat_packing_columns(data_dir, tok):
    bundle = build_datasets(_cfg(data_dir, dataset="a", cutoff_len=128, neat_packing=True), tok, FakeChatML())
    assert "position_ids" in bundle.train.column_names
    assert bundle.report.tokens["train"].packed_sequences == len(bundle.train) < 40
    assert all(len(x) <= 128 for x in bundle.train["input_ids"])
    assert sum(p.count(0) for p in bundle.train["position_ids"]) == 40  # one restart per example


def test_pretraining_text_is_chunked(tmp_path, tok):
    d = tmp_path / "data"
    (d).mkdir()
    (d / "c.txt").write_text("\n".join(f"line number {i}" for i in range(30)), encoding="utf-8")
    write_info(d, {"c": {"file_name": "c.txt", "columns": {"prompt": "text"}}})
    cfg = load_config({"model_name_or_path": "x", "dataset": "c", "dataset_dir": str(d), "stage": "pt",
                       "cutoff_len": 64, "data_cache_dir": str(tmp_path / "cache")}, purpose="data",
                      build_training_args=False)
    bundle = build_datasets(cfg, tok, None)
    lengths = [len(x) for x in bundle.train["input_ids"]]
    assert all(n == 64 for n in lengths[:-1]) and bundle.train[0]["labels"] == bundle.train[0]["input_ids"]
    text = tok.decode([t for x in bundle.train["input_ids"] for t in x])
    assert text.startswith("line number 0<|im_end|>line number 1<|im_end|>")


def test_cache_is_reused_and_never_stale(data_dir, tok):
    first = build_datasets(_cfg(data_dir), tok, FakeChatML())
    assert first.report.cache.startswith("built")
    again = build_datasets(_cfg(data_dir), tok, FakeChatML())
    assert again.report.cache.startswith("loaded") and again.train["input_ids"] == first.train["input_ids"]
    assert again.report.kept == 40
    # editing the data file (same size, same name) gives new tokens
    rows = alpaca_rows(40)
    rows[0]["output"] = "The sum is X."
    write_json(data_dir / "a.json", rows)
    edited = build_datasets(_cfg(data_dir), tok, FakeChatML())
    assert edited.report.cache.startswith("built")
    assert "X" in tok.decode([t for x in edited.train["input_ids"] for t in x])
    # max_samples is part of the key
    fewer = build_datasets(_cfg(data_dir, max_samples=7), tok, FakeChatML())
    assert len(fewer.train) == 7 and fewer.report.cache.startswith("built")
    # so are the template and the rendering switches
    assert build_datasets(_cfg(data_dir, train_on_prompt=True), tok, FakeChatML()).report.cache.startswith("built")
    # process-only settings are not, and overwrite_cache rebuilds
    assert build_datasets(_cfg(data_dir, preprocessing_num_workers=2), tok,
                          FakeChatML()).report.cache.startswith("loaded")
    assert build_datasets(_cfg(data_dir, overwrite_cache=True), tok, FakeChatML()).report.cache.startswith("built")


def test_two_workers_give_the_same_tokens(data_dir, tok):
    one = build_datasets(_cfg(data_dir, dataset="a,s", overwrite_cache=True), tok, FakeChatML())
    two = build_datasets(_cfg(data_dir, dataset="a,s", overwrite_cache=True, preprocessing_num_workers=2,
                              preprocessing_batch_size=7), tok, FakeChatML())
    assert one.train["input_ids"] == two.train["input_ids"] and one.train["labels"] == two.train["labels"]


@pytest.mark.parametrize("name", ["chatml", "qwen3"])
def test_real_template_trains_exactly_the_answers(data_dir, tiny_qwen3_path, name):
    from transformers import AutoTokenizer

    from loraforge.data.templates import resolve_template

    qwen_tok = AutoTokenizer.from_pretrained(tiny_qwen3_path)
    cfg = _cfg(data_dir, dataset="s", template=name, preprocessing_num_workers=2, preprocessing_batch_size=8)
    bundle = build_datasets(cfg, qwen_tok, resolve_template(cfg.data, qwen_tok))
    assert len(bundle.train) == 20
    row = bundle.train[3]
    text = qwen_tok.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 3<|im_end|>\n")
    trained = qwen_tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])
    assert "Hi 3" not in trained and "Hello 3!<|im_end|>" in trained and trained.rstrip().endswith("Bye 3.<|im_end|>")
    assert "<|im_start|>" not in trained and "user" not in trained


def test_interleave_over_refuses_a_zero_probability():
    with pytest.raises(DataError, match="> 0"):
        mix([[1], [2]], "interleave_over", [1.0, 0.0])


def test_tokenized_path_is_saved_then_loaded(data_dir, tok):
    path = data_dir.parent / "tokenized"
    first = build_datasets(_cfg(data_dir, tokenized_path=str(path)), tok, FakeChatML())
    assert first.report.cache.startswith("built") and (path / "train").is_dir()
    again = build_datasets(_cfg(data_dir, tokenized_path=str(path)), tok, FakeChatML())
    assert again.report.cache == f"loaded from {path}" and len(again.train) == 40
