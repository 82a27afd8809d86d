"""Faults during `export` and `predict`: a killed export leaves its folder complete or absent and the next run
cleans up after it; a full disk ends in one message; a killed predict resumes without duplicates or gaps."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest

from conftest import make_random_lora
from faultkit import die, hidden_leftovers, in_child, small_disk, snapshot, sums_setup
from loraforge.cli import main
from loraforge.config import load_config
from loraforge.errors import ExportError, LoraforgeError
from loraforge.evaluate.predict import PREDICTIONS_FILE, run_predict
from loraforge.evaluate.results import PredictionFile
from loraforge.export.workflow import run_export

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXPORT_FILES = ["README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                "out-q8_0.gguf", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tiny base model, its LoRA adapter, dataset_dir)."""
    folder = tmp_path_factory.mktemp("export_faults")
    model, data = sums_setup(folder)
    return model, make_random_lora(model, folder / "adapter"), data


def _export_cfg(setup, export_dir: Path) -> dict:
    model, adapter, _ = setup
    return {"model_name_or_path": str(model), "adapter_name_or_path": str(adapter), "export_dir": str(export_dir),
            "export_format": "both", "export_quantization": "q8_0", "export_ollama": False}


@pytest.fixture(scope="module")
def reference_export(setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    run_export(load_config(_export_cfg(setup, out), purpose="export"))
    assert sorted(p.name for p in out.iterdir()) == EXPORT_FILES
    return out


def _kill_in_merged_save():
    """Die after the merged safetensors are written, before the GGUF."""
    import loraforge.export.merge as merge

    real = merge.save_merged

    def save_merged(*args, **kwargs):
        real(*args, **kwargs)
        die()

    merge.save_merged = save_merged


def _kill_in_gguf_write():
    """Die with half a GGUF file written."""
    import loraforge.export.gguf as gguf

    def convert_to_gguf(source, target, *args, **kwargs):
        Path(target).write_bytes(b"GGUF" + b"\0" * 4096)
        die()

    gguf.convert_to_gguf = convert_to_gguf


@pytest.mark.parametrize("fault", [_kill_in_merged_save, _kill_in_gguf_write], ids=["merged", "gguf"])
def test_killed_export_is_absent_then_the_next_run_completes(setup, reference_export, tmp_path, fault):
    out = tmp_path / "out"
    cfg = _export_cfg(setup, out)

    def child():
        fault()
        run_export(load_config(cfg, purpose="export"))

    assert in_child(child) == -signal.SIGKILL
    assert not out.exists()  # absent, never half-written
    assert [n for n in hidden_leftovers(out) if ".tmp-" in n]  # the killed export's temporary folder...
    run_export(load_config(cfg, purpose="export"))
    assert hidden_leftovers(out) == []  # ...is removed by the next export, which completes
    assert sorted(p.name for p in out.iterdir()) == EXPORT_FILES
    assert (out / "model.safetensors").read_bytes() == (reference_export / "model.safetensors").read_bytes()
    assert (out / "out-q8_0.gguf").read_bytes() == (reference_export / "out-q8_0.gguf").read_bytes()


def test_killed_while_replacing_an_export_restores_the_previous_one(setup, reference_export, tmp_path):
    out = tmp_path / "out"
    cfg = _export_cfg(setup, out)
    run_export(load_config(cfg, purpose="export"))
    before = snapshot(out)

    def child():  # --overwrite: die once the previous export is moved aside, before the new one moves in
        real = os.replace

        def replace(src, dst):
            real(src, dst)
            if Path(src) == out:
                die()

        os.replace = replace
        run_export(load_config(cfg, purpose="export"), overwrite=True)

    assert in_child(child) == -signal.SIGKILL and not out.exists()
    assert main(["export", _write(tmp_path / "e.yaml", cfg)]) == 2  # restored, so protected without --overwrite
    assert snapshot(out) == before and hidden_leftovers(out) == []


def _write(path: Path, cfg: dict) -> str:
    path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    return str(path)


@pytest.mark.parametrize("stage", ["merged", "gguf"])
def test_disk_full_during_export_one_message_nothing_left(setup, tmp_path, monkeypatch, capsys, stage):
    import loraforge.export.gguf as gguf
    import loraforge.export.merge as merge

    def full(target):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    if stage == "merged":
        monkeypatch.setattr(merge, "save_merged", lambda model, tok, folder, *a, **k: full(
            Path(folder) / "model.safetensors"))
    else:
        monkeypatch.setattr(gguf, "convert_to_gguf", lambda source, target, *a, **k: full(target))
    out = tmp_path / "out"
    assert main(["export", _write(tmp_path / "e.yaml", _export_cfg(setup, out))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("loraforge: error:")]
    assert f"the disk filled up while trying to write the export in {out}: it needs about " in line
    assert "is free (the partial files were removed)" in line
    assert not out.exists() and hidden_leftovers(out) == []


def test_killed_predict_resumes_without_duplicates_or_gaps(setup, tmp_path):
    model, _, data = setup

    def cfg(out: Path):
        return load_config({"model_name_or_path": str(model), "template": "chatml", "eval_dataset": "sums",
                            "dataset_dir": str(data), "output_dir": str(out), "max_new_tokens": 4,
                            "predict_batch_size": 4, "max_samples": 10, "repetition_penalty": 1.5}, purpose="predict")

    reference = tmp_path / "ref"
    run_predict(cfg(reference))
    out = tmp_path / "out"

    def child():  # the second batch: half a line reaches the disk, then the process dies
        real = PredictionFile.append

        def append(self, rows):
            if self.done:
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rows[0])[:20])
                die()
            real(self, rows)

        PredictionFile.append = append
        run_predict(cfg(out))

    assert in_child(child) == -signal.SIGKILL
    assert len((out / PREDICTIONS_FILE).read_text().splitlines()) == 5  # one batch + the cut line
    run_predict(cfg(out))
    rows = [json.loads(x) for x in (out / PREDICTIONS_FILE).read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(10))
    assert rows == [json.loads(x) for x in (reference / PREDICTIONS_FILE).read_text().splitlines()]


