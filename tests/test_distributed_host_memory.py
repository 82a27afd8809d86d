"""DeepSpeed offload without enough host RAM is refused before any process starts, with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.config import load_config
from loraforge.errors import ConfigError
from loraforge.config import engines
from loraforge.train.launcher import check_host_memory
from loraforge.train.host_memory import GIB, HOST_RAM_ENV, host_ram


@pytest.fixture()
def box(monkeypatch, tmp_path):
    """A 4-GPU machine with DeepSpeed (validation only, nothing runs) and a small dataset."""
    monkeypatch.setattr(engines, "cuda_device_count", lambda: 4)
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: True)
    for name in ("LOCAL_RANK", "WORLD_SIZE", "FORCE_TORCHRUN", HOST_RAM_ENV):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.json").write_text('[{"instruction": "hi", "output": "hello"}]', encoding="utf-8")
    (data / "dataset_info.json").write_text('{"d": {"file_name": "d.json"}}', encoding="utf-8")
    return {"model_name_or_path": "Qwen/Qwen3-14B", "dataset": "d", "dataset_dir": str(data), "quantization_bit": 4,
            "fp16": True, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "cutoff_len": 2048,
            "nproc_per_node": 4}


def _check(keys: dict) -> None:
    """What the launcher does before it starts any process: validate, then the host RAM an offload needs."""
    check_host_memory(load_config(keys, purpose="train", build_training_args=False), keys["nproc_per_node"])


def test_offload_beyond_host_ram_is_refused_with_the_fix(box, monkeypatch):
    monkeypatch.setenv(HOST_RAM_ENV, "8")
    with pytest.raises(ConfigError) as err:
        _check({**box, "deepspeed": "z3_offload"})
    text = str(err.value)
    assert "DeepSpeed offload keeps the parameters and optimizer states in host RAM" in text
    assert "for 4 process(es)" in text and "this machine has 8.0 GiB (LORAFORGE_HOST_RAM_GIB=8)" in text
    assert "`deepspeed: z3`" in text and "z2_offload" in text and HOST_RAM_ENV in text


def test_offload_that_fits_and_no_offload_pass(box, monkeypatch):
    monkeypatch.setenv(HOST_RAM_ENV, "512")
    _check({**box, "deepspeed": "z3_offload"})
    monkeypatch.setenv(HOST_RAM_ENV, "8")
    _check({**box, "deepspeed": "z3"})  # nothing in host RAM beyond the processes: not this check's business


def test_config_only_validation_does_not_read_this_machine(box, monkeypatch):
    monkeypatch.setenv(HOST_RAM_ENV, "8")
    load_config({**box, "deepspeed": "z3_offload"}, purpose="train", build_training_args=False,
                check_environment=False)


def test_host_ram_reads_meminfo_cgroup_and_the_override(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32768000 kB\nMemFree:        1000 kB\n", encoding="ascii")
    limit, nolimit = tmp_path / "memory.max", tmp_path / "unlimited"
    limit.write_text(str(16 * GIB) + "\n", encoding="ascii")
    nolimit.write_text("max\n", encoding="ascii")
    assert host_ram({}, str(meminfo), (str(nolimit),)) == (32768000 * 1024, "MemTotal in /proc/meminfo")
    assert host_ram({}, str(meminfo), (str(limit),)) == (16 * GIB, "the cgroup memory limit")
    assert host_ram({HOST_RAM_ENV: "256"}, str(meminfo), ()) == (256 * GIB, f"{HOST_RAM_ENV}=256")
    assert host_ram({}, str(tmp_path / "missing"), ())[0] is None


def test_real_meminfo_is_readable_here():
    have, source = host_ram({})
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo")
    assert have and have > GIB and source
