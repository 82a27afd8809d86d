"""Multi-process training: which process this is, CPU process groups and FSDP announcement for the workers.

The engines themselves are torch.distributed (DDP), DeepSpeed and FSDP through accelerate, all driven by the
Hugging Face Trainer. Which DeepSpeed/FSDP setups can work is decided with the rest of the config, in
:mod:`loraforge.config.engines`; its public names are re-exported here for existing imports.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

from ..config.engines import (  # noqa: F401 - re-exported: the checks moved to config/, importers stay valid
    FSDP_OPTIONS, INSTALL_DEEPSPEED, cuda_device_count, deepspeed_installed, distributed_problems, fsdp_enabled,
    load_deepspeed_config, resolve_deepspeed, zero_stage,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ this process
@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in a torchrun job (a single process is rank 0 of a world of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs, plots and writes the output folder."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def inside_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True when this process was started by torchrun (or another launcher that sets LOCAL_RANK/WORLD_SIZE)."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env or "WORLD_SIZE" in env


def rank_info(env: Mapping[str, str] | None = None) -> RankInfo:
    """This process's rank, local rank and world sizes, read from the variables torchrun sets."""
    env = os.environ if env is None else env

    def read(name: str, default: int) -> int:
        try:
            return int(env.get(name, default))
        except ValueError:
            return default

    world = read("WORLD_SIZE", 1)
    return RankInfo(rank=read("RANK", 0), local_rank=read("LOCAL_RANK", 0), world_size=world,
                    local_world_size=read("LOCAL_WORLD_SIZE", world))


def keep_single_device(args: Any, *, split_model: bool = False) -> bool:
    """One process with several GPUs visible trains on one GPU, never in ``torch.nn.DataParallel``; True if changed.

    Outside torchrun, Hugging Face's TrainingArguments counts every visible GPU (``n_gpu``) and the Trainer then
    wraps the model in DataParallel: a copy of the model on each GPU, a batch of ``per_device x n_gpu`` and a
    loss averaged another way (measured on 2 GPUs: loss 25.4 instead of 12.7 at step 1, 43 instead of 25 GiB).
    loraforge runs one process per GPU instead, so a single process (``nproc_per_node: 1``) trains on
    ``args.device``: the first visible GPU, chosen with CUDA_VISIBLE_DEVICES. ``n_gpu = 1`` is what the Trainer
    itself sets for a model split over several GPUs (``quantization_device_map: auto``), which stays possible.
    """
    if getattr(args, "local_rank", -1) != -1 or args.n_gpu <= 1:  # torchrun workers already own one GPU each
        return False
    if not split_model:  # with a model split over the GPUs, every visible GPU is used, by the model itself
        logger.info("one training process with %d GPUs visible: training on %s only (no DataParallel); use "
                    "nproc_per_node=%d for DDP, or CUDA_VISIBLE_DEVICES to pick the GPU", args.n_gpu, args.device,
                    args.n_gpu)
    args._n_gpu = 1
    return True


def configure_worker_logging(info: RankInfo) -> None:
    """Only rank 0 reports progress: the other ranks keep warnings and errors, and drop info lines and bars."""
    if info.is_main:
        return
    logging.getLogger("loraforge").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def init_cpu_process_group(timeout_s: int, backend: str | None = None) -> bool:
    """Start the gloo process group of a CPU torchrun job with ``ddp_timeout``; True when this call started it.

    The Hugging Face Trainer passes ``ddp_timeout`` to the process group it starts on GPUs, but not on CPUs; a
    group that already exists is reused by accelerate, so starting it here makes the timeout apply on CPUs too.
    """
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() or not dist.is_available() or dist.is_initialized():
        return False
    info = rank_info()
    if backend not in (None, "gloo") or not info.is_distributed:
        return False
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    if info.is_main:
        logger.info("gloo process group: %d CPU processes, ddp_timeout %d s", info.world_size, timeout_s)
    return True


def announce_fsdp(fsdp: Any) -> bool:
    """Tell accelerate and transformers that this worker trains with FSDP, as `accelerate launch` does.

    The Trainer creates its FSDP plugin only after the model is loaded; transformers reads ACCELERATE_USE_FSDP
    while loading, to keep 4-bit weights in the compute dtype (so FSDP can shard them) and skip the device map.
    """
    if not fsdp_enabled(fsdp):
        return False
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    return True


def resolve_deepspeed_path(value: str | dict | None) -> str | dict | None:
    """A short name (z0, z2, z2_offload, z3, z3_offload) becomes the JSON shipped with loraforge."""
    return resolve_deepspeed(value)
