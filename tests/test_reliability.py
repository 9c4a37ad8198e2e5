"""The trainer under stress: kill -9 and rerun, broken input, a diverging loss.

Every run goes through the real command line (`python -m jaxseg.train` in a subprocess,
from the repository root) on tiny records. The subprocesses share this session's XLA
compilation cache, so the programs compile once, and run three at a time: most of
their time is single-threaded start-up (imports, tracing) rather than arithmetic.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxseg import config_checks, data, locking, models, records, reporting
from test_train import SIZE, tiny_config, toy_tiles

REPO = Path(__file__).resolve().parents[1]
# test_train's tiny run, in deterministic mode, as command-line flags.
TRAIN_FLAGS = [f"--config.image_size={SIZE}",
               "--config.per_device_batch_size=1", "--config.num_folds=2",
               "--config.epochs=2", "--config.learning_rate=0.001",
               "--config.deterministic=True"]
RUN_TIMEOUT_S = 600
# absl's Python log lines (orbax reports every checkpoint step at INFO).
PYTHON_LOG_LINE = re.compile(r"^[IW]\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]", re.MULTILINE)
# The trainer with a learning rate of 1e30 from the second epoch on: the real model's
# loss turns NaN within a step or two.
DIVERGING_TRAINER = """
import numpy as np
from jaxseg import cli, train
original = train.train_epoch
def diverging(state, step_fn, batches, learning_rates, fold_data, epoch, *rest, **options):
    return original(state, step_fn, batches,
                    np.full_like(learning_rates, 1e30) if epoch >= 1 else learning_rates,
                    fold_data, epoch, *rest, **options)
train.train_epoch = diverging
train.define_flags()
cli.run_main(train.main)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def _train_command(data_dir: Path, workdir: Path, *flags: str,
                   program: tuple[str, ...] = ("-m", "jaxseg.train"),
                   config_file: str = "cpu") -> list[str]:
    return [sys.executable, *program, f"--config={config_file}", *TRAIN_FLAGS,
            f"--config.data_dir={data_dir}", f"--workdir={workdir}", *flags]


