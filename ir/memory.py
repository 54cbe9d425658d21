"""What this process can allocate: asked before making a value numpy would otherwise fail to allocate
with a bare MemoryError, or an overcommitting kernel grant and then kill the process for touching."""
from __future__ import annotations

import functools
import os
import resource

from .diagnostics import DiagnosticError, Diagnostics, format_bytes


def _kilobytes(path: str) -> dict[str, int]:
    """A /proc file of `Name: N kB` lines, in bytes ({} where there is none)."""
    try:
        with open(path) as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if v.strip().endswith("kB")}
    except (OSError, ValueError):
        return {}


def _cgroup(name: str) -> int | None:
    try:
        with open(f"/sys/fs/cgroup/{name}") as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


@functools.cache
def host_memory_bytes() -> int:
    """The most one buffer may take: RAM and swap (the cgroup's limit where lower)."""
    info = _kilobytes("/proc/meminfo")
    total = info.get("MemTotal") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(total + info.get("SwapTotal", 0), _cgroup("memory.max") or 1 << 62)


def available_memory_bytes() -> int:
    """What a new allocation can get now: available RAM and free swap, within what the cgroup and the
    address-space limit (`ulimit -v`) leave this process."""
    info = _kilobytes("/proc/meminfo")
    room = [info["MemAvailable"] + info.get("SwapFree", 0) if "MemAvailable" in info else host_memory_bytes()]
    limit, used = _cgroup("memory.max"), _cgroup("memory.current")
    if limit is not None and used is not None:
        room.append(limit - used)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        room.append(soft - _kilobytes("/proc/self/status").get("VmSize", 0))
    return max(min(room), 0)


def check_fits_in_memory(what: str, nbytes: int, loc, op_name: str | None = None) -> None:
    """A located error unless `nbytes` for `what` fit in the memory available now."""
    available = available_memory_bytes()
    if nbytes > available:
        d = Diagnostics()
        d.error(loc, f"{what} needs {format_bytes(nbytes)}; only {format_bytes(available)} of memory is available", op_name)
        raise DiagnosticError(d.errors)