def test_predict_on_a_full_disk_keeps_the_rows_written_then_resumes(setup, tmp_path, monkeypatch):
    model, _, data = setup
    cfg = load_config({"model_name_or_path": str(model), "template": "chatml", "eval_dataset": "sums",
                       "dataset_dir": str(data), "output_dir": str(tmp_path / "out"), "max_new_tokens": 2,
                       "predict_batch_size": 4, "max_samples": 8}, purpose="predict")
    real = PredictionFile.append

    def append(self, rows):
        if self.done:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, rows)

    monkeypatch.setattr(PredictionFile, "append", append)
    with pytest.raises(LoraforgeError, match=rf"the disk filled up while trying to write {PREDICTIONS_FILE} in "
                                             rf"{tmp_path / 'out'}: .* is free\n.*predict resumes"):
        run_predict(cfg)
    assert len((tmp_path / "out" / PREDICTIONS_FILE).read_text().splitlines()) == 4  # the first batch is kept
    monkeypatch.setattr(PredictionFile, "append", real)
    assert run_predict(cfg)["predict_samples"] == 8


def test_real_small_disk_export_check_first_then_real_enospc(setup, reference_export, tmp_path, monkeypatch):
    import loraforge.export.workflow as workflow

    sizes = {p.name: p.stat().st_size for p in reference_export.iterdir()}
    room = sum(sizes.values()) - sizes["out-q8_0.gguf"] // 2  # the merged files fit, the GGUF does not
    with small_disk(tmp_path / "disk", room) as disk:
        out = disk / "out"
        cfg = load_config(_export_cfg(setup, out), purpose="export")
        with pytest.raises(ExportError, match=rf"not enough free disk space to write the export in {out}"):
            run_export(cfg)  # the common case: refused before anything is written
        monkeypatch.setattr(workflow, "check_free_space", lambda *a: 10**12)  # an estimate can be wrong
        with pytest.raises(ExportError, match=rf"the disk filled up while trying to write the export in {out}: "
                                              r"it needs about .+ is free \(the partial files were removed\)"):
            run_export(cfg)
        assert not out.exists() and hidden_leftovers(out) == [] and list(disk.iterdir()) == []
