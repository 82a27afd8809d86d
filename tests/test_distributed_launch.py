"""The torchrun relaunch: when it happens, the command it runs, the launch environment, rank detection."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

from loraforge.errors import ConfigError
from loraforge.train import launcher
from loraforge.train.distributed import RankInfo, announce_fsdp, configure_worker_logging, inside_torchrun, \
    rank_info
from loraforge.train.launcher import LaunchPlan, plan_launch


def test_no_relaunch_on_one_device_or_inside_torchrun():
    assert plan_launch(None, env={}, gpu_count=0) is None
    assert plan_launch(None, env={}, gpu_count=1) is None
    assert plan_launch(1, env={}, gpu_count=4) is None  # nproc_per_node: 1 keeps one process
    # torchrun workers never relaunch, whatever else asks for it
    for env in ({"LOCAL_RANK": "0"}, {"WORLD_SIZE": "2"}):
        assert plan_launch(2, env={**env, "FORCE_TORCHRUN": "1"}, gpu_count=4) is None


def test_relaunch_on_every_visible_gpu_by_default():
    plan = plan_launch(None, env={}, gpu_count=4)
    assert plan is not None and plan.nproc_per_node == 4 and plan.nnodes == 1 and plan.node_rank == 0
    assert plan.master_addr == "127.0.0.1"
    # device_map auto alone means one process with the model split over the GPUs
    assert plan_launch(None, device_map_auto=True, env={}, gpu_count=4) is None


def test_force_torchrun_and_nproc_per_node_on_cpu():
    plan = plan_launch(2, env={"FORCE_TORCHRUN": "1"}, gpu_count=0)
    assert plan is not None and plan.nproc_per_node == 2
    assert plan_launch(2, env={}, gpu_count=0).nproc_per_node == 2  # nproc_per_node alone asks too
    assert plan_launch(None, env={"FORCE_TORCHRUN": "true"}, gpu_count=0).nproc_per_node == 1
    assert plan_launch(None, env={"FORCE_TORCHRUN": "0"}, gpu_count=0) is None


def test_free_port_is_picked_on_one_node_and_honoured_when_given():
    plan = plan_launch(2, env={}, gpu_count=2)
    with socket.socket() as sock:  # the port picked is really free
        sock.bind(("127.0.0.1", plan.master_port))
    given = plan_launch(2, env={"MASTER_PORT": "29611", "MASTER_ADDR": "10.1.2.3"}, gpu_count=2)
    assert (given.master_addr, given.master_port) == ("10.1.2.3", 29611)


def test_several_nodes():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}
    plan = plan_launch(None, env=env, gpu_count=8)
    assert (plan.nproc_per_node, plan.nnodes, plan.node_rank, plan.master_addr) == (8, 2, 1, "10.0.0.1")
    assert plan.master_port == launcher.DEFAULT_MULTINODE_PORT  # nodes must agree: no random port


@pytest.mark.parametrize("env, expected", [
    ({"NNODES": "2"}, "MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 must be below NNODES=2"),
    ({"NNODES": "two"}, "NNODES='two' must be a whole number"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
])
def test_bad_launch_environment_is_refused(env, expected):
    with pytest.raises(ConfigError) as err:
        plan_launch(None, env=env, gpu_count=2)
    assert expected in str(err.value)


def test_command_reuses_interpreter_and_arguments():
    cmd = LaunchPlan(nproc_per_node=2, master_port=29555).command(["train", "cfg.yaml", "max_steps=3", "--seed", "4"])
    assert cmd[:3] == [sys.executable, "-m", "loraforge.train.elastic"]  # torchrun, naming a failed rank
    assert "--nproc_per_node=2" in cmd and "--master_port=29555" in cmd and "--nnodes=1" in cmd
    assert cmd[cmd.index("-m", 3):] == ["-m", "loraforge.cli", "train", "cfg.yaml", "max_steps=3", "--seed", "4"]


def _config(tmp_path: Path, **over) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "d.json").write_text('[{"instruction": "hi", "output": "hello"}]', encoding="utf-8")
    (data / "dataset_info.json").write_text('{"d": {"file_name": "d.json"}}', encoding="utf-8")
    cfg = {"model_name_or_path": "tiny-random-qwen3", "dataset": "d", "dataset_dir": str(data),
           "output_dir": str(tmp_path / "out"), **over}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_maybe_relaunch_runs_torchrun_with_the_same_arguments(tmp_path, monkeypatch):
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "FORCE_TORCHRUN"):
        monkeypatch.delenv(name, raising=False)
    seen = {}
    monkeypatch.setattr(launcher, "_run", lambda cmd, env: seen.update(cmd=cmd, env=env) or 7)
    cfg = _config(tmp_path)
    assert launcher.maybe_relaunch(str(cfg), ["max_steps=2"]) is None  # CPU, nothing asks: train here
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    assert launcher.maybe_relaunch(str(cfg), ["nproc_per_node=2", "max_steps=2"]) == 7
    assert seen["cmd"][-4:] == ["train", str(cfg), "nproc_per_node=2", "max_steps=2"]
    assert "--nproc_per_node=2" in seen["cmd"]
    assert seen["env"]["FORCE_TORCHRUN"] == "1" and int(seen["env"]["OMP_NUM_THREADS"]) >= 1


def test_config_mistakes_are_reported_before_any_process_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.setattr(launcher, "_run", lambda cmd, env: pytest.fail("torchrun must not start"))
    cfg = _config(tmp_path, nproc_per_node=2, lora_rnak=8)
    with pytest.raises(ConfigError) as err:
        launcher.maybe_relaunch(str(cfg), [])
    assert "lora_rnak" in str(err.value) and "lora_rank" in str(err.value)


def test_rank_detection():
    assert rank_info({}) == RankInfo(0, 0, 1, 1)
    info = rank_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (3, 1, 4, 2)
    assert info.is_distributed and not info.is_main
    assert inside_torchrun({"LOCAL_RANK": "0"}) and not inside_torchrun({"RANK": "0"})


def test_only_rank_zero_logs_info(monkeypatch):
    import datasets
    from transformers.utils import logging as hf_logging

    log = logging.getLogger("loraforge")
    monkeypatch.setattr(log, "level", logging.NOTSET)
    bars = []
    monkeypatch.setattr(datasets, "disable_progress_bars", lambda: bars.append("off"))
    monkeypatch.setattr(hf_logging, "disable_progress_bar", lambda: bars.append("hf off"))
    configure_worker_logging(RankInfo(rank=0, world_size=2))
    assert log.level == logging.NOTSET and bars == []
    configure_worker_logging(RankInfo(rank=1, local_rank=1, world_size=2))
    assert logging.getLogger("loraforge.train.workflow").getEffectiveLevel() == logging.WARNING
    assert bars == ["hf off", "off"]


def test_fsdp_is_announced_to_accelerate_in_the_worker(monkeypatch):
    """transformers reads ACCELERATE_USE_FSDP while loading (before the Trainer exists), as after `accelerate launch`."""
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not announce_fsdp(None) and "ACCELERATE_USE_FSDP" not in os.environ
    assert announce_fsdp("full_shard auto_wrap") and os.environ["ACCELERATE_USE_FSDP"] == "true"
