"""What the processes of one run share on the host side, between two real processes.

gloo gives a process 30 s to join a new collective; a process that reaches a decision
or a gathering later than that (it predicted more slides, it listed a slow bucket) must
still find the others waiting.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from test_multiprocess import _free_port
from test_reliability import REPO, _env

LATE_BY_S = 32
LARGE_CHARS = 5 * 2 ** 20 // 2  # split into several parts of the store

_PROGRAM = textwrap.dedent(f"""
    import json, sys, time
    from jaxseg import cli, processes

    address, index = sys.argv[1], int(sys.argv[2])
    processes.join(address, 2, index)
    if index == 1:
        time.sleep({LATE_BY_S})
    gathered = processes.gathered({{"process": index, "text": str(index) * {LARGE_CHARS}}})
    decided = processes.decided_by_main(lambda: {{"by": processes.jax.process_index()}})

    def refuse():
        raise cli.InputError("workdir: made by another run")

    try:
        processes.decided_by_main(refuse)
        refused = None
    except ValueError as error:
        refused = str(error)
    print(json.dumps({{"gathered": [(item["process"], len(item["text"]), item["text"][:1])
                                   for item in gathered],
                      "decided": decided, "refused": refused}}))
""")


def test_a_process_late_by_more_than_gloo_waits_still_shares_and_decides(tmp_path: Path):
    program = tmp_path / "share.py"
    program.write_text(_PROGRAM)
    address = f"localhost:{_free_port()}"
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    started = [subprocess.Popen([sys.executable, str(program), address, str(index)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for index in range(2)]
    outputs = [process.communicate(timeout=LATE_BY_S + 120) for process in started]
    for process, (_, errors) in zip(started, outputs):
        assert process.returncode == 0, errors[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    expected = {"gathered": [[0, LARGE_CHARS, "0"], [1, LARGE_CHARS, "1"]],
                "decided": {"by": 0}, "refused": "workdir: made by another run"}
    assert results == [expected, expected]
