"""`loraforge data convert | register | check | preview` through the real CLI entry point."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from loraforge.cli import main
from loraforge.config import load_config
from loraforge.data import command
from loraforge.data.convert import convert_file
from loraforge.data.loader import load_conversations
from loraforge.data.registry import get_dataset_attr
from test_data_fakes import FakeChatML, alpaca_rows, char_tokenizer, write_info, write_json


def _sharegpt_line(i: int) -> dict:
    return {"conversations": [{"from": "system", "value": "你是助手 🤖"}, {"from": "human", "value": f"问题 {i}"},
                              {"from": "gpt", "value": f"答案 {i} 😀"}]}


def _jsonl(path: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    bad = bad or {}
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(1, n + 1):
            fh.write(bad.get(i, json.dumps(_sharegpt_line(i), ensure_ascii=False)) + "\n")
    return path


def test_convert_reports_bad_lines_keeps_unicode_and_reads_back(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", 50, bad={7: "{not json", 20: json.dumps(
        {"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]})})
    out = tmp_path / "data" / "out.json"
    assert main(["data", "convert", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 48 rows" in printed and "line 7: `(line)`: invalid JSON" in printed
    assert "line 20: `conversations[1].from`: unknown role 'robot'" in printed
    raw = out.read_text(encoding="utf-8")
    assert "答案 1 😀" in raw  # non-ASCII kept as is, not \\u escapes
    rows = json.loads(raw)
    assert len(rows) == 48 and rows[0]["system"] == "你是助手 🤖"
    assert rows[0]["conversations"] == [{"from": "human", "value": "问题 1"}, {"from": "gpt", "value": "答案 1 😀"}]
    entry = json.loads(printed[printed.index("{"):])
    write_info(out.parent, {"conv": entry})
    cfg = load_config({"model_name_or_path": "x", "dataset": "conv", "dataset_dir": str(out.parent)},
                      purpose="data", build_training_args=False)
    convs, report = load_conversations(cfg.data, "conv")
    assert len(convs) == 48 and report.dropped == 0 and convs[5].system == "你是助手 🤖"


def test_convert_to_openai_and_alpaca_with_limit(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"instruction": "Q1", "input": "", "output": "A1", "history": [["h", "a"]]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    write_json(src, rows, lines=True)
    res = convert_file(src, tmp_path / "o.json", to="openai", limit=2)
    got = json.loads((tmp_path / "o.json").read_text())
    assert res.written == 2 and got[1] == {"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "yo"}]}
    assert got[0]["messages"][:2] == [{"role": "user", "content": "h"}, {"role": "assistant", "content": "a"}]
    res = convert_file(src, tmp_path / "a.json", to="alpaca")
    got = json.loads((tmp_path / "a.json").read_text())
    assert got[0] == {"instruction": "Q1", "input": "", "output": "A1", "history": [["h", "a"]]}
    assert res.entry["columns"]["history"] == "history" and res.entry["formatting"] == "alpaca"


def test_convert_streams_in_constant_memory(tmp_path):
    src = _jsonl(tmp_path / "big.jsonl", 10000)
    tracemalloc.start()
    res = convert_file(src, tmp_path / "big.json")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert res.written == 10000
    assert peak < 1_000_000 < src.stat().st_size  # far below the file size: nothing is accumulated


def test_register_infers_columns_and_tags(tmp_path, capsys):
    data = tmp_path / "data"
    write_json(data / "chat.json", [{"messages": [{"role": "system", "content": "s"},
                                                  {"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}]}] * 3)
    assert main(["data", "register", "chat", str(data / "chat.json"), "--formatting", "sharegpt",
                 "--dataset_dir", str(data)]) == 0
    assert "added 'chat'" in capsys.readouterr().out
    attr = get_dataset_attr("chat", data)
    assert attr.path == "chat.json" and attr.column("messages") == "messages"
    assert (attr.tag("role_tag"), attr.tag("content_tag"), attr.tag("user_tag")) == ("role", "content", "user")
    write_json(tmp_path / "elsewhere.jsonl", [{"instruction": "i", "output": "o", "system": "s"}], lines=True)
    assert main(["data", "register", "chat", str(tmp_path / "elsewhere.jsonl"), "--formatting", "alpaca",
                 "--dataset_dir", str(data)]) == 0
    assert "updated 'chat'" in capsys.readouterr().out
    attr = get_dataset_attr("chat", data)
    assert Path(attr.path).is_absolute() and attr.column("system") == "system" and attr.formatting == "alpaca"


@pytest.fixture
def project(tmp_path, monkeypatch):
    data = tmp_path / "data"
    rows = alpaca_rows(30)
    del rows[4]["output"]
    write_json(data / "a.json", rows)
    write_info(data, {"a": {"file_name": "a.json"}})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: unused\ndataset: a\ndataset_dir: data\ncutoff_len: 40\n"
                   f"data_cache_dir: {tmp_path / 'cache'}\n")
    tok = char_tokenizer()
    monkeypatch.setattr(command, "_tokenizer_and_template", lambda cfg: (tok, FakeChatML()))
    return cfg


def test_check_prints_report_and_fails_over_the_limit(project, capsys):
    assert main(["data", "check", str(project)]) == 0
    out = capsys.readouterr().out
    assert "a [train]: 30 rows read, 29 kept, 1 dropped" in out and "a.json:row 4: `output`: missing" in out
    assert "truncated to cutoff_len=40" in out and "length before truncation" in out and "OK:" in out
    assert main(["data", "check", str(project), "max_bad_ratio=0.01"]) == 1
    assert "FAIL: a [train]" in capsys.readouterr().err


def test_preview_marks_trained_tokens(project, capsys):
    assert main(["data", "preview", str(project), "--index", "2", "--no-color", "cutoff_len=100"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>user\nAdd 2 and 3.\nnumbers 2<|im_end|>\n<|im_start|>assistant\n" \
           "[[The sum is 5.<|im_end|>\n]]" in out
    assert "(a: a.json:row 2)" in out
    assert main(["data", "preview", str(project), "--index", "99"]) == 2


def test_check_with_the_builtin_model_and_real_template(tmp_path, tiny_qwen3_path, capsys):
    data = tmp_path / "data"
    write_json(data / "a.json", alpaca_rows(12))
    write_info(data, {"a": {"file_name": "a.json"}})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_qwen3_path}\ndataset: a\ndataset_dir: {data}\ntemplate: qwen3\n"
                   f"cutoff_len: 32\ndata_cache_dir: {tmp_path / 'cache'}\n")
    assert main(["data", "check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "template: qwen3" in out and "a [train]: 12 rows read, 12 kept, 0 dropped" in out
    assert "train: 12 examples" in out and "truncated to cutoff_len=32: " in out
