"""How many CPUs this process may really use: affinity mask and cgroup quota, not the host's."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

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
    info = _cpuinfo()
    if info is None:
        return True
    return bool(info.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


#: oneDNN's instruction-set levels (``ONEDNN_MAX_CPU_ISA`` names, lower case), weakest first:
#: the int8 kernels the runtimes pick, and so their numbers, differ between them.
ISA_LEVELS: Final = (
    "sse41",
    "avx2",
    "avx2_vnni",
    "avx512_core",
    "avx512_core_vnni",
    "avx512_core_bf16",
    "avx512_core_amx",
)
_ISA_FLAGS: Final = {
    "avx2_vnni": {"avx2", "avx_vnni"},
    "avx2": {"avx2"},
    "avx512_core": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_core_vnni": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
    "avx512_core_bf16": {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"},
    "avx512_core_amx": {"avx512f", "avx512bw", "avx512_vnni", "amx_int8", "amx_tile"},
}


@dataclass(frozen=True, slots=True)
class _CpuInfo:
    name: str
    flags: frozenset[str]


@functools.cache
def _cpuinfo() -> _CpuInfo | None:
    """The first CPU's model name and flags in ``/proc/cpuinfo`` (read once: they do not
    change while the process runs); None where it cannot be read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags")), "")
    return _CpuInfo(name or "unknown", frozenset(flags.split()))


def _levels_reached(flags: frozenset[str] | set[str]) -> list[str]:
    """The levels from AVX2 up whose flags the CPU has, weakest first."""
    return [level for level in ISA_LEVELS[1:] if _ISA_FLAGS[level] <= flags]


def isa_level(flags: frozenset[str] | set[str], cap: str | None = None) -> str:
    """The highest oneDNN level these CPU flags reach, lowered to ``cap`` (the
    ``ONEDNN_MAX_CPU_ISA`` in effect; ``ALL`` or unknown names cap nothing)."""
    reached = ([ISA_LEVELS[0], *_levels_reached(flags)])[-1]
    wanted = (cap or "").lower()
    if wanted in ISA_LEVELS and ISA_LEVELS.index(wanted) < ISA_LEVELS.index(reached):
        return wanted
    return reached


def cpu_name() -> str:
    """This host's CPU model name ("unknown" where ``/proc/cpuinfo`` cannot be read)."""
    info = _cpuinfo()
    return info.name if info is not None else "unknown"


def isa_in_effect() -> str:
    """The oneDNN level this process's int8 kernels run at (``ONEDNN_MAX_CPU_ISA`` honoured)."""
    info = _cpuinfo()
    return isa_level(info.flags if info else frozenset(), os.environ.get("ONEDNN_MAX_CPU_ISA"))


#: The levels whose int8 dot products are exact (VNNI), without AVX2's int16 saturation.
VNNI_LEVELS: Final = frozenset(
    {"avx2_vnni", "avx512_core_vnni", "avx512_core_bf16", "avx512_core_amx"}
)


def vnni_in_effect() -> bool:
    """``has_vnni`` as the int8 kernels see it: False under an ``ONEDNN_MAX_CPU_ISA`` cap below
    VNNI, so a capped process builds what a host of that level would (its qconfig)."""
    return has_vnni() and isa_in_effect() in VNNI_LEVELS


def reachable_isa_levels() -> list[str]:
    """Every level from AVX2 up that this CPU reaches, as ``ONEDNN_MAX_CPU_ISA`` values: capped
    at each in turn, one host measures the kinds of host below it."""
    info = _cpuinfo()
    return [level.upper() for level in _levels_reached(info.flags if info else frozenset())]
