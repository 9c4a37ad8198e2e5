"""The directory lock: one live holder, stale holders taken over, only ours released."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxseg import locking


def _plant(directory, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    holder = {"purpose": "a training run", "host": socket.gethostname(), "pid": os.getpid(),
              "process_start": locking.process_start_time(os.getpid()),
              "since": "2026-01-01 00:00:00 UTC", "heartbeat": time.time(), "token": "x",
              **fields}
    (directory / locking.LOCK_NAME).write_text(json.dumps(holder))
    return holder


def _finished_pid() -> int:
    with subprocess.Popen([sys.executable, "-c", "pass"]) as finished:
        pass
    return finished.pid


def test_a_live_holder_is_named_and_keeps_its_lock(tmp_path):
    holder = _plant(tmp_path / "run")
    with pytest.raises(ValueError) as error:
        locking.acquire(tmp_path / "run", "a training run")
    assert str(error.value).startswith(
        f"{tmp_path / 'run'}: in use by a training run (process {os.getpid()} on host "
        f"{socket.gethostname()}, since 2026-01-01 00:00:00 UTC)")
    assert "\n" not in str(error.value)
    assert json.loads((tmp_path / "run" / locking.LOCK_NAME).read_text()) == holder


@pytest.mark.parametrize("fields, reason", [
    ({"pid": "finished"}, "process {pid} is not running"),
    ({"process_start": "1"}, "process {pid} is another program now"),
    ({"host": "elsewhere", "heartbeat": time.time() - locking.STALE_AFTER_S - 5},
     "no heartbeat from host elsewhere for"),
])
def test_a_gone_holder_is_taken_over_with_a_warning(tmp_path, capsys, fields, reason):
    if fields.get("pid") == "finished":
        fields = {**fields, "pid": _finished_pid()}
    old = _plant(tmp_path / "run", **fields)
    record = locking.acquire(tmp_path / "run", "a prepare")
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: {tmp_path / 'run'}: taking over the lock of process "
                              f"{old['pid']} on host {old['host']}: "
                              + reason.format(pid=old["pid"]))
    assert json.loads((tmp_path / "run" / locking.LOCK_NAME).read_text()) == record
    assert record["pid"] == os.getpid() and record["purpose"] == "a prepare"


def test_a_fresh_heartbeat_from_another_host_keeps_the_lock(tmp_path):
    _plant(tmp_path / "run", host="elsewhere", heartbeat=time.time() - 30)
    with pytest.raises(ValueError, match="on host elsewhere"):
        locking.acquire(tmp_path / "run", "a training run")


def test_a_lock_cut_short_by_a_kill_is_taken_over(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / locking.LOCK_NAME).write_text('{"host": "a", "pi')
    locking.acquire(tmp_path / "run", "a training run")
    assert "its lock file is unreadable" in capsys.readouterr().err


def test_hold_creates_the_directory_and_releases_only_its_own_lock(tmp_path):
    with locking.hold(tmp_path / "new" / "run", "a training run"):
        holder = json.loads((tmp_path / "new" / "run" / locking.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
    assert not (tmp_path / "new" / "run" / locking.LOCK_NAME).exists()

    record = locking.acquire(tmp_path / "run", "a training run")
    successor = _plant(tmp_path / "run", token="successor")
    locking.release(tmp_path / "run", record)
    assert json.loads((tmp_path / "run" / locking.LOCK_NAME).read_text()) == successor


def test_the_holder_renews_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(locking, "HEARTBEAT_S", 0.05)
    with locking.hold(tmp_path / "run", "a training run"):
        first = json.loads((tmp_path / "run" / locking.LOCK_NAME).read_text())["heartbeat"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.05)
            holder = json.loads((tmp_path / "run" / locking.LOCK_NAME).read_text())
            if holder["heartbeat"] > first:
                break
        assert holder["heartbeat"] > first
