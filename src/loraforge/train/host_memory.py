"""Host RAM for DeepSpeed offload: refuse, before any process starts, a run whose offloaded states cannot fit.

ZeRO offload moves the optimizer states (and with ZeRO-3 the parameters) into pinned host memory of every
process on the node. When that memory is missing, the kernel's out-of-memory killer ends a rank minutes into
loading, after every GPU has been set up. The need is the host part of `loraforge estimate` for the processes of
this node; the machine's RAM is read from ``/proc/meminfo`` (MemTotal), capped by a cgroup limit.

Some virtual machines add memory while it is being used, so MemTotal starts below what they can give (one
workplace's 256 GiB GPU machine shows 31 GiB at boot); ``LORAFORGE_HOST_RAM_GIB`` states the real size there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from ..config import RunConfig

logger = logging.getLogger(__name__)

GIB = 2**30
HOST_RAM_ENV = "LORAFORGE_HOST_RAM_GIB"
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _meminfo_total(path: str) -> int | None:
    try:
        for line in Path(path).read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_limit(paths: tuple[str, ...]) -> int | None:
    for path in paths:
        try:
            raw = Path(path).read_text(encoding="ascii").strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 2**60:  # "max" or a huge number means no limit
            return int(raw)
    return None


def host_ram(env: Mapping[str, str] | None = None, meminfo: str = "/proc/meminfo",
             cgroup_limits: tuple[str, ...] = _CGROUP_LIMITS) -> tuple[int | None, str]:
    """(bytes of RAM this machine gives the job, where that number came from); (None, reason) when unknown."""
    env = os.environ if env is None else env
    raw = env.get(HOST_RAM_ENV, "").strip()
    if raw:
        try:
            return int(float(raw) * GIB), f"{HOST_RAM_ENV}={raw}"
        except ValueError:
            logger.warning("%s=%r is not a number of GiB; reading /proc/meminfo instead", HOST_RAM_ENV, raw)
    total = _meminfo_total(meminfo)
    if total is None:
        return None, "no /proc/meminfo on this system"
    limit = _cgroup_limit(cgroup_limits)
    if limit is not None and limit < total:
        return limit, "the cgroup memory limit"
    return total, "MemTotal in /proc/meminfo"


def offload_host_problem(cfg: "RunConfig", processes: int, env: Mapping[str, str] | None = None) -> str | None:
    """Why the DeepSpeed offload of ``cfg`` cannot fit in this machine's RAM with ``processes`` per node; or None.

    None also when the estimate cannot be made (an unknown architecture): the check is a guard against a
    certain failure, never a reason to block a run the estimate knows nothing about.
    """
    from ..estimate import estimate_for_config

    try:
        est = estimate_for_config(cfg, num_gpus=max(processes, 1))
    except Exception as err:  # noqa: BLE001 - the estimate is advice: skip the check, say why in debug logs
        logger.debug("host RAM check skipped: %s", err)
        return None
    s = est.scenario
    if not (s.offload_optimizer or s.offload_params):
        return None
    need = est.breakdown.host_total
    have, source = host_ram(env)
    if have is None or need <= have:
        return None
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in est.breakdown.host.items())
    what = "parameters and optimizer states" if s.offload_params else "optimizer states"
    return (f"DeepSpeed offload keeps the {what} in host RAM: about {need / GIB:.1f} GiB for {s.num_gpus} "
            f"process(es) on this node ({parts}), but this machine has {have / GIB:.1f} GiB ({source}). Use "
            "ZeRO-3 without offload (`deepspeed: z3`) or offload only the optimizer (`deepspeed: z2_offload`), run "
            f"fewer processes per node, or, if the machine really has more memory, set {HOST_RAM_ENV} to its size")
