"""A full disk while training: free space is checked before each save; a disk that fills up during a save ends
with one message naming the folder, the space needed and the space free; the partial save is removed and every
complete checkpoint is kept, so the same command resumes once there is room."""

from __future__ import annotations

import errno
import json
import re
import os
from pathlib import Path

import pytest
import torch
import yaml

import loraforge.disk as disk
from faultkit import hidden_leftovers, small_disk, sums_setup, train_config
from loraforge.cli import main
from loraforge.config import load_config
from loraforge.errors import TrainingError
from loraforge.train.trainer import LoraforgeTrainer
from loraforge.train.workflow import run_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FULL = "No space left on device"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    return sums_setup(tmp_path_factory.mktemp("diskfull"))


def _cfg(setup, out: Path, **over) -> dict:
    return train_config(*setup, out, **{"max_steps": 4, **over})


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    run_train(load_config(_cfg(setup, out)))
    return out


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".staging")))


def _fill_disk_at(step: int, monkeypatch, error: Exception) -> None:
    """``torch.save`` (the optimizer state of checkpoint-``step``) writes a few bytes, then the disk is full."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and f"checkpoint-{step}" in str(f):
            Path(f).write_bytes(b"partial")
            raise error
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_free_space_is_checked_before_each_checkpoint(setup, tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    real = disk.free_bytes
    # room for checkpoint-2, then 5000 bytes left
    monkeypatch.setattr(disk, "free_bytes", lambda p: 5000 if (out / "checkpoint-2").is_dir() else real(p))
    with pytest.raises(TrainingError) as caught:
        run_train(load_config(_cfg(setup, out)))
    needed = sum(p.stat().st_size for p in (reference / "checkpoint-2").rglob("*") if p.is_file())
    message = str(caught.value)
    assert f"not enough free disk space to save checkpoint-4 in {out}: it needs about " in message
    assert "4.9 KiB is free" in message
    number, unit = re.search(r"needs about ([\d.]+) (KiB|MiB)", message).groups()
    assert needed <= float(number) * {"KiB": 2**10, "MiB": 2**20}[unit] <= 2 * needed  # the size of checkpoint-2
    assert "checkpoint-2 and the checkpoints before it are kept" in message
    assert _entries(out) == ["checkpoint-2"]  # nothing of checkpoint-4 was written
    monkeypatch.setattr(disk, "free_bytes", real)  # space was freed: the same command resumes from checkpoint-2
    run_train(load_config(_cfg(setup, out)))
    assert (out / "adapter_model.safetensors").read_bytes() == (reference / "adapter_model.safetensors").read_bytes()
    results, expected = (json.loads((d / "train_results.json").read_text()) for d in (out, reference))
    assert results["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)  # the whole run's mean


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, FULL), Exception(f"{FULL} (os error 28)")],
                         ids=["oserror", "rust-library-message"])
def test_disk_full_during_a_checkpoint_keeps_the_earlier_one(setup, tmp_path, reference, monkeypatch, error):
    out = tmp_path / "run"
    _fill_disk_at(4, monkeypatch, error)
    with pytest.raises(TrainingError, match=rf"the disk filled up while trying to save checkpoint-4 in {out}: it "
                                            r"needs about .+, and .+ is free \(the partial files were removed\)"):
        run_train(load_config(_cfg(setup, out)))
    assert _entries(out) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == \
        (reference / "checkpoint-2" / "adapter_model.safetensors").read_bytes()


def test_disk_full_writing_the_final_model_one_message_then_the_same_command_finishes(
        setup, tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(setup, out)), encoding="utf-8")
    real = LoraforgeTrainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if output_dir and output_dir.endswith(".staging-final"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "adapter_model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, FULL)
        return real(self, output_dir, _internal_call)

    monkeypatch.setattr(LoraforgeTrainer, "save_model", save_model)
    assert main(["train", str(cfg_file)]) == TrainingError.exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("loraforge: error:")]
    assert f"the disk filled up while trying to save the final model in {out}: it needs about" in line
    assert _entries(out) == ["checkpoint-2", "checkpoint-4"] and hidden_leftovers(out) == []
    assert not (out / "adapter_model.safetensors").exists()

    monkeypatch.setattr(LoraforgeTrainer, "save_model", real)  # space was freed
    assert main(["train", str(cfg_file)]) == 0  # finishes from checkpoint-4 without training
    assert (out / "adapter_model.safetensors").read_bytes() == (reference / "adapter_model.safetensors").read_bytes()
    assert (out / "trainer_state.json").is_file() and not (out / "checkpoint-5").exists()


@pytest.fixture()
def tmpfs(tmp_path, reference):
    """A real tmpfs that holds checkpoint-2 but not checkpoint-4 as well."""
    size = sum(p.stat().st_size for p in (reference / "checkpoint-2").rglob("*") if p.is_file())
    with small_disk(tmp_path / "disk", size * 3 // 2 + 64 * 1024) as mount:
        yield mount


def test_real_small_disk_check_first_then_real_enospc(setup, tmpfs, monkeypatch):
    out = tmpfs / "run"
    with pytest.raises(TrainingError, match=rf"not enough free disk space to save checkpoint-4 in {out}"):
        run_train(load_config(_cfg(setup, out)))
    assert _entries(out) == ["checkpoint-2"]
    # the check believes there is room (an estimate can be wrong): the real write fails with ENOSPC
    monkeypatch.setattr(disk, "ensure_free_space", lambda *a, **k: 10**12)
    import loraforge.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "ensure_free_space", lambda *a, **k: 10**12)
    with pytest.raises(TrainingError, match=rf"the disk filled up while trying to save checkpoint-4 in {out}"):
        run_train(load_config(_cfg(setup, out)))
    assert _entries(out) == ["checkpoint-2"] and hidden_leftovers(out) == []
