"""The processes of one run: joining them, one voice, one decision, one stop step.

Every process runs the same program; files are only trusted on process 0, which may be
the only host that sees them without a shared file system. So process 0 decides from
files and broadcasts the outcome, prints progress and writes the run's files, while
orbax keeps its own multi-host protocol for checkpoints.
"""
from __future__ import annotations

import json
import signal
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxseg import cli

# A process that stops sending heartbeats (killed, hung, its host gone) is declared dead
# after this long, and the others then exit with an error instead of waiting in a
# collective; JAX's default is 100 s. A process that ends waits at most
# SHUTDOWN_TIMEOUT_S for the others (JAX's default 300 s).
HEARTBEAT_TIMEOUT_S = 10
SHUTDOWN_TIMEOUT_S = 30
# Broadcast payloads are padded to a multiple of this, so that a handful of programs
# serve every decision instead of one compilation per payload length.
_PAYLOAD_QUANTUM = 4096


def join(coordinator_address: str | None, num_processes: int | None,
         process_id: int | None) -> None:
    """Joins a multi-process run; with no arguments JAX finds them itself (TPU pods).

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
    outcome = None
    if is_main():
        try:
            outcome = {"value": decide()}
        except cli.USER_ERRORS as error:
            outcome = {"error": type(error).__name__,
                       "message": " ".join(cli.message_lines(error))}
    outcome = json.loads(_broadcast_bytes(json.dumps(outcome).encode() if is_main() else b""))
    if "error" in outcome:
        error_type = {kind.__name__: kind for kind in cli.USER_ERRORS}[outcome["error"]]
        raise error_type(outcome["message"])
    return outcome["value"]


def _broadcast_bytes(payload: bytes) -> bytes:
    length = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    padded = np.zeros(-(-length // _PAYLOAD_QUANTUM) * _PAYLOAD_QUANTUM, np.int32)
    padded[:len(payload)] = np.frombuffer(payload, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(padded))[:length].astype(
        np.uint8).tobytes()


class PreemptionWatch:
    """Whether the run should stop after the current step, the same step on every process.

    SIGTERM is what a preempted or maintained TPU VM receives, on one host or on all.
    Each process catches it itself, and after every step the processes all-gather their
    flags (a few bytes, but one host-device round trip per step), so all stop after the
    same step even when only one got the signal.
    """

    def __init__(self) -> None:
        self._signalled = False
        self._previous_handler: Any = None

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
        return bool(np.any(multihost_utils.process_allgather(np.int32(self._signalled))))
