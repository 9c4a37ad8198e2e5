"""One command at a time in a directory: a lock file that names its holder.

Two trainings in one workdir (a second terminal, a job restarted while the first still
runs) would delete and overwrite each other's checkpoints; two prepares into one folder
would mix their records. The lock file holds the holder's host, process id and start
time; it is removed when the command ends, and a lock whose holder is gone (kill -9, a
lost machine) is taken over with a warning:
- on the same host, the holder is gone when its process id is not running, or runs a
  process started at another time (the id was reused);
- from another host (a shared disk or a bucket), when its heartbeat, rewritten by the
  holder every HEARTBEAT_S seconds, is older than STALE_AFTER_S.

On a local disk the file is created exclusively (O_EXCL), so of two commands starting at
once exactly one wins. A bucket has no exclusive create through epath: there the lock
is written, read back after a pause, and kept only if it is still ours, which closes
the window for commands started more than that pause apart.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Iterator

from jaxseg import cli, paths

LOCK_NAME = ".jaxseg-lock.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
_REMOTE_SETTLE_S = 2.0


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot), which tells a
    process from a later one given the same id; None when it is not running or the
    system has no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) may hold spaces; fields after it are plain.
            return stat.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's process
        return True
    return True


def why_stale(holder: dict, now: float) -> str | None:
    """Why the holder of a lock is gone, or None while it may still be working."""
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid <= 0 or not _process_running(pid):
            return f"process {pid} is not running"
        started = process_start_time(pid)
        if holder.get("process_start") and started and started != holder["process_start"]:
            return f"process {pid} is another program now"
        return None
    age = now - float(holder.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return f"no heartbeat from host {holder.get('host')} for {age:.0f}s"
    return None


def _describe(holder: dict, lock: paths.Path) -> str:
    return (f"in use by {holder.get('purpose', 'a jaxseg command')} (process "
            f"{holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}); "
            f"wait for it to end or stop it (its lock: {lock}, which a stopped holder's "
            "successor takes over by itself)")


def _read(lock: paths.Path) -> dict | None:
    """The lock's content; {} for a file cut short (its writer killed mid-write), None
    when there is no lock."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _create(lock: paths.Path, content: str) -> bool:
    """Writes the lock unless one exists; True when this call made it."""
    if paths.is_remote(lock):
        if lock.exists():
            return False
        lock.write_text(content)
        time.sleep(_REMOTE_SETTLE_S)
        return _read(lock) == json.loads(content)
    try:
        descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as file:
        file.write(content)
    return True


def _record(purpose: str, token: str) -> dict:
    return {"purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
            "process_start": process_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "heartbeat": time.time(),
            "token": token}


def acquire(directory: str | os.PathLike, purpose: str) -> dict:
    """Takes the directory's lock (creating the directory) and returns what it wrote;
    a lock a live holder keeps raises ValueError naming that holder."""
    directory = paths.path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_NAME
    record = _record(purpose, secrets.token_hex(8))
    for _ in range(3):
        if _create(lock, json.dumps(record)):
            return record
        holder = _read(lock)
        if holder is None:      # released between our two looks
            continue
        reason = "its lock file is unreadable" if not holder else why_stale(holder, time.time())
        if reason is None:
            raise cli.InputError(f"{directory}: {_describe(holder, lock)}")
        print(f"warning: {directory}: taking over the lock of process {holder.get('pid')} "
              f"on host {holder.get('host')}: {reason}", file=sys.stderr, flush=True)
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
    raise cli.InputError(f"{directory}: another command took the lock {lock} at the same time")


def release(directory: str | os.PathLike, record: dict) -> None:
    """Removes the lock if it is still this holder's (a successor may have taken a lock
    whose heartbeat stalled)."""
    lock = paths.path(directory) / LOCK_NAME
    holder = _read(lock)
    if holder and holder.get("token") == record["token"]:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _beat(directory: paths.Path, record: dict, stop: threading.Event) -> None:
    lock = directory / LOCK_NAME
    while not stop.wait(HEARTBEAT_S):
        holder = _read(lock)
        if not holder or holder.get("token") != record["token"]:
            return
        with contextlib.suppress(OSError):
            paths.atomic_write(lock, json.dumps({**record, "heartbeat": time.time()}))


@contextlib.contextmanager
def hold(directory: str | os.PathLike, purpose: str) -> Iterator[None]:
    """The directory is this command's until the block ends."""
    directory = paths.path(directory)
    record = acquire(directory, purpose)
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(directory, record, stop), daemon=True,
                            name="jaxseg-lock-heartbeat")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        release(directory, record)
