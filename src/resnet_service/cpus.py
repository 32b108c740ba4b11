"""How many CPUs this process may really use: affinity mask and cgroup quota, not the host's."""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_quota_cpus() -> int | None:
    """CPUs granted by a cgroup CPU quota (a container's CPU limit), if any."""
    try:
        if _CGROUP_V2_MAX.exists():
            quota, period = _CGROUP_V2_MAX.read_text().split()[:2]
            if quota == "max":
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        if _CGROUP_V1_QUOTA.exists():
            quota_us = int(_CGROUP_V1_QUOTA.read_text())
            if quota_us <= 0:
                return None
            return max(1, math.ceil(quota_us / int(_CGROUP_V1_PERIOD.read_text())))
    except (OSError, ValueError):
        return None
    return None


def usable_cpus() -> int:
    """CPUs this process may run on, honouring the affinity mask and any cgroup quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota_cpus()
    return max(1, min(count, quota) if quota else count)


#: Auto layout cap: each worker holds its own copy of torch and the model (~1 GB RSS here).
MAX_AUTO_WORKERS = 8


def resolve_workers(requested: int) -> int:
    """``requested``, or one worker process per usable CPU (at most ``MAX_AUTO_WORKERS``)."""
    return requested if requested > 0 else min(usable_cpus(), MAX_AUTO_WORKERS)


def threads_per_worker(requested: int, workers: int) -> int:
    """``requested`` if set, else the usable CPUs shared evenly among worker processes."""
    if requested > 0:
        return requested
    return max(1, usable_cpus() // max(1, workers))


def has_vnni() -> bool:
    """Whether the CPU has VNNI (AVX512_VNNI or AVX_VNNI; AMX hosts have it too): int8 dot
    products without the int16 saturation of AVX2's ``vpmaddubsw``. Read from
    ``/proc/cpuinfo`` (torch-free: workers compute the model cache key with it); True where
    it cannot be read, the common case on current servers."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    words = set(flags.split())
    return bool(words & {"avx512_vnni", "avx_vnni", "amx_int8"})
