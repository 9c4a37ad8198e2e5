"""The path layer on a local disk: atomic writes and URLs kept as URLs.

Buckets are exercised end to end, against an emulator, by test_cloud_storage.
"""
import os
import stat

import pytest

from jaxseg import paths


def test_an_atomic_write_that_fails_leaves_nothing(tmp_path):
    (tmp_path / "result.json").write_text("old")
    with pytest.raises(RuntimeError):
        with paths.atomic_open(tmp_path / "result.json") as file:
            file.write("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["result.json"]
    assert (tmp_path / "result.json").read_text() == "old"


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "summary.json"
    with paths.atomic_open(target) as first, paths.atomic_open(target) as second:
        first.write("first")
        second.write("second")
        assert len(os.listdir(tmp_path)) == 2
    assert target.read_text() == "first"   # the outer block ends last
    assert os.listdir(tmp_path) == ["summary.json"]


def test_an_atomic_write_makes_the_file_open_would(tmp_path):
    paths.atomic_write(tmp_path / "curves.png", b"\x89PNG")
    (tmp_path / "plain").write_bytes(b"")
    mode = stat.S_IMODE(os.stat(tmp_path / "curves.png").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert (tmp_path / "curves.png").read_bytes() == b"\x89PNG"


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.absolute("gs://bucket/run")) == "gs://bucket/run"
    assert str(paths.path("gs://bucket/run") / "fold_0") == "gs://bucket/run/fold_0"
    assert str(paths.absolute("run")) == str(tmp_path / "run")
    assert paths.is_remote("gs://bucket/run") and not paths.is_remote(tmp_path)


def test_a_wildcard_in_a_bucket_name_is_refused_before_any_request():
    with pytest.raises(ValueError, match="after the bucket name"):
        paths.glob("gs://runs-*/images/*.png")


def test_a_staged_file_may_be_renamed_or_dropped_by_its_writer(tmp_path):
    """A record file's name carries its count, known only once it is written."""
    with paths.staged_file(tmp_path / "slide.tfrec") as staged:
        with open(staged.path, "w") as file:
            file.write("3 records")
        staged.destination = paths.path(tmp_path / "slide-3.tfrec")
    with paths.staged_file(tmp_path / "empty.tfrec") as staged:
        staged.destination = None
    assert os.listdir(tmp_path) == ["slide-3.tfrec"]
    assert (tmp_path / "slide-3.tfrec").read_text() == "3 records"
