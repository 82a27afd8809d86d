"""`nproc_per_node: 1` on a machine with several GPUs trains on one GPU, never in torch.nn.DataParallel.

No GPU is needed: the test gives the Hugging Face arguments the GPU count they would read on a 2-GPU machine
(``n_gpu = 2`` in a process outside torchrun), which is exactly what makes the Trainer wrap the model in
DataParallel and multiply the batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from loraforge.config import load_config
from loraforge.train import workflow
from loraforge.train.distributed import keep_single_device

ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}"}
        for a, b in zip(range(50, 58), range(83, 91))]


class _Seen(TrainerCallback):
    """What the Trainer really uses: GPU count and batch per step."""

    def __init__(self) -> None:
        self.n_gpu = self.train_batch_size = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.n_gpu, self.train_batch_size = args.n_gpu, args.train_batch_size


@pytest.fixture()
def wrapped(monkeypatch) -> list[str]:
    """Records every torch.nn.DataParallel the Trainer builds (on a CPU it passes calls straight through)."""
    import torch

    made: list[str] = []

    class Recorded(torch.nn.DataParallel):
        def __init__(self, module, *args, **kwargs):
            made.append(type(module).__name__)
            super().__init__(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn, "DataParallel", Recorded)
    return made


@pytest.fixture()
def config(tmp_path: Path, monkeypatch) -> Path:
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "FORCE_TORCHRUN"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "sums.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"sums": {"file_name": "sums.json"}}), encoding="utf-8")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": "tiny-random-qwen3", "dataset": "sums", "dataset_dir": str(data), "template": "qwen3",
        "cutoff_len": 48, "finetuning_type": "lora", "lora_rank": 8, "lora_dropout": 0.0, "learning_rate": 5e-3,
        "max_steps": 2, "logging_steps": 1, "save_strategy": "no", "seed": 3, "per_device_train_batch_size": 2,
        "disable_gradient_checkpointing": True, "plot_loss": False, "nproc_per_node": 1,
        "data_cache_dir": str(tmp_path / "cache"),
    }), encoding="utf-8")
    return path


def _train(config: Path, out: Path, gpus_seen: int | None) -> tuple[_Seen, dict[int, float]]:
    cfg = load_config(str(config), [f"output_dir={out}"], purpose="train")
    if gpus_seen is not None:
        assert cfg.training.n_gpu == 0  # this CPU machine, as HF reads it ...
        cfg.training._n_gpu = gpus_seen  # ... and as HF reads a machine with `gpus_seen` GPUs visible
    seen = _Seen()
    workflow.run_train(cfg, extra_callbacks=[seen])
    rows = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines() if x.strip()]
    return seen, {r["current_steps"]: r["loss"] for r in rows if "loss" in r}


def test_one_process_on_two_gpus_trains_like_one_gpu(config, tmp_path, wrapped):
    _, one = _train(config, tmp_path / "one_gpu", gpus_seen=None)
    two_seen, two = _train(config, tmp_path / "two_gpus", gpus_seen=2)
    assert (two_seen.n_gpu, two_seen.train_batch_size) == (1, 2)  # not 2 GPUs x 2 per device
    assert wrapped == []  # the model was never wrapped in DataParallel
    assert sorted(two) == [1, 2]
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-6), (step, one, two)


def test_without_the_guard_the_trainer_would_use_dataparallel(config, tmp_path, monkeypatch, wrapped):
    """The control: the same mock with the guard switched off gives DataParallel and the doubled batch seen on
    real GPUs, so the test above proves the guard and not a mock that does nothing."""
    monkeypatch.setattr(workflow, "keep_single_device", lambda args, **_: False)
    seen, _ = _train(config, tmp_path / "unguarded", gpus_seen=2)
    assert (seen.n_gpu, seen.train_batch_size) == (2, 4)
    assert wrapped  # the Trainer wrapped the model


def test_guard_leaves_torchrun_workers_and_single_gpu_alone():
    class Args:
        def __init__(self, n_gpu: int, local_rank: int) -> None:
            self._n_gpu, self.local_rank, self.device = n_gpu, local_rank, "cuda:0"

        @property
        def n_gpu(self) -> int:
            return self._n_gpu

    assert not keep_single_device(Args(1, -1)) and not keep_single_device(Args(0, -1))
    worker = Args(1, 1)
    assert not keep_single_device(worker) and worker.n_gpu == 1
    several = Args(4, -1)
    assert keep_single_device(several) and several.n_gpu == 1