def run_train(data_dir: Path, workdir: Path, *flags: str,
              **command: str | tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run(_train_command(data_dir, workdir, *flags, **command), cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _write_slides(out: Path, sizes: list[int], tile: int = SIZE) -> Path:
    for index, count in enumerate(sizes):
        tiles = ((np.resize(image, (tile, tile, 3)), np.resize(mask, (tile, tile)))
                 for image, mask in toy_tiles(count, index))
        records.write_records(out, f"slide{index}", tiles)
    return out


def _histories(workdir: Path) -> dict[str, dict]:
    return {fold_dir.name: json.loads((fold_dir / "history.json").read_text())
            for fold_dir in sorted(workdir.glob("fold_*"))}


def _results(workdir: Path) -> dict[str, dict]:
    """Each fold's result.json without its wall-clock time."""
    return {fold_dir.name: {key: value for key, value in
                            json.loads((fold_dir / "result.json").read_text()).items()
                            if key != "time_s"}
            for fold_dir in sorted(workdir.glob("fold_*"))}


def _kill_when(process: subprocess.Popen, ready: Callable[[], bool], log: Path) -> None:
    """SIGKILLs `process` the moment `ready()` holds (polled every 10 ms)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"training ended (status {process.returncode}) before the "
                                 f"kill:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training never reached the kill point")
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _plant_half_written_checkpoints(fold_dir: Path) -> None:
    """What kills in the middle of saves leave: an orbax temporary directory holding a
    partial copy of the next latest checkpoint, and a best checkpoint of an epoch whose
    latest save never finished."""
    partial = fold_dir / "latest" / "2.orbax-checkpoint-tmp"
    shutil.copytree(fold_dir / "latest" / "1", partial)
    for path in sorted(p for p in partial.rglob("*") if p.is_file())[::2]:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    shutil.copytree(fold_dir / "best" / "1", fold_dir / "best" / "2")


def _kill_and_rerun(record_dir: Path, workdir: Path) -> subprocess.CompletedProcess:
    """The uninterrupted run's command, SIGKILLed right after fold 1 saved its first
    latest checkpoint (fold 0 is finished by then), half-written checkpoints planted,
    then the same command again, to the end."""
    workdir.parent.mkdir(parents=True, exist_ok=True)
    log = workdir.parent / "first_attempt.log"
    with open(log, "w") as output:
        process = subprocess.Popen(_train_command(record_dir, workdir), cwd=REPO, env=_env(),
                                   stdout=output, stderr=subprocess.STDOUT)
        _kill_when(process, lambda: (workdir / "fold_1" / "latest" / "1").is_dir(), log)
    assert not (workdir / "fold_1" / "result.json").exists()
    # History and curves are rewritten after every epoch, not only at the fold's end.
    assert json.loads((workdir / "fold_1" / "history.json").read_text())["epoch"] == [1]
    assert (workdir / "fold_1" / "curves.png").stat().st_size > 0
    _plant_half_written_checkpoints(workdir / "fold_1")
    return run_train(record_dir, workdir)


# --- Bad input ---------------------------------------------------------------------------

def _copy_with(record_dir: Path, out: Path, damage: Callable[[Path], None]) -> Path:
    shutil.copytree(record_dir, out)
    damage(out)
    return out


def _first_training_file(directory: Path) -> Path:
    return Path(data.kfold_splits(data.list_record_files(directory), 2, 0)[0][0][0])


def _truncate_a_training_file(directory: Path) -> None:
    """Cut inside a record of a file fold 0 trains on: a copy that stopped short."""
    path = _first_training_file(directory)
    os.truncate(path, os.path.getsize(path) * 5 // 8 + 1000)


def _scramble_the_first_record(directory: Path) -> None:
    path = directory / "slide2-8.tfrec"
    raw = bytearray(path.read_bytes())
    raw[:64] = bytes(range(64))
    path.write_bytes(bytes(raw))


def _empty_a_file(directory: Path) -> None:
    (directory / "slide1-8.tfrec").write_bytes(b"")


def _fake_converted_weights(out: Path, backbone: str) -> Path:
    """A `jaxseg.convert` output whose meta names another backbone."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / "variables", {"params": {"w": np.zeros(2, np.float32)}})
    (out / "meta.json").write_text(json.dumps({"backbone": backbone, "kind": "unet"}))
    return out


def _bad_input_cases(record_dir: Path, root: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (data_dir, extra flags, the expected last line of stderr); a flag
    `config_file=...` names another config file."""
    truncated = _copy_with(record_dir, root / "truncated", _truncate_a_training_file)
    scrambled = _copy_with(record_dir, root / "scrambled", _scramble_the_first_record)
    emptied = _copy_with(record_dir, root / "emptied", _empty_a_file)
    small_tiles = _write_slides(root / "small_tiles", [8, 8, 8, 8], tile=SIZE // 2)
    (root / "empty").mkdir()
    other_weights = _fake_converted_weights(root / "b3_weights", "efficientnetb3")
    return {
        "truncated_record_file": (
            truncated, [],
            f"error: {_first_training_file(truncated)}: truncated or corrupt TFRecord file "
            "(truncated record at 82205' failed with Read less bytes than requested)"),
        "corrupt_record_file": (
            scrambled, [],
            f"error: {scrambled / 'slide2-8.tfrec'}: truncated or corrupt TFRecord file "
            "(corrupted record at 0 (Is this even a TFRecord file?))"),
        "empty_record_file": (
            emptied, [], f"error: {emptied / 'slide1-8.tfrec'}: holds no records"),
        "records_of_another_tile_size": (
            small_tiles, [],
            f"error: {small_tiles / 'slide0-8.tfrec'}: a record's image has "
            f"{(SIZE // 2) ** 2 * 3} bytes, not those of a {SIZE}x{SIZE}x3 uint8 tile; do "
            f"the records match image_size={SIZE}?"),
        "empty_data_dir": (
            root / "empty", [], f"error: no *.tfrec files in data directory {root / 'empty'}"),
        "missing_data_dir": (
            root / "missing", [], f"error: data directory {root / 'missing'} does not exist"),
        "fewer_files_than_folds": (
            record_dir, ["--config.num_folds=5"],
            "error: 4 record files cannot make 5 folds: each fold needs at least one file"),
        "unknown_backbone": (
            record_dir, ["--config.backbone=efficientnetb9"],
            "error: config.backbone: unknown 'efficientnetb9', expected one of "
            + ", ".join(models.BACKBONES)),
        "unknown_config_field": (
            record_dir, ["--config.epoch=3"],
            "error: --config.epoch: the config has no field 'epoch'; "
            'Did you mean "epochs" instead of "epoch"?'),
        "init_from_another_backbone": (
            record_dir, [f"--config.init_from={other_weights}"],
            f"error: config.init_from: {other_weights} holds efficientnetb3 weights, "
            "config.backbone is efficientnetb0"),
        "missing_config_file": (
            record_dir, ["config_file=jaxseg/configs/nope.py"],
            "error: cannot load the config file: [Errno 2] No such file or directory: "
            "'jaxseg/configs/nope.py'"),
    }


def _run_bad_input(data_dir: Path, flags: list[str], expected: str,
                   workdir: Path) -> tuple[subprocess.CompletedProcess, Path, str]:
    command = dict(flag.split("=", 1) for flag in flags if not flag.startswith("--"))
    done = run_train(data_dir, workdir, *[flag for flag in flags if flag.startswith("--")],
                     **command)
    return done, workdir, expected


# --- All runs, side by side --------------------------------------------------------------

@pytest.fixture(scope="module")
def record_dir(tmp_path_factory) -> Path:
    return _write_slides(tmp_path_factory.mktemp("records"), [8, 8, 8, 12])


@pytest.fixture(scope="module")
def runs(record_dir, tmp_path_factory) -> dict[str, Future]:
    """Starts every subprocess of this module at once (three at a time, the long chains
    first); tests wait for the futures they read."""
    root = tmp_path_factory.mktemp("runs")
    bad_inputs = _bad_input_cases(record_dir, root / "bad")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {
            "killed": pool.submit(_kill_and_rerun, record_dir, root / "killed" / "run"),
            "uninterrupted": pool.submit(run_train, record_dir, root / "uninterrupted"),
            "diverging": pool.submit(run_train, record_dir, root / "diverging",
                                     "--config.folds=0", program=("-c", DIVERGING_TRAINER)),
        }
        for name, case in bad_inputs.items():
            futures[name] = pool.submit(_run_bad_input, *case, root / "bad" / f"run_{name}")
        futures["workdirs"] = root
        yield futures


def _finished(future: Future) -> subprocess.CompletedProcess:
    done = future.result()
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# --- Preemption --------------------------------------------------------------------------

def test_rerun_after_kill_ends_exactly_like_an_uninterrupted_run(runs):
    _finished(runs["killed"])
    _finished(runs["uninterrupted"])
    killed, reference = runs["workdirs"] / "killed" / "run", runs["workdirs"] / "uninterrupted"
    assert _histories(killed) == _histories(reference)
    assert _results(killed) == _results(reference)
    summary, reference_summary = (json.loads((d / "summary.json").read_text())
                                  for d in (killed, reference))
    assert summary["mean_best_val_dice_coe"] == reference_summary["mean_best_val_dice_coe"]


def test_rerun_skips_the_finished_fold_and_resumes_the_next(runs):
    rerun = _finished(runs["killed"])
    assert "fold 0: finished earlier" in rerun.stdout
    # kill -9 left the workdir's lock behind; its holder is not running.
    assert re.search(r"^warning: .*/killed/run: taking over the lock of process \d+ on host "
                     r".*: process \d+ is not running$", rerun.stderr, re.MULTILINE)
    assert "fold 1: resuming after epoch 1" in rerun.stdout
    assert re.findall(r"^fold (\d) epoch (\d)/2", rerun.stdout, re.MULTILINE) == [("1", "2")]
    # The killed attempt's step programs are read back, not compiled again.
    summary = json.loads((runs["workdirs"] / "killed" / "run" / "summary.json").read_text())
    assert summary["compile_seconds"][reporting.CACHE_RETRIEVALS]


def test_half_written_checkpoints_are_cleared_on_resume(runs):
    _finished(runs["killed"])
    fold_dir = runs["workdirs"] / "killed" / "run" / "fold_1"
    assert sorted(p.name for p in (fold_dir / "latest").iterdir()) == ["2"]
    best_epoch = json.loads((fold_dir / "result.json").read_text())["best_epoch"]
    assert sorted(p.name for p in (fold_dir / "best").iterdir()) == [str(best_epoch)]


def test_training_says_what_it_does_while_it_runs(runs):
    stdout = _finished(runs["uninterrupted"]).stdout
    lines = stdout.splitlines()
    first_epoch = next(i for i, line in enumerate(lines) if re.match(r"fold 0 epoch 1/2", line))
    # Before the first step: that it compiles, then how long that took; once for the run.
    said = [line for line in lines[:first_epoch] if "train step" in line]
    assert len(said) == 2 and said[0].startswith("compiling the train step")
    assert re.fullmatch(r"train step ready in \d+s( \(read from the compilation cache\))?",
                        said[1])
    assert sum(line.startswith(("compiling the train step", "train step ready"))
               for line in lines) == 2
    epochs = re.findall(r"^fold (\d) epoch (\d)/2 .* - ([\d.]+) img/s - ETA fold (\S+), "
                        r"run (\S+)$", stdout, re.MULTILINE)
    assert [(fold, epoch) for fold, epoch, *_ in epochs] == [
        ("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    assert all(float(rate) > 0 for _, _, rate, _, _ in epochs)
    # After a fold's last epoch nothing is left of it, and after the run's, nothing at all.
    assert [left for _, epoch, _, left, _ in epochs if epoch == "2"] == ["0s", "0s"]
    assert epochs[-1][-1] == "0s" and epochs[0][-1] != "0s"


def test_training_logs_no_checkpoint_chatter(runs):
    stderr = _finished(runs["uninterrupted"]).stderr.replace("\r", "\n")
    assert PYTHON_LOG_LINE.findall(stderr) == []
    assert "orbax" not in stderr.lower()


# --- Bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    "truncated_record_file", "corrupt_record_file", "empty_record_file",
    "records_of_another_tile_size", "empty_data_dir", "missing_data_dir",
    "fewer_files_than_folds", "unknown_backbone", "unknown_config_field",
    "init_from_another_backbone", "missing_config_file"])
def test_bad_input_is_one_line_exit_1_and_no_workdir(runs, case):
    done, workdir, expected = runs[case].result()
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == expected
    assert sum(line.startswith("error:") for line in done.stderr.splitlines()) == 1
    assert "Traceback" not in done.stderr
    assert not workdir.exists()


def test_a_workdir_in_use_is_refused_naming_its_holder(tmp_path, record_dir):
    """A second command on a workdir that a live run holds (here this test process)
    stops at once, before compiling, and touches nothing."""
    workdir = tmp_path / "run"
    holder = locking.acquire(workdir, "a training run")
    done = run_train(record_dir, workdir)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {workdir}: in use by a training run (process {os.getpid()} on host "
        f"{socket.gethostname()}, since {holder['since']}); wait for it to end or stop it "
        f"(its lock: {workdir / locking.LOCK_NAME}, which a stopped holder's successor "
        "takes over by itself)")
    assert "Traceback" not in done.stderr
    assert [path.name for path in workdir.iterdir()] == [locking.LOCK_NAME]
    locking.release(workdir, holder)


def test_a_workdir_without_progress_is_taken_over_by_another_config(tmp_path, record_dir):
    """What a kill before the first checkpoint leaves must not refuse a corrected rerun,
    while a workdir with a finished fold still refuses other settings."""
    workdir = tmp_path / "run"
    (workdir / "fold_0" / "latest" / "1.orbax-checkpoint-tmp").mkdir(parents=True)
    (workdir / "config.json").write_text(tiny_config(record_dir).to_json_best_effort())
    config_checks.check_workdir_config(tiny_config(record_dir, image_size=96), workdir)
    (workdir / "fold_0" / "result.json").write_text("{}")
    with pytest.raises(ValueError, match="config.image_size=64, this one has 96"):
        config_checks.check_workdir_config(tiny_config(record_dir, image_size=96), workdir)


# --- Numerical faults --------------------------------------------------------------------

def test_diverging_loss_stops_naming_fold_epoch_step_and_keeps_last_checkpoint(runs):
    done = runs["diverging"].result()
    latest = runs["workdirs"] / "diverging" / "fold_0" / "latest"
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.fullmatch(
        r"error: fold 0, epoch 2, (step [12]: loss|validation: val_loss) is (nan|-?inf); "
        rf"stopped, the checkpoint of epoch 1 stays in {re.escape(str(latest))}",
        done.stderr.strip().splitlines()[-1])
    assert "Traceback" not in done.stderr
    assert ocp.utils.checkpoint_steps(latest) == [1]
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore(latest / "1" / "state")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved))
    assert not (latest.parent / "result.json").exists()
    assert not (latest.parent.parent / "summary.json").exists()
