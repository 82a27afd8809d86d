"""dataset_info.json entries and file reading: every file type, folders, JSON Lines named .json, file_sha1,
hub entries offline, unsupported options, dataset_dir resolution."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest

from loraforge.data.readers import read_rows
from loraforge.data.registry import get_dataset_attr, parse_entry, resolve_dataset_dir, write_dataset_info_entry
from loraforge.errors import DataError
from test_data_fakes import alpaca_rows, write_info, write_json


def _rows(tmp_path: Path, entry: dict) -> list:
    write_info(tmp_path, {"d": entry})
    return list(read_rows(get_dataset_attr("d", tmp_path), tmp_path))


def test_defaults_follow_llama_factory():
    alpaca = parse_entry("a", {"file_name": "a.json"})
    assert alpaca.formatting == "alpaca" and alpaca.load_from == "file"
    assert (alpaca.column("prompt"), alpaca.column("query"), alpaca.column("response")) == ("instruction", "input",
                                                                                            "output")
    share = parse_entry("s", {"file_name": "s.json", "formatting": "sharegpt", "tags": {"user_tag": "user"}})
    assert share.column("messages") == "conversations"
    assert share.tag("role_tag") == "from" and share.tag("user_tag") == "user" and share.tag("assistant_tag") == "gpt"
    assert share.tag("function_tag") == "function_call" and share.tag("observation_tag") == "observation"
    openai = parse_entry("o", {"file_name": "o.json", "formatting": "openai"})
    assert openai.column("messages") == "messages" and openai.tag("observation_tag") == "tool"


def test_every_file_type_reads_the_same_rows(tmp_path):
    rows = alpaca_rows(4)
    write_json(tmp_path / "a.json", rows)
    write_json(tmp_path / "b.jsonl", rows, lines=True)
    write_json(tmp_path / "c.json", rows, lines=True)  # JSON Lines content behind a .json name
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "e.parquet")
    import datasets

    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for name in ("a.json", "b.jsonl", "c.json", "d.csv", "e.parquet", str(arrow)):
        got = [r.data for r in _rows(tmp_path, {"file_name": name})]
        assert got == rows, name
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\n", encoding="utf-8")
    got = _rows(tmp_path, {"file_name": "t.txt", "columns": {"prompt": "text"}})
    assert [(r.data["text"], r.index) for r in got] == [("first line", 0), ("second line", 2)]


def test_folder_of_one_type_and_mixed_folder(tmp_path):
    write_json(tmp_path / "parts" / "1.jsonl", alpaca_rows(2), lines=True)
    write_json(tmp_path / "parts" / "2.jsonl", alpaca_rows(3, start=2), lines=True)
    got = _rows(tmp_path, {"file_name": "parts"})
    assert [r.data["instruction"] for r in got] == [r["instruction"] for r in alpaca_rows(5)]
    assert [r.file for r in got] == ["1.jsonl"] * 2 + ["2.jsonl"] * 3
    (tmp_path / "parts" / "3.csv").write_text("instruction,output\nx,y\n", encoding="utf-8")
    with pytest.raises(DataError, match="mixes file types"):
        _rows(tmp_path, {"file_name": "parts"})


def test_bad_json_line_becomes_a_row_problem_not_a_crash(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "broken"\n', encoding="utf-8")
    got = _rows(tmp_path, {"file_name": "x.jsonl"})
    assert got[1].index == 1 and "__bad_json__" in got[1].data


def test_file_sha1_verified_when_set_and_ignored_when_empty(tmp_path):
    path = write_json(tmp_path / "a.json", alpaca_rows(2))
    good = hashlib.sha1(path.read_bytes()).hexdigest()
    assert len(_rows(tmp_path, {"file_name": "a.json", "file_sha1": good})) == 2
    assert len(_rows(tmp_path, {"file_name": "a.json", "file_sha1": ""})) == 2
    with pytest.raises(DataError, match="SHA-1"):
        _rows(tmp_path, {"file_name": "a.json", "file_sha1": "0" * 40})


def test_hub_entry_offline_names_dataset_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        _rows(tmp_path, {"hf_hub_url": "llamafactory/alpaca_en"})
    text = str(err.value)
    assert "'d'" in text and "llamafactory/alpaca_en" in text and "file_name" in text and "download" in text


@pytest.mark.parametrize("entry,match", [
    ({"file_name": "a.json", "ranking": True}, "ranking"),
    ({"file_name": "a.json", "formatting": "xml"}, "formatting"),
    ({"formatting": "alpaca"}, "file_name"),
    ({"file_name": "a.json", "columns": {"promt": "q"}}, "promt"),
    ({"file_name": "a.json", "num_samples": 0}, "num_samples"),
])
def test_bad_entries_are_refused_with_the_key(entry, match):
    with pytest.raises(DataError, match=match):
        parse_entry("d", entry)


def test_unknown_dataset_suggests_close_names(tmp_path):
    write_info(tmp_path, {"alpaca_en_demo": {"file_name": "a.json"}})
    with pytest.raises(DataError, match="alpaca_en_demo"):
        get_dataset_attr("alpaca_en_dem", tmp_path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        _rows(tmp_path, {"file_name": "nope.json"})


def test_dataset_dir_relative_to_cwd_then_config_folder(tmp_path, monkeypatch):
    (tmp_path / "proj" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_dataset_dir("proj/data") == Path("proj/data")
    assert resolve_dataset_dir("data", tmp_path / "proj") == tmp_path / "proj" / "data"
    with pytest.raises(DataError) as err:
        resolve_dataset_dir("missing", tmp_path / "proj")
    assert "config file's folder" in str(err.value) and str(tmp_path / "proj" / "missing") in str(err.value)


def test_write_entry_is_atomic_and_keeps_others(tmp_path):
    write_info(tmp_path, {"old": {"file_name": "o.json"}})
    path, replaced = write_dataset_info_entry(tmp_path, "new", {"file_name": "n.json", "formatting": "sharegpt"})
    assert not replaced
    info = json.loads(path.read_text())
    assert list(info) == ["old", "new"]
    _, replaced = write_dataset_info_entry(tmp_path, "old", {"file_name": "o2.json"})
    assert replaced and json.loads(path.read_text())["old"]["file_name"] == "o2.json"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    with pytest.raises(DataError):
        write_dataset_info_entry(tmp_path, "bad", {"formatting": "nope"})
    assert "bad" not in json.loads(path.read_text())
    assert os.access(path, os.R_OK)
