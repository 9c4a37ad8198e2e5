"""host_memory: commands re-execute themselves under tcmalloc where it is installed; else
glibc keeps freed blocks in the process, and gives them back on request.

Each case runs in a fresh interpreter: the allocator is process-wide, and glibc's tuning
must come before any thread takes an arena.
"""
import json
import os
import subprocess
import sys

import pytest

from jaxseg import cli, host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc")


def _environment(**settings: str) -> dict[str, str]:
    """This process's environment without an allocator choice or preload (the suite's
    conftest preloads tcmalloc for the commands it starts), plus `settings`."""
    unset = (host_memory.CHOICE_VARIABLE, "LD_PRELOAD", host_memory._REEXECUTED_VARIABLE)
    return {**{key: value for key, value in os.environ.items() if key not in unset},
            "JAX_PLATFORMS": "cpu", **settings}

# Plain malloc, as XLA:CPU allocates. What is checked is whether glibc maps a large block on
# its own (mallinfo2's hblkhd: bytes in mmapped blocks) and what stays resident; page
# faults would depend on the machine's transparent huge pages.
_HELPERS = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc.mallinfo2.restype = MallInfo2

def round_trip(size=256 << 20):
    \"\"\"Allocates, touches and frees a block; returns the mmapped MiB while it was held.\"\"\"
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    mapped_mib = libc.mallinfo2().hblkhd / 2**20
    libc.free(block)
    return mapped_mib
"""

# Frees a 256 MiB block, as XLA:CPU does with a step's temporaries, allocates it again, and
# reports whether it was mapped afresh and the resident size before and after
# release_freed_memory.
_PROBE = """
import json, sys
from jaxseg import host_memory
applied = host_memory.keep_freed_memory(sys.argv[1])
""" + _HELPERS + """
round_trip()
mapped_mib = round_trip()
kept = host_memory.resident_bytes()
host_memory.release_freed_memory()
print(json.dumps({"applied": applied, "mapped_mib": mapped_mib, "kept_mib": kept / 2**20,
                  "released_mib": host_memory.resident_bytes() / 2**20}))
"""


def _probe(choice: str = "auto", platforms: str = "cpu") -> dict:
    completed = subprocess.run([sys.executable, "-c", _PROBE, choice],
                               env=_environment(JAX_PLATFORMS=platforms),
                               capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_freed_block_is_reused_not_mapped_again_and_released_on_request():
    kept = _probe()
    assert kept["applied"]
    assert kept["mapped_mib"] < 16  # the block came from the heap, where the last one was
    assert kept["kept_mib"] - kept["released_mib"] > 200


_CROWDED_PROBE = """
import json
from jaxseg import host_memory
host_memory.keep_freed_memory()
""" + _HELPERS + """
round_trip()
resident = host_memory.resident_bytes()

def fall_back_if_crowded(limit_bytes):
    host_memory.memory_limit_bytes = lambda: limit_bytes
    return host_memory.fall_back_if_crowded()

roomy = fall_back_if_crowded(4 * resident)
crowded = fall_back_if_crowded(2 * resident)
after = host_memory.resident_bytes()
print(json.dumps({"roomy": roomy, "crowded": crowded, "freed_mib": (resident - after) / 2**20,
                  "mapped_mib_after": round_trip(), "kept": host_memory.keeps_freed_memory(),
                  "again": fall_back_if_crowded(1)}))
"""


def test_crowded_process_falls_back_to_glibc_defaults():
    completed = subprocess.run([sys.executable, "-c", _CROWDED_PROBE], env=_environment(),
                               capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    # Holding a quarter of the limit is room enough; half of it is crowded.
    assert not result["roomy"] and result["crowded"]
    assert not result["kept"]
    assert result["freed_mib"] > 200  # the kept block went back at once
    assert result["mapped_mib_after"] >= 256  # and large blocks are mapped afresh again
    assert not result["again"]


def test_glibc_defaults_map_every_round():
    default = _probe("glibc")
    assert not default["applied"]
    assert default["mapped_mib"] >= 256  # mapped afresh, to be zeroed by the kernel again
    assert default["kept_mib"] - default["released_mib"] < 50


def test_accelerator_host_keeps_glibc_defaults_unless_asked():
    assert not _probe(platforms="cuda")["applied"]
    assert _probe("glibc-tuned", platforms="cuda")["applied"]


def test_choice_with_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(host_memory.CHOICE_VARIABLE, "yes")
    with pytest.raises(cli.InputError, match="JAXSEG_ALLOCATOR='yes'"):
        host_memory.use_fast_allocator()


# A command's first steps: what it printed before `use_fast_allocator`, then what it runs
# under. Re-executed, the script prints its first line twice, from the same process.
_COMMAND = """
import json, os, sys
from jaxseg import cli, host_memory
print("started", os.getpid(), flush=True)
try:
    allocator = host_memory.use_fast_allocator()
