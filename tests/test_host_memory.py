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
needs_heap_report = pytest.mark.skipif(not host_memory._can_guard(),
                                       reason="needs glibc 2.33 (mallinfo2)")

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
import json, sys
from jaxseg import host_memory
host_memory.keep_freed_memory()
if sys.argv[1] == "no_heap_report":  # a glibc before 2.33 has no mallinfo2
    host_memory._can_guard = lambda: False
""" + _HELPERS + """
round_trip()
resident = host_memory.resident_bytes()

def guard_if_crowded(limit_bytes):
    host_memory.memory_limit_bytes = lambda: limit_bytes
    return host_memory.guard_if_crowded()

roomy = guard_if_crowded(4 * resident)
crowded = guard_if_crowded(2 * resident)
after = host_memory.resident_bytes()
print(json.dumps({"roomy": roomy, "crowded": crowded, "freed_mib": (resident - after) / 2**20,
                  "mapped_mib_after": round_trip(), "kept": host_memory.keeps_freed_memory(),
                  "guarding": host_memory._guarding, "again": guard_if_crowded(1)}))
"""


def _crowded_probe(case: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop(host_memory.SWITCH_VARIABLE, None)
    completed = subprocess.run([sys.executable, "-c", _CROWDED_PROBE, case], env=env,
                               capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@needs_heap_report
def test_crowded_process_keeps_freed_memory_under_guard():
    result = _crowded_probe("glibc")
    # Holding a quarter of the limit is room enough; half of it is crowded.
    assert not result["roomy"] and result["crowded"]
    assert result["kept"] and result["guarding"]
    assert result["freed_mib"] < 50  # nothing given back yet: make_room decides per step
    assert result["mapped_mib_after"] < 16  # large blocks still come from the heap
    assert not result["again"]  # once guarding, it stays so


def test_crowded_process_without_heap_report_falls_back_to_glibc_defaults():
    result = _crowded_probe("no_heap_report")
    assert not result["roomy"] and result["crowded"]
    assert not result["kept"] and not result["guarding"]
    assert result["freed_mib"] > 200  # the kept block went back at once
    assert result["mapped_mib_after"] >= 256  # and large blocks are mapped afresh again
    assert not result["again"]


# Three layouts of a freed 256 MiB step buffer, as a step and the threads beside it leave
# the heap. Blocks allocated after the buffer sit above it; freeing the one at the top merges
# it into the heap's top chunk.
_ROOM_PROBE = """
import json
from jaxseg import host_memory
host_memory.keep_freed_memory()
""" + _HELPERS + """
SIZE = 256 << 20
def top_serves(buffer_bytes):
    \"\"\"Whether malloc will take a buffer of this size from the heap's top: it looks in its
    bins first (best fit), and a binned chunk may have given its pages back.\"\"\"
    return (host_memory.heap_top_bytes() >= buffer_bytes
            and host_memory.largest_binned_chunk_bytes() < buffer_bytes)

def touched(size):
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    return block

def case(free_order):
    blocks = {"buffer": touched(SIZE), "above": touched(64 << 20), "last": touched(SIZE)}
    for name in free_order:
        libc.free(blocks.pop(name))
    before = host_memory.resident_bytes()
    result = {"top_serves": top_serves(SIZE), "trimmed": host_memory.make_room(SIZE),
              "released_mib": (before - host_memory.resident_bytes()) / 2**20}
    libc.free(touched(SIZE))  # the step
    result["then_top_serves"] = top_serves(SIZE)
    for block in blocks.values():
        libc.free(block)
    host_memory.release_freed_memory()
    return result

print(json.dumps({
    # the buffer merged into the top: the next one reuses its resident pages
    "at_top": case(["last"]),
    # the buffer below a live block: a small block may split it, and the next buffer would
    # then come fresh from the top on top of these resident pages
    "in_a_bin": case(["buffer"]),
    # one at the top and one as large in a bin: malloc takes the binned one first (best fit)
    "both": case(["buffer", "last"]),
}))
"""


@needs_heap_report
def test_make_room_keeps_only_a_buffer_the_top_of_the_heap_will_serve():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop(host_memory.SWITCH_VARIABLE, None)
    completed = subprocess.run([sys.executable, "-c", _ROOM_PROBE], env=env,
                               capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["at_top"]["top_serves"] and not result["at_top"]["trimmed"]
    assert result["at_top"]["released_mib"] < 16
    for layout in ("in_a_bin", "both"):
        assert not result[layout]["top_serves"] and result[layout]["trimmed"], layout
        assert result[layout]["released_mib"] > 200, layout
    # The binned chunk is held, so the step's buffer came from the top and went back there.
    assert all(case["then_top_serves"] for case in result.values())


def test_with_room_makes_room_for_the_program_buffer_only_while_guarding(monkeypatch):
    import jax
    import jax.numpy as jnp
    import numpy as np

    program = jax.jit(lambda x: jnp.sort(jnp.sin(x) * 2.0) + jnp.cumsum(jnp.cos(x)))
    x = np.arange(4096, dtype=np.float32)
    expected_bytes = program.lower(x).compile().memory_analysis().temp_size_in_bytes
    asked = []
    monkeypatch.setattr(host_memory, "make_room", asked.append)
    guarded = host_memory.with_room(program)
    assert guarded.lower == program.lower
    assert expected_bytes > 0
    monkeypatch.setattr(host_memory, "_guarding", False)
    np.testing.assert_array_equal(guarded(x), program(x))
    assert asked == []
    monkeypatch.setattr(host_memory, "_guarding", True)
    monkeypatch.setattr(host_memory, "_last_outputs", None)
    for _ in range(2):
        np.testing.assert_array_equal(guarded(x), program(x))
    assert asked == [expected_bytes, expected_bytes]
    assert host_memory._last_outputs is not None  # the next call waits for this one


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
