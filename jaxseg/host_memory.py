"""Keeps the memory XLA:CPU frees after a step in the process, for the next step.

XLA:CPU allocates a step's temporaries as one buffer (gigabytes for the Unet) with
malloc, and frees it when the step ends. glibc serves a request that large with a fresh
mmap and unmaps it on free, so every step page-faults and the kernel zeroes all of it
again, a large share of the step's time (BENCHMARKS.md). TensorFlow's allocator keeps its
buffers, which is part of why Keras was ahead there.

The cure is glibc's own tuning, set before JAX starts its threads: one malloc arena (a
thread's private arena would still map large blocks itself), no mmap for large blocks, and
no trimming of the heap's top. Freed pages then stay with the process; `release_freed_memory`
hands them back at the phase boundaries of a run (the end of an epoch), so a phase's
leftovers cannot pile up. Nothing here changes what is computed.

The price is fragmentation: when a small block lands inside a freed step buffer, the next
step's buffer no longer fits there and the heap grows by a second one. On a machine where
a second copy would not fit (b5 at 512 px batch 8 on the machine of BENCHMARKS.md), that is
an out-of-memory kill. So after a phase's first step `guard_if_crowded` checks whether the
process holds a large share of the memory, and if so every later step program
(`with_room`, which `parallel.data_parallel` applies) first waits for the step before it
and runs `make_room`: the freed memory is kept only while malloc is bound to serve the next
buffer from the top of the heap, whose pages are the previous buffer's; otherwise the free
pages go back first.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from jaxseg import cli

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

# How long `make_room` waits for the previous step's buffer to be freed: XLA:CPU frees it
# on its own thread, a while after the step's outputs are ready.
ROOM_WAIT_S = 0.5

SWITCH_VARIABLE = "JAXSEG_KEEP_FREED_MEMORY"
_kept = False
_guarding = False
_last_outputs: Any = None  # of the last guarded program call, awaited before the next one
_held_chunks: list[int] = []  # kept out of malloc's reach by make_room
MAX_HELD_CHUNKS = 2


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


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
        raise cli.InputError(f"{SWITCH_VARIABLE}={switch!r}: expected 0, 1 or unset")
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


def _can_guard() -> bool:
    """Whether glibc reports its heap as `make_room` reads it (mallinfo2: glibc 2.33)."""
    libc = _glibc()
    return libc is not None and all(hasattr(libc, name) for name in (
        "mallinfo2", "malloc_info", "open_memstream", "fclose", "free"))


def heap_top_bytes() -> int:
    """Size of the free chunk at the top of the heap, which malloc extends in place."""
    libc = _glibc()
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().keepcost


def largest_binned_chunk_bytes() -> int:
    """The largest free chunk anywhere but the heap's top, from malloc_info's report."""
    libc = _glibc()
    libc.open_memstream.restype = ctypes.c_void_p
    text, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = ctypes.c_void_p(libc.open_memstream(ctypes.byref(text), ctypes.byref(size)))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    report = ctypes.string_at(text, size.value).decode()
    libc.free(text)
    return max(map(int, re.findall(r'<(?:size|unsorted) from="\d+" to="(\d+)"', report)),
               default=0)


def make_room(buffer_bytes: int) -> bool:
    """Before a step that allocates `buffer_bytes` while guarding: keeps the freed memory
    if the step will reuse the top of the heap, else returns the heap's free pages, so the
    step's fresh pages cannot come on top of resident free ones. True when it returned.

    A binned chunk that could take the buffer is then held (its pages returned, so it
    costs address space only): the step's buffer comes from the top of the heap instead,
    and, freed, merges back into it, where the next step finds it."""
    deadline = time.monotonic() + ROOM_WAIT_S
    while True:
        binned = largest_binned_chunk_bytes()
        if heap_top_bytes() >= buffer_bytes and binned < buffer_bytes:
            return False
        if binned >= buffer_bytes or time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    libc = _glibc()
    libc.malloc_trim(0)
    if binned >= buffer_bytes and len(_held_chunks) < MAX_HELD_CHUNKS:
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        _held_chunks.append(libc.malloc(buffer_bytes))
    return True


def guard_if_crowded() -> bool:
    """When the process holds over CROWDED_FRACTION of the memory, makes every later step
    find room first (`with_room`); where glibc cannot report its heap, restores glibc's
    defaults instead. True when the process is crowded. Call it after a phase's first step
    has finished, when the step's buffers have been allocated once (free and resident)."""
    global _kept, _guarding
    if not _kept or _guarding:
        return False
    if resident_bytes() <= CROWDED_FRACTION * memory_limit_bytes():
        return False
    if _can_guard():
        _guarding = True
        return True
    for option, value in _GLIBC_DEFAULTS:
        _glibc().mallopt(option, value)
    # Trimming before XLA:CPU has freed the step's buffer would leave it resident beside
    # the next step's fresh mapping, enough for an out-of-memory kill (BENCHMARKS.md).
    time.sleep(ROOM_WAIT_S)
    release_freed_memory()
    _kept = False
    return True


def with_room(program: Callable) -> Callable:
    """`program` (a jitted step, with `lower`) that, while guarding, first waits for the
    last guarded call to finish and makes room for its own temporary buffer."""
    temp_bytes: list[int] = []

    def call(*args: Any) -> Any:
        global _last_outputs
        if _guarding:
            import jax  # here, not at import: JAX must not start before keep_freed_memory

            if _last_outputs is not None:
                jax.block_until_ready([leaf for leaf in jax.tree.leaves(_last_outputs)
                                       if not leaf.is_deleted()])
                _last_outputs = None
            if not temp_bytes:  # compiled already: the jit cache answers
                analysis = program.lower(*args).compile().memory_analysis()
                temp_bytes.append(analysis.temp_size_in_bytes if analysis else 0)
            if temp_bytes[0]:
                make_room(temp_bytes[0])
        outputs = program(*args)
        if _guarding:
            _last_outputs = outputs
        return outputs

    call.lower = program.lower
    return call


def release_freed_memory() -> None:
    """Returns every free page of the heap to the system; nothing to do unless freed
    memory is being kept (glibc's defaults return large blocks on their own)."""
    if _kept:
        _glibc().malloc_trim(0)
