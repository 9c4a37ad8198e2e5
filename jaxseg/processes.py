"""The processes of one run: joining them, one voice, one decision, one stop step.

Every process runs the same program; files are only trusted on process 0, which may be
the only host that sees them without a shared file system. So process 0 decides from
files and shares the outcome, prints progress and writes the run's files, while orbax
keeps its own multi-host protocol for checkpoints.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxseg import cli

# A process that stops sending heartbeats (killed, hung, its host gone) is declared dead
# after this long, and the others then exit with an error instead of waiting in a
# collective; JAX's default is 100 s. A process that ends waits at most
# SHUTDOWN_TIMEOUT_S for the others (JAX's default 300 s).
HEARTBEAT_TIMEOUT_S = 10
SHUTDOWN_TIMEOUT_S = 30
# A process that fails says why under this key prefix of the coordination service's
# key-value store; the others look every FAILURE_POLL_S and stop with that line. Process
# 0 hosts the store, so it leaves last: it acknowledges a failure at once, then lingers
# FAILURE_GRACE_S while the failing process (waiting for that acknowledgement) leaves.
_FAILURES = "jaxseg/failed/"
_ACKNOWLEDGED = "jaxseg/failure_seen"
FAILURE_POLL_S = 0.5
FAILURE_GRACE_S = 2.0
# Decisions and gathered values travel through the coordination service's key-value
# store, not through device collectives: gloo gives a process 30 s to join a new
# collective, and the process that decides (lists a bucket, takes a lock) or that
# predicts the larger share of the slides keeps the others waiting far longer. A process
# that fails stops the others long before they give up waiting (`stop_every_process`).
_SHARED = "jaxseg/shared/"
_SHARE_WAIT_MS = 24 * 3600 * 1000
_SHARE_PART_CHARS = 1 << 20  # well under gRPC's default message limit of 4 MiB
_share_count = itertools.count()


_JOIN_FLAGS = ("coordinator_address", "num_processes", "process_id")


def define_flags() -> None:
    """The flags of a command that may run as several processes (train, predict)."""
    flags.DEFINE_bool("multihost", False, "Join a multi-process run whose processes JAX finds "
                      "itself (TPU pod slices); elsewhere give --coordinator_address, "
                      "--num_processes and --process_id.")
    flags.DEFINE_string("coordinator_address", None,
                        "HOST:PORT of process 0, the same for every process.")
    flags.DEFINE_integer("num_processes", None, "Processes in the run.")
    flags.DEFINE_integer("process_id", None, "This process, 0..num_processes-1.")


def join_from_flags() -> None:
    """Joins the run the flags of `define_flags` describe; one process when none is set."""
    explicit = tuple(flags.FLAGS[name].value for name in _JOIN_FLAGS)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise cli.InputError(f"--{', --'.join(_JOIN_FLAGS)} go together")
        join(*explicit)
    elif flags.FLAGS.multihost:
        join(None, None, None)


def join(coordinator_address: str | None, num_processes: int | None,
         process_id: int | None) -> None:
    """Joins a multi-process run; with no arguments JAX finds them itself (TPU pods).

    From then on a command that fails on one process stops them all with its reason:
    one process's bad record must not leave the others waiting in a collective until
    the heartbeat timeout aborts them with a native stack trace.

    CPU processes need gloo for their collectives; XLA's default CPU backend has none
    across processes.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service keeps one stream of step ids per process, which orbax's
    # checkpoint managers also feed (with their own step numbers): the step it agrees on
    # can pass unseen. `PreemptionWatch` agrees on the stop step itself.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    if jax.devices()[0].platform == "cpu":
        # Gloo gives a process 30 s to join the others in a new collective, so all must
        # reach a program's first run together: process 0 compiles it and shares the
        # binary, and none reads the persistent cache, which only process 0 writes (one
        # that found its program there would wait for another still compiling).
        jax.config.update("jax_enable_compilation_cache", False)
        jax.config.update("jax_share_binary_between_hosts", True)
    # orbax's barriers (creating a checkpoint folder, committing a save) wait in the
    # coordination service, as ours do, rather than in a collective that a process
    # still compiling its own initialisation misses (gloo's 30 s, above).
    import orbax.checkpoint  # noqa: F401  defines the flag

    flags.FLAGS.experimental_orbax_use_distributed_barrier = True
    if jax.process_count() > 1:
        watcher = threading.Thread(target=_stop_when_another_fails,
                                   name="jaxseg-failure-watch", daemon=True)
        watcher.start()
        atexit.register(_stop_watching, watcher)
        cli.on_failure(stop_every_process)


def _distributed_client():
    import orbax.checkpoint as ocp

    return ocp.multihost.get_jax_distributed_client()


_failed_here = threading.Event()
_leaving = threading.Event()
_exit_lock = threading.Lock()


def _stop_watching(watcher: threading.Thread) -> None:
    """Ends the failure watch before Python finalizes: a daemon thread it stops while
    inside a call into the coordination client aborts the whole process ("terminate
    called ... exception not rethrown") after a run that succeeded. Registered after
    JAX's own shutdown, so it runs before it."""
    _leaving.set()
    watcher.join(timeout=10 * FAILURE_POLL_S)


