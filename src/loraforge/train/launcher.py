"""Multi-GPU launch: relaunch `loraforge train` under torchrun so the user never writes a launcher command.

    loraforge train cfg.yaml                      # 4 GPUs visible -> torchrun --nproc_per_node 4 ... train cfg.yaml
    FORCE_TORCHRUN=1 loraforge train cfg.yaml nproc_per_node=2   # 2 processes even on a CPU (gloo backend)
    NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 loraforge train cfg.yaml   # run on each node

The relaunch runs the same interpreter with the same subcommand, config and overrides
(``python -m loraforge.train.elastic ... -m loraforge.cli train CONFIG OVERRIDES``: torchrun, with a failed rank
reported in one message). Inside torchrun nothing is
relaunched; the worker quiets the ranks other than 0, starts the gloo group with ``ddp_timeout`` on CPUs, and
announces FSDP to accelerate the way `accelerate launch` does.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ConfigError
from .distributed import announce_fsdp, configure_worker_logging, cuda_device_count, init_cpu_process_group, \
    inside_torchrun, rank_info

logger = logging.getLogger(__name__)

DEFAULT_MULTINODE_PORT = 29500  # every node must agree on the port, so several nodes cannot pick a free one


@dataclass(frozen=True)
class LaunchPlan:
    """The torchrun job to start: processes on this node, nodes, this node's rank and the rendezvous address."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MULTINODE_PORT

    def command(self, cli_args: list[str]) -> list[str]:
        """The full command line: torchrun through this interpreter, then ``-m loraforge.cli`` and ``cli_args``.

        torchrun runs through :mod:`loraforge.train.elastic`, which takes torchrun's own arguments and reports a
        failed rank in one message instead of torchrun's traceback.
        """
        return [
            sys.executable, "-m", "loraforge.train.elastic",
            f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}", f"--nproc_per_node={self.nproc_per_node}",
            f"--master_addr={self.master_addr}", f"--master_port={self.master_port}",
            "-m", "loraforge.cli", *cli_args,
        ]


def force_torchrun(env: Mapping[str, str]) -> bool:
    """True when FORCE_TORCHRUN asks for a torchrun launch (1/true/yes)."""
    return env.get("FORCE_TORCHRUN", "").strip().lower() in ("1", "true", "yes", "on")


