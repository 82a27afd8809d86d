"""Dataset files that are not plain UTF-8: BOM-marked UTF-8/UTF-16 read as they are; anything else stops with one
error naming the file, line and byte, the encoding it looks like and the iconv fix, in training and in
`data check` / `data convert`. An empty file says it holds no rows; `data convert` on a full disk says so."""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import os
from pathlib import Path

import pytest
import yaml

from loraforge.cli import main
from loraforge.data.convert import convert_file
from loraforge.data.loader import load_conversations
from loraforge.data.textfile import guess_encoding
from loraforge.errors import DataError

ROWS = [{"instruction": "把这句话翻译成英文：你好，世界", "input": "", "output": "Hello, world"},
        {"instruction": "中国的首都是哪里？", "input": "", "output": "北京是中国的首都。"}]


class _Args:
    """The data arguments load_conversations reads."""

    max_samples = None
    max_bad_ratio = 0.0
    mix_strategy = "concat"
    interleave_probs = None

    def __init__(self, dataset_dir: Path):
        self.dataset_dir = str(dataset_dir)


def _register(folder: Path, name: str, file_name: str, **entry) -> None:
    info = folder / "dataset_info.json"
    data = json.loads(info.read_text()) if info.exists() else {}
    data[name] = {"file_name": file_name, **entry}
    info.write_text(json.dumps(data), encoding="utf-8")


def _texts(folder: Path, name: str) -> list[tuple[str, str]]:
    convs, _ = load_conversations(_Args(folder), name)
    return [(c.messages[0].content, c.messages[-1].content) for c in convs]


def _as_jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _as_csv(rows) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["instruction", "input", "output"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@pytest.mark.parametrize("bom,codec", [(codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                                       (codecs.BOM_UTF16_BE, "utf-16-be")], ids=["utf8-bom", "utf16le", "utf16be"])
@pytest.mark.parametrize("suffix,render", [(".json", lambda r: json.dumps(r, ensure_ascii=False)),
                                           (".jsonl", _as_jsonl), (".csv", _as_csv)], ids=["json", "jsonl", "csv"])
def test_files_with_a_byte_order_mark_read_as_they_are(tmp_path, bom, codec, suffix, render):
    (tmp_path / f"d{suffix}").write_bytes(bom + render(ROWS).encode(codec))
    _register(tmp_path, "d", f"d{suffix}")
    assert _texts(tmp_path, "d") == [(r["instruction"], r["output"]) for r in ROWS]


def test_gbk_file_names_file_line_byte_encoding_and_iconv(tmp_path):
    path = tmp_path / "zh.jsonl"
    path.write_bytes(_as_jsonl(ROWS).encode("gbk"))
    _register(tmp_path, "zh", "zh.jsonl")
    with pytest.raises(DataError) as caught:
        _texts(tmp_path, "zh")
    text = str(caught.value)
    first = _as_jsonl(ROWS).encode("gbk").index(b"\xb0")  # the first non-ASCII byte (of 把)
    assert f"dataset 'zh': {path} is not UTF-8: line 1, byte {first + 1} (offset {first}, 0xb0)" in text
    assert "it looks like GBK/GB18030 (Simplified Chinese)" in text
    assert f"iconv -f GB18030 -t UTF-8 {path} > {tmp_path / 'zh.utf8.jsonl'}" in text


def test_bad_byte_on_a_later_line_is_located(tmp_path):
    path = tmp_path / "late.json"
    good = json.dumps([{"instruction": "Say hi.", "output": "hi"}], indent=1)  # several good lines first
    path.write_bytes(good[:-1].encode() + ',\n{"instruction": "caf'.encode() + "é".encode("cp1252")
                     + b'", "output": "x"}\n]')
    _register(tmp_path, "late", "late.json")
    lines = good.count("\n") + 2
    with pytest.raises(DataError, match=rf"(?s)line {lines}, byte 21 .*0xe9.*Windows-1252.*iconv -f WINDOWS-1252"):
        _texts(tmp_path, "late")


@pytest.mark.parametrize("codec,expected", [("big5", "BIG5"), ("shift_jis", "SHIFT_JIS"), ("euc_kr", "EUC-KR"),
                                            ("utf-16-le", "UTF-16LE")])
def test_other_encodings_are_recognised(tmp_path, codec, expected):
    text = {"big5": "這是繁體中文的測試資料", "shift_jis": "これは日本語のテストです",
            "euc_kr": "이것은 한국어 테스트입니다", "utf-16-le": "plain text"}[codec]
    path = tmp_path / "f.txt"
    path.write_bytes(text.encode(codec))
    assert guess_encoding(path)[2] == expected


def test_data_check_and_convert_give_the_same_error(tmp_path, tiny_qwen3_path, capsys):
    (tmp_path / "zh.json").write_bytes(json.dumps(ROWS, ensure_ascii=False).encode("gb18030"))
    _register(tmp_path, "zh", "zh.json")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "tiny-random-qwen3", "dataset": "zh", "template": "qwen3",
                                   "dataset_dir": str(tmp_path)}), encoding="utf-8")
    assert main(["data", "check", str(cfg)]) == DataError.exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is not UTF-8: line 1" in err and "iconv -f GB18030" in err

    src = tmp_path / "zh.jsonl"
    src.write_bytes(_as_jsonl(ROWS).encode("gbk"))
    assert main(["data", "convert", str(src), str(tmp_path / "out.json")]) == DataError.exit_code
    err = capsys.readouterr().err
    assert f"{src} is not UTF-8: line 1" in err and "iconv -f GB18030" in err
    assert not (tmp_path / "out.json").exists() and not list(tmp_path.glob(".out.json.*"))
    src.write_bytes(codecs.BOM_UTF16_LE + _as_jsonl(ROWS).encode("utf-16-le"))
    assert convert_file(src, tmp_path / "out.json").written == 2


@pytest.mark.parametrize("content", ["[]", "", "\n\n"], ids=["empty-list", "empty-file", "blank-lines"])
def test_empty_file_says_it_holds_no_rows(tmp_path, content):
    (tmp_path / "empty.json").write_text(content, encoding="utf-8")
    _register(tmp_path, "empty", "empty.json")
    with pytest.raises(DataError, match=rf"dataset 'empty' \(train\): {tmp_path / 'empty.json'} holds no rows") as e:
        _texts(tmp_path, "empty")
    assert "formatting" not in str(e.value)


def test_data_convert_on_a_full_disk_one_message_no_partial_file(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(_as_jsonl(ROWS), encoding="utf-8")
    real = os.fdopen

    class _Full:
        """The output file: every write finds the disk full."""

        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _Full(real(fd, *a, **k)))
    assert main(["data", "convert", str(src), str(tmp_path / "out.json")]) == DataError.exit_code
    err = capsys.readouterr().err
    assert f"the disk filled up while trying to write out.json in {tmp_path}: it needs about" in err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