def _failures_elsewhere(client) -> list[tuple[str, str]]:
    own_key = f"{_FAILURES}{jax.process_index()}"
    return sorted(failure for failure in client.key_value_dir_get(_FAILURES)
                  if failure[0] != own_key)


def _stop_when_another_fails() -> None:
    client = _distributed_client()
    while not _leaving.wait(FAILURE_POLL_S):
        try:
            failures = _failures_elsewhere(client)
        except Exception:  # noqa: BLE001  the run is shutting down, or the service is gone
            return
        if not failures:
            continue
        if is_main():
            client.key_value_set(_ACKNOWLEDGED, "")
        if _failed_here.is_set():
            return  # this process is already stopping, with its own reason
        if is_main():
            time.sleep(FAILURE_GRACE_S)
        _exit_now(failures[0][1])


def stop_every_process(message: str, unexpected: BaseException | None = None) -> NoReturn:
    """Tells the other processes why this one stops, then stops it (status 1) without
    JAX's shutdown barrier, which the others, gone, would never reach.

    `unexpected`: an error that is not the user's; when another process has already
    failed it is only the echo of that (a collective whose peer left), and that
    process's reason is the one to give.
    """
    client, index = _distributed_client(), jax.process_index()
    if unexpected is not None:
        with contextlib.suppress(Exception):
            failures = _failures_elsewhere(client)
            if failures:
                _exit_now(failures[0][1])
        traceback.print_exception(unexpected)
    _failed_here.set()
    with contextlib.suppress(Exception):
        client.key_value_set(f"{_FAILURES}{index}", f"process {index}: {message}")
        if is_main():
            time.sleep(FAILURE_GRACE_S)
        else:
            client.blocking_key_value_get(_ACKNOWLEDGED, int(4 * FAILURE_POLL_S * 1000))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _exit_now(message: str) -> NoReturn:
    from tqdm import tqdm

    with _exit_lock:  # the watcher and the main thread may both get here
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.clear()  # the error gets a line of its own
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def is_main() -> bool:
    return jax.process_index() == 0


def report(message: str) -> None:
    """Progress lines, once for the run rather than once per process."""
    if is_main():
        print(message, flush=True)


def decided_by_main(decide: Callable[[], Any]) -> Any:
    """`decide()` run on process 0 only, its JSON result returned on every process.

    A user error raised there (a bad `init_from`, a workdir of another run) is raised on
    every process, so all stop with the same line rather than some waiting for the
    others in the next collective.
    """
    if jax.process_count() == 1:
        return decide()
    key = _next_share_key()
    outcome = None
    if is_main():
        try:
            outcome = {"value": decide()}
        except cli.USER_ERRORS as error:
            outcome = {"error": type(error).__name__,
                       "message": " ".join(cli.message_lines(error))}
        _share(key, json.dumps(outcome))
    else:
        outcome = json.loads(_shared(key))
    if "error" in outcome:
        error_type = {kind.__name__: kind for kind in cli.USER_ERRORS}[outcome["error"]]
        raise error_type(outcome["message"])
    return outcome["value"]


def gathered(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in process order, on every process."""
    if jax.process_count() == 1:
        return [value]
    key = _next_share_key()
    _share(f"{key}/{jax.process_index()}", json.dumps(value))
    return [json.loads(_shared(f"{key}/{index}")) for index in range(jax.process_count())]


def _next_share_key() -> str:
    """Every process makes the same calls in the same order, so the n-th call of each
    names the same value."""
    return f"{_SHARED}{next(_share_count)}"


def _share(key: str, text: str) -> None:
    client = _distributed_client()
    parts = [text[start:start + _SHARE_PART_CHARS]
             for start in range(0, len(text), _SHARE_PART_CHARS)] or [""]
    for index, part in enumerate(parts):
        client.key_value_set(f"{key}/{index}", part)
    client.key_value_set(f"{key}/parts", str(len(parts)))  # last: then every part is there


def _shared(key: str) -> str:
    client = _distributed_client()
    count = int(client.blocking_key_value_get(f"{key}/parts", _SHARE_WAIT_MS))
    return "".join(client.blocking_key_value_get(f"{key}/{index}", _SHARE_WAIT_MS)
                   for index in range(count))


class PreemptionWatch:
    """Whether the run should stop after the current step, the same step on every process.

    SIGTERM is what a preempted or maintained TPU VM receives, on one host or on all.
    Each process catches it itself. With several processes, every step also starts an
    all-gather of the flags (a few bytes, queued behind the step on the devices) and
    reads the one the previous step started: all processes read the same answer after
    the same step, and the host never waits for the step it just queued.
    """

    def __init__(self, mesh: Mesh) -> None:
        self._signalled = False
        self._previous_handler: Any = None
        self._flags = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self._any = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._in_flight: jax.Array | None = None

    def __enter__(self) -> PreemptionWatch:
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exception: Any) -> None:
        signal.signal(signal.SIGTERM, self._previous_handler)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def stop_after_step(self) -> bool:
        """Called after every train step on every process."""
        if jax.process_count() == 1:
            return self._signalled
        local_flags = np.full(len(self._flags.mesh.local_devices), self._signalled)
        answered, self._in_flight = self._in_flight, self._any(
            jax.make_array_from_process_local_data(self._flags, local_flags))
        return answered is not None and bool(answered.addressable_data(0))
