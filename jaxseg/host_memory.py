"""The host's memory allocator: tcmalloc where it is installed, else glibc tuned.

XLA:CPU allocates a step's temporaries as one buffer (gigabytes for the Unet) with malloc,
and frees it when the step ends. glibc serves a request that large with a fresh mmap and
unmaps it on free, so every step page-faults and the kernel zeroes all of it again, a large
share of the step's time. tcmalloc keeps freed spans for the next request of their size,
and of the allocators compared in BENCHMARKS.md it gave the fastest steps, with no
out-of-memory kill and no bookkeeping of ours. A preloaded allocator must be in place
before the interpreter starts, so a command that runs steps re-executes itself once under
it (`use_fast_allocator`, the first thing its `main` does).

Where no tcmalloc is installed, glibc is tuned instead, before JAX starts its threads: one
malloc arena (a thread's private arena would still map large blocks itself), no mmap for
large blocks, and no trimming of the heap's top, so freed pages stay with the process;
`release_freed_memory` hands them back between epochs. Its price is fragmentation: a
small block landing inside a freed step buffer makes the next one grow the heap by a
second copy, which can exceed the machine's memory (B5 at 512 px). So after a phase's
first step `fall_back_if_crowded` restores glibc's defaults in a process that holds a
large share of the memory. Nothing here changes what is computed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
import time
from pathlib import Path

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
# How long to wait before trimming in `fall_back_if_crowded`: XLA:CPU frees a step's
# buffer on its own thread, a while after the step's outputs are ready.
FREE_WAIT_S = 0.5

CHOICE_VARIABLE = "JAXSEG_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "glibc-tuned", "glibc")
# Set in the environment of a re-executed command: a preload the loader refused (it only
# warns) must not make the command re-execute itself again and again.
_REEXECUTED_VARIABLE = "JAXSEG_ALLOCATOR_REEXECUTED"
# The sonames Debian/Ubuntu's libtcmalloc-minimal4 and libgoogle-perftools4 install.
_TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")
_kept = False


def allocator_choice() -> str:
    """JAXSEG_ALLOCATOR, checked: `auto` (unset) takes tcmalloc where it is installed and
    tuned glibc where JAX runs on the CPU; the others force one."""
    choice = os.environ.get(CHOICE_VARIABLE, "") or "auto"
    if choice not in CHOICES:
        raise cli.InputError(f"{CHOICE_VARIABLE}={choice!r}: expected one of "
                             f"{', '.join(CHOICES)} or unset")
    return choice


def tcmalloc_library() -> str | None:
    """The soname of an installed tcmalloc, which the dynamic loader can preload."""
    if not sys.platform.startswith("linux"):
        return None
    for name in _TCMALLOC_NAMES:
        library = ctypes.util.find_library(name)
        if library:
            return library
    return None


def tcmalloc_loaded() -> bool:
    """Whether this process runs with tcmalloc mapped (preloaded, or linked)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libtcmalloc" in line for line in maps)
    except OSError:
        return False


def preload_environment() -> dict[str, str]:
    """What a child process's environment needs to start under tcmalloc (nothing when
    tcmalloc is not the choice or not installed)."""
    library = tcmalloc_library()
    if allocator_choice() not in ("auto", "tcmalloc") or library is None:
        return {}
    preloads = os.environ.get("LD_PRELOAD", "")
    if library in preloads.split(":"):
        return {}
    return {"LD_PRELOAD": ":".join(filter(None, (library, preloads)))}


def use_fast_allocator() -> str:
    """Puts the chosen allocator in force, first thing in a command that runs steps:
    re-executes the command under tcmalloc, or tunes glibc. Returns the allocator in force
    ("tcmalloc", "glibc-tuned" or "glibc").

    The re-execution keeps the process id, arguments and open files; it costs one more
    start of the interpreter and its imports, seconds against a run of minutes.
    """
    choice = allocator_choice()
    if tcmalloc_loaded():
        return "tcmalloc"
    if choice in ("auto", "tcmalloc") and tcmalloc_library() is not None \
            and not os.environ.get(_REEXECUTED_VARIABLE):
        environment = {**os.environ, **preload_environment(), _REEXECUTED_VARIABLE: "1"}
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
    if choice == "tcmalloc":
        raise cli.InputError(f"{CHOICE_VARIABLE}=tcmalloc: no tcmalloc could be loaded "
                             "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
    return "glibc-tuned" if keep_freed_memory(choice) else "glibc"


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
    """Whether JAX will pick its CPU backend, decided without starting any backend."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    if importlib.util.find_spec("libtpu") is not None:
        return False
    namespace = importlib.util.find_spec("jax_plugins")
    return namespace is None or not any(pkgutil.iter_modules(namespace.submodule_search_locations))


def keep_freed_memory(choice: str = "auto") -> bool:
    """Tunes glibc so freed memory is reused, not returned; True when it was applied.

    Must run before JAX's backend starts (its threads take their arenas at their first
    malloc). `auto` applies it where JAX runs on the CPU: on an accelerator host the step's
    memory lives on the device, and the input pipeline's threads are better off with their
    own arenas; `glibc-tuned` applies it anywhere, `glibc` nowhere.
    """
    if choice == "glibc" or (choice == "auto" and not jax_runs_on_cpu()):
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


def fall_back_if_crowded() -> bool:
    """Restores glibc's defaults when the process keeps freed memory and holds over
    CROWDED_FRACTION of the machine's (or its cgroup's) memory; True when it did. Call it
    after a phase's first step has finished, when the step's buffers have been allocated
    once (free and resident)."""
    global _kept
    if not _kept or resident_bytes() <= CROWDED_FRACTION * memory_limit_bytes():
        return False
    for option, value in _GLIBC_DEFAULTS:
        _glibc().mallopt(option, value)
    # Trimming before XLA:CPU has freed the step's buffer would leave it resident beside
    # the next step's fresh mapping, enough for an out-of-memory kill.
    time.sleep(FREE_WAIT_S)
    release_freed_memory()
    _kept = False
    return True


def release_freed_memory() -> None:
    """Returns every free page of the heap to the system; nothing to do unless freed
    memory is being kept (glibc's defaults return large blocks on their own)."""
    if _kept:
        _glibc().malloc_trim(0)
