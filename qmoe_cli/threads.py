"""How many CPU threads a command computes with: the cores this process may use, not the machine's.

torch sizes its thread pool by the machine's cores. A process confined to fewer (CPU affinity,
as `taskset` and Slurm set; a cgroup CPU quota, as containers set) or sharing its node with the
other ranks of a `torchrun` job then runs more spinning threads than it has cores, and each
parallel region waits for the slowest thread: `qmoe eval --samples 128` took 96.9 s instead of
6.1 s beside one other 2-thread torch process on a 2-core machine. The default here is the
smaller of the affinity mask and the quota, divided among the local ranks under torchrun.
`OMP_NUM_THREADS`, the usual knob, is honoured outside torchrun; under torchrun it is not,
because torchrun sets it to 1 for every rank whether or not the user asked.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> float | None:
    """The CPUs this process's cgroups allow it (quota / period, e.g. 1.5), the smallest over its
    cgroup and the cgroups above it; None when there is no quota or no cgroup file to read.
    Reads cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)  # hierarchy id : controllers : path
        if len(parts) != 3:
            continue
        controllers, path = parts[1], parts[2]
        if controllers == "":  # v2: one unified hierarchy
            bases = [root]
        elif "cpu" in controllers.split(","):
            bases = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
        else:
            continue
        for base in dict.fromkeys(bases):
            directory = base / path.lstrip("/")
            while True:
                limits.append(_limit_in(directory))
                if directory == base or base not in directory.parents:
                    break
                directory = directory.parent
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _limit_in(directory: Path) -> float | None:
    try:
        if (directory / "cpu.max").is_file():
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def usable_cores(affinity: int, quota: float | None) -> int:
    """Cores a process may keep busy: its affinity mask, capped by a cgroup quota (rounded up:
    a quota of 1.5 CPUs still runs two threads at three quarters speed)."""
    return max(1, affinity if quota is None else min(affinity, math.ceil(quota)))


def default_threads(environ: Mapping[str, str] = os.environ) -> int:
    """`--threads` when it is not given (see the module docstring)."""
    cores = usable_cores(len(os.sched_getaffinity(0)), cgroup_cpu_limit())
    local_ranks = environ.get("LOCAL_WORLD_SIZE", "")
    if local_ranks.isdigit() and int(local_ranks) >= 1:
        return max(1, cores // int(local_ranks))
    requested = environ.get("OMP_NUM_THREADS", "")
    return int(requested) if requested.isdigit() and int(requested) >= 1 else cores