def free_port() -> int:
    """A TCP port that is free on this machine right now (for a single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env_int(env: Mapping[str, str], name: str, default: int, problems: list[str], minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"environment variable {name}={raw!r} must be a whole number")
        return default
    if value < minimum:
        problems.append(f"environment variable {name}={value} must be at least {minimum}")
        return default
    return value


def plan_launch(requested: int | None, *, device_map_auto: bool = False, env: Mapping[str, str] | None = None,
                gpu_count: int | None = None) -> LaunchPlan | None:
    """Decide whether (and how) to relaunch under torchrun; None trains in this process.

    ``requested`` is ``nproc_per_node`` from the config. A relaunch happens when ``requested`` > 1, when more than
    one GPU is visible and ``requested`` is unset (one process per GPU), or when FORCE_TORCHRUN is set; never when
    this process already runs under torchrun, and not with ``quantization_device_map: auto`` alone (that splits
    one model over the GPUs inside one process). Raises :class:`ConfigError` for unusable NNODES / NODE_RANK /
    MASTER_ADDR / MASTER_PORT values.
    """
    env = os.environ if env is None else env
    if inside_torchrun(env):
        return None
    gpus = cuda_device_count() if gpu_count is None else gpu_count
    forced = force_torchrun(env)
    if requested is not None:
        nproc = requested
        wanted = requested > 1 or forced
    elif forced:
        nproc, wanted = max(gpus, 1), True
    else:
        nproc, wanted = gpus, gpus > 1 and not device_map_auto
    if not wanted:
        return None
    problems: list[str] = []
    nnodes = _env_int(env, "NNODES", 1, problems, minimum=1)
    node_rank = _env_int(env, "NODE_RANK", 0, problems, minimum=0)
    if node_rank >= nnodes:
        problems.append(f"environment variable NODE_RANK={node_rank} must be below NNODES={nnodes} "
                        "(nodes are numbered 0 .. NNODES-1)")
    addr = env.get("MASTER_ADDR", "").strip()
    if nnodes > 1 and not addr:
        problems.append(f"NNODES={nnodes} needs MASTER_ADDR: the address of the node with NODE_RANK=0, set to the "
                        "same value on every node")
    port = _env_int(env, "MASTER_PORT", 0, problems, minimum=1)
    if port > 65535:
        problems.append(f"environment variable MASTER_PORT={port} is not a TCP port (1-65535)")
    if problems:
        raise ConfigError(problems, source="the launch environment")
    if not port:
        port = free_port() if nnodes == 1 else DEFAULT_MULTINODE_PORT
    return LaunchPlan(nproc_per_node=nproc, nnodes=nnodes, node_rank=node_rank, master_addr=addr or "127.0.0.1",
                      master_port=port)


def _launch_keys(config: str, overrides: list[str]) -> dict[str, Any]:
    """The keys that decide the launch, typed as the config declares them (invalid ones are left to validation)."""
    from ..config import all_fields, parse_overrides, read_yaml
    from ..config.coerce import CoercionError, coerce

    raw = read_yaml(config)
    raw.update(parse_overrides(overrides))
    table = all_fields()
    out: dict[str, Any] = {}
    for key in ("nproc_per_node", "quantization_device_map", "ddp_timeout", "ddp_backend", "fsdp"):
        if key in raw:
            try:
                out[key] = coerce(raw[key], table[key][0][2], nullable=True)
            except CoercionError:
                pass
    return out


def _run(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun and return its exit code; Ctrl-C reaches the workers, which save a checkpoint and stop."""
    proc = subprocess.Popen(cmd, env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            logger.warning("interrupt received: waiting for the workers to save a checkpoint and stop")


def check_host_memory(cfg, processes: int) -> None:
    """Refuse a DeepSpeed offload whose states cannot fit in this node's RAM (before any process starts)."""
    if not cfg.explicit.get("deepspeed"):
        return
    from ..errors import ConfigError
    from .host_memory import offload_host_problem

    problem = offload_host_problem(cfg, processes)
    if problem:
        raise ConfigError([problem], source=cfg.source)


def maybe_relaunch(config: str, overrides: list[str]) -> int | None:
    """Return the exit code of a torchrun relaunch, or None to train in this process.

    In a torchrun worker this prepares the process instead (rank-0-only logging, the CPU process group with
    ``ddp_timeout``, FSDP announced to accelerate as `accelerate launch` would) and returns None. Before
    relaunching, the whole config is validated once here (with the host RAM a DeepSpeed offload needs), so a
    mistake is reported once and no process is started for it.
    """
    keys = _launch_keys(config, overrides)
    if inside_torchrun():
        info = rank_info()
        configure_worker_logging(info)
        init_cpu_process_group(int(keys.get("ddp_timeout") or 1800), keys.get("ddp_backend"))
        announce_fsdp(keys.get("fsdp"))
        return None
    plan = plan_launch(keys.get("nproc_per_node"), device_map_auto=keys.get("quantization_device_map") == "auto")
    if plan is None:
        return None
    from ..config import load_config
    from ..data.templates import known_template_names

    cfg = load_config(config, overrides, purpose="train", build_training_args=False,
                      template_names=known_template_names())
    check_host_memory(cfg, plan.nproc_per_node)
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # torchrun would set 1 and warn; share the cores between the processes
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.nproc_per_node))
    cmd = plan.command(["train", config, *overrides])
    gpus = cuda_device_count()
    logger.info("launching %d process(es) on this node (%s, node %d of %d, rendezvous %s:%d):\n  %s",
                plan.nproc_per_node, f"{gpus} GPU(s) visible" if gpus else "CPU, gloo backend", plan.node_rank,
                plan.nnodes, plan.master_addr, plan.master_port, " ".join(cmd))
    return _run(cmd, env)
