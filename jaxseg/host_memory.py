"""Keeps the memory XLA:CPU frees after a step in the process, for the next step.

XLA:CPU allocates a step's temporaries as one buffer (1.4 GB for Unet-b0 at 256 px batch
8, 14 GB for b5 at 512 px batch 8) with malloc, and frees it when the step ends. glibc
serves a request that large with a fresh mmap and unmaps it on free, so every step
page-faults and the kernel zeroes all of it again: on the 2-core machine of BENCHMARKS.md
that was 0.7 of 2.4 s per b0 step and 14 of 30 s per b5 step. TensorFlow's allocator keeps
its buffers, which is part of why Keras was ahead there.

The cure is glibc's own tuning, set before JAX starts its threads: one malloc arena (a
thread's private arena would still map large blocks itself), no mmap for large blocks, and
no trimming of the heap's top. Freed pages then stay with the process; `release_freed_memory`
hands them back at the phase boundaries of a run (the end of an epoch), so a phase's
leftovers cannot pile up. Nothing here changes what is computed.

The price is fragmentation: when a small block lands inside a freed step buffer, the next
step's buffer no longer fits there and the heap grows by a second one. On a machine where
a second copy would not fit (b5 at 512 px batch 8 holds 16 GB of 24), that is an out-of-
memory kill, so `fall_back_if_crowded` restores glibc's defaults after a phase's first step
when the process already holds a large share of the memory.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NO_TRIMMING = -1  # mallopt takes an int; glibc reads it as size_t, the largest threshold
# Where glibc's defaults settle once a large block has been freed: blocks up to 32 MiB come
# from the heap and the heap's top is trimmed above 64 MiB (mallopt cannot restore the
# sliding thresholds themselves). The one arena stays: glibc fixes its arena limit when the
# first thread takes one.
_GLIBC_DEFAULTS = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 << 20),
                   (_M_TRIM_THRESHOLD, 64 << 20))
# A step's freed buffers are at most what the process holds; twice that must stay under
# the machine's memory, with room for the page cache and the rest of the system.
CROWDED_FRACTION = 0.45

SWITCH_VARIABLE = "JAXSEG_KEEP_FREED_MEMORY"
_kept = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library, when it is glibc (musl and macOS have no mallopt)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt",
                                                 "malloc_trim")):
        return None
    return libc


def jax_runs_on_cpu() -> bool:
    """Whether JAX will pick its CPU backend, decided without starting any backend.

    An accelerator host keeps glibc's defaults: there the step's memory lives on the
    device, and the input pipeline's threads are better off with their own arenas.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    if importlib.util.find_spec("libtpu") is not None:
        return False
    namespace = importlib.util.find_spec("jax_plugins")
    return namespace is None or not any(pkgutil.iter_modules(namespace.submodule_search_locations))


def keep_freed_memory() -> bool:
    """Tunes glibc so freed memory is reused, not returned; True when it was applied.

    Must run before JAX's backend starts (its threads take their arenas at their first
    malloc). `JAXSEG_KEEP_FREED_MEMORY=0` leaves glibc alone; `=1` applies the tuning on
    an accelerator host too; unset, it applies where JAX runs on the CPU.
    """
    switch = os.environ.get(SWITCH_VARIABLE, "auto")
    if switch not in ("auto", "0", "1"):
        raise ValueError(f"{SWITCH_VARIABLE}={switch!r}: expected 0, 1 or unset")
    if switch == "0" or (switch == "auto" and not jax_runs_on_cpu()):
        return False
    libc = _glibc()
    if libc is None:
        return False
    global _kept
    _kept = all(libc.mallopt(option, value) == 1 for option, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NO_TRIMMING)))
    return _kept


def keeps_freed_memory() -> bool:
    """Whether the tuning is in force (applied, and not fallen back)."""
    return _kept


def cgroup_limits(hierarchy: Path, cgroup_path: str, limit_file: str) -> list[int]:
    """The memory limits that bind a process in `cgroup_path` (as /proc/self/cgroup names
    it) within one mounted hierarchy: its own group's and every ancestor's that sets one."""
    limits = []
    group = hierarchy / cgroup_path.strip("/")
    for directory in (group, *group.parents):
        try:
            text = (directory / limit_file).read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            limits.append(int(text))
        if directory == hierarchy:
            break
    return limits


def memory_limit_bytes() -> int:
    """The machine's memory, or the tightest cgroup (v2 or v1) limit on this process."""
    with open("/proc/meminfo") as meminfo:
        total = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    limits = [total * 1024]
    try:
        with open("/proc/self/cgroup") as cgroup:
            lines = [line.rstrip("\n").split(":", 2) for line in cgroup]
    except OSError:
        lines = []
    for fields in lines:
        if len(fields) != 3:
            continue
        hierarchy_id, controllers, path = fields
        if hierarchy_id == "0" and not controllers:
            limits += cgroup_limits(Path("/sys/fs/cgroup"), path, "memory.max")
        elif "memory" in controllers.split(","):
            limits += cgroup_limits(Path("/sys/fs/cgroup/memory"), path,
                                    "memory.limit_in_bytes")
    return min(limits)


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) * 1024


def fall_back_if_crowded(limit_bytes: int | None = None) -> bool:
    """Restores glibc's defaults when the process holds over CROWDED_FRACTION of the
    memory; True when it did. Call it after a phase's first step has finished, when the
    step's buffers have been allocated once (and are free and resident)."""
    global _kept
    if not _kept:
        return False
    limit = memory_limit_bytes() if limit_bytes is None else limit_bytes
    if resident_bytes() <= CROWDED_FRACTION * limit:
        return False
    for option, value in _GLIBC_DEFAULTS:
        _glibc().mallopt(option, value)
    release_freed_memory()
    _kept = False
    return True


def release_freed_memory() -> None:
    """Returns every free page of the heap to the system; nothing to do unless freed
    memory is being kept (glibc's defaults return large blocks on their own)."""
    if _kept:
        _glibc().malloc_trim(0)
