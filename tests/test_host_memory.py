"""host_memory: freed blocks stay in the process, and come back to the system on request.

Each case runs in a fresh interpreter: glibc's tuning is process-wide and must come before
any thread takes an arena.
"""
import json
import os
import subprocess
import sys

import pytest

from jaxseg import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc")

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
import json
from jaxseg import host_memory
applied = host_memory.keep_freed_memory()
""" + _HELPERS + """
round_trip()
mapped_mib = round_trip()
kept = host_memory.resident_bytes()
host_memory.release_freed_memory()
print(json.dumps({"applied": applied, "mapped_mib": mapped_mib, "kept_mib": kept / 2**20,
                  "released_mib": host_memory.resident_bytes() / 2**20}))
"""


def _probe(switch: str | None, platforms: str = "cpu") -> dict:
    env = {key: value for key, value in os.environ.items()
           if key != host_memory.SWITCH_VARIABLE}
    env["JAX_PLATFORMS"] = platforms
    if switch is not None:
        env[host_memory.SWITCH_VARIABLE] = switch
    completed = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                               text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_freed_block_is_reused_not_mapped_again_and_released_on_request():
    kept = _probe(switch=None)
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
roomy = host_memory.fall_back_if_crowded(limit_bytes=4 * resident)
crowded = host_memory.fall_back_if_crowded(limit_bytes=2 * resident)
after = host_memory.resident_bytes()
print(json.dumps({"roomy": roomy, "crowded": crowded, "freed_mib": (resident - after) / 2**20,
                  "mapped_mib_after": round_trip(),
                  "again": host_memory.fall_back_if_crowded(limit_bytes=1)}))
"""


def test_crowded_process_falls_back_to_glibc_defaults():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop(host_memory.SWITCH_VARIABLE, None)
    completed = subprocess.run([sys.executable, "-c", _CROWDED_PROBE], env=env,
                               capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    # Holding a quarter of the limit is room enough; half of it is crowded.
    assert not result["roomy"] and result["crowded"]
    assert result["freed_mib"] > 200  # the kept block went back at once
    assert result["mapped_mib_after"] >= 256  # and large blocks are mapped afresh again
    assert not result["again"]  # once fallen back, it stays so


def test_glibc_defaults_map_every_round():
    default = _probe(switch="0")
    assert not default["applied"]
    assert default["mapped_mib"] >= 256  # mapped afresh, to be zeroed by the kernel again
    assert default["kept_mib"] - default["released_mib"] < 50


def test_accelerator_host_keeps_glibc_defaults_unless_asked():
    assert not _probe(switch=None, platforms="cuda")["applied"]
    assert _probe(switch="1", platforms="cuda")["applied"]


def test_switch_with_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(host_memory.SWITCH_VARIABLE, "yes")
    with pytest.raises(ValueError, match="JAXSEG_KEEP_FREED_MEMORY='yes'"):
        host_memory.keep_freed_memory()


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