except cli.InputError as error:
    print("error:", error)
    sys.exit(1)
print(json.dumps({"allocator": allocator, "pid": os.getpid(), "argv": sys.argv[1:],
                  "tcmalloc_mapped": host_memory.tcmalloc_loaded(),
                  "kept": host_memory.keeps_freed_memory()}))
"""


def _command(**settings: str) -> tuple[list[str], dict]:
    completed = subprocess.run([sys.executable, "-c", _COMMAND, "--workdir=x y", "--n=2"],
                               env=_environment(**settings), capture_output=True, text=True)
    lines = completed.stdout.strip().splitlines()
    return lines[:-1], json.loads(lines[-1]) if completed.returncode == 0 else lines[-1]


@pytest.mark.skipif(host_memory.tcmalloc_library() is None,
                    reason="no tcmalloc installed (apt-get install libtcmalloc-minimal4)")
def test_command_reexecutes_itself_under_tcmalloc_once():
    started, result = _command()
    pid = result["pid"]
    assert started == [f"started {pid}"] * 2  # the same process, started twice
    assert result == {"allocator": "tcmalloc", "pid": pid, "argv": ["--workdir=x y", "--n=2"],
                      "tcmalloc_mapped": True, "kept": False}
    # Started under the preload already (as the tests start commands): no second start.
    started, result = _command(LD_PRELOAD=host_memory.tcmalloc_library())
    assert len(started) == 1 and result["allocator"] == "tcmalloc"
    assert _command(JAXSEG_ALLOCATOR="tcmalloc")[1]["allocator"] == "tcmalloc"


def test_without_tcmalloc_a_command_tunes_glibc_or_names_what_is_missing(monkeypatch):
    started, result = _command(JAXSEG_ALLOCATOR="glibc-tuned")
    assert len(started) == 1
    assert result["allocator"] == "glibc-tuned" and result["kept"]
    assert not result["tcmalloc_mapped"]
    started, result = _command(JAXSEG_ALLOCATOR="glibc")
    assert (len(started), result["allocator"], result["kept"]) == (1, "glibc", False)
    monkeypatch.setattr(host_memory, "tcmalloc_library", lambda: None)
    monkeypatch.setattr(host_memory, "tcmalloc_loaded", lambda: False)
    monkeypatch.setenv(host_memory.CHOICE_VARIABLE, "tcmalloc")
    with pytest.raises(cli.InputError, match="JAXSEG_ALLOCATOR=tcmalloc: no tcmalloc"):
        host_memory.use_fast_allocator()
    assert host_memory.preload_environment() == {}


def test_preload_keeps_the_preloads_already_asked_for(monkeypatch):
    monkeypatch.setattr(host_memory, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.delenv(host_memory.CHOICE_VARIABLE, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "libfoo.so")
    assert host_memory.preload_environment() == {
        "LD_PRELOAD": "libtcmalloc_minimal.so.4:libfoo.so"}
    monkeypatch.setenv("LD_PRELOAD", "libfoo.so:libtcmalloc_minimal.so.4")
    assert host_memory.preload_environment() == {}
    monkeypatch.setenv(host_memory.CHOICE_VARIABLE, "glibc")
    monkeypatch.delenv("LD_PRELOAD")
    assert host_memory.preload_environment() == {}


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cpu,cuda", True),
                                                 ("cuda", False), ("tpu,cpu", False)])
def test_jax_platforms_decide_the_backend(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.jax_runs_on_cpu() is expected


def test_cgroup_limits_take_the_process_group_and_its_ancestors(tmp_path):
    group = tmp_path / "machine.slice" / "job.scope"
    group.mkdir(parents=True)
    (tmp_path / "memory.max").write_text("max\n")  # the root sets none
    (tmp_path / "machine.slice" / "memory.max").write_text("8589934592\n")
    (group / "memory.max").write_text("4294967296\n")
    (tmp_path / "machine.slice" / "other.scope").mkdir()
    (tmp_path / "machine.slice" / "other.scope" / "memory.max").write_text("1024\n")
    limits = host_memory.cgroup_limits(tmp_path, "/machine.slice/job.scope", "memory.max")
    assert sorted(limits) == [4294967296, 8589934592]
    assert host_memory.cgroup_limits(tmp_path, "/", "memory.max") == []
    assert host_memory.cgroup_limits(tmp_path, "/gone.scope", "memory.max") == []
    # cgroup v1 names the file differently
    assert host_memory.cgroup_limits(tmp_path, "/machine.slice", "memory.limit_in_bytes") == []


def test_memory_limit_is_at_most_the_machine_memory():
    with open("/proc/meminfo") as meminfo:
        total_kib = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    assert 0 < host_memory.memory_limit_bytes() <= total_kib * 1024
