"""Slides -> TFRecord tiles: the right windows, the background filter, clean failures."""
import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tifffile
from matplotlib.colors import rgb_to_hsv
from PIL import Image

from jaxseg import data, locking, prepare, rle, stain

REPO = Path(__file__).resolve().parents[1]

HEIGHT, WIDTH = 300, 420
TILE, REDUCTION = 128, 2
SMALL = TILE // REDUCTION
GLASS = (240, 238, 242)


def make_slide(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Glass on the left, saturated random 'tissue' on the right, discs as glomeruli."""
    rng = np.random.default_rng(seed)
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[:] = np.array(GLASS) + rng.integers(-2, 3, (HEIGHT, WIDTH, 3))
    tissue = rng.integers((150, 60, 120), (240, 180, 220), (HEIGHT, WIDTH - 170, 3))
    image[:, 170:] = tissue
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    mask = np.zeros((HEIGHT, WIDTH), bool)
    for cy, cx, r in [(60, 250, 30), (200, 330, 45), (290, 400, 25)]:
        mask |= (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
    return image, mask


def write_competition(root, slides: dict) -> None:
    (root / "train").mkdir(parents=True)
    with open(root / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "encoding"])
        for slide_id, (image, mask) in slides.items():
            tifffile.imwrite(root / "train" / f"{slide_id}.tiff", image, photometric="rgb")
            writer.writerow([slide_id, rle.encode(mask)])


def read_records(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Parses the recipe's format with TensorFlow itself, not with jaxseg."""
    features = {"image": tf.io.FixedLenFeature([], tf.string),
                "mask": tf.io.FixedLenFeature([], tf.string)}
    tiles = []
    for record in tf.data.TFRecordDataset(str(path)):
        example = tf.io.parse_single_example(record, features)
        image = tf.io.decode_raw(example["image"], tf.uint8).numpy().reshape(SMALL, SMALL, 3)
        mask = tf.io.decode_raw(example["mask"], tf.bool).numpy().reshape(SMALL, SMALL)
        tiles.append((image, mask))
    return tiles


def expected_tiles(image, mask, pad_y, pad_x, stride):
    """Independent reference: zero padding, block means, OpenCV-style HSV filter."""
    padded = np.pad(image, (pad_y, pad_x, (0, 0)))
    padded_mask = np.pad(mask, (pad_y, pad_x))
    min_pixels = 62                          # round(1000 * (64 / 256) ** 2)
    tiles = []
    for y in range(0, padded.shape[0] - TILE + 1, stride):
        for x in range(0, padded.shape[1] - TILE + 1, stride):
            window = padded[y:y + TILE, x:x + TILE].astype(np.float64)
            small = np.floor(window.reshape(SMALL, 2, SMALL, 2, 3).mean(axis=(1, 3)) + 0.5)
            saturation = np.floor(255 * rgb_to_hsv(small / 255)[..., 1] + 0.5 + 1e-9)
            if (saturation > 40).sum() <= min_pixels or small.sum() <= min_pixels:
                continue
            small_mask = padded_mask[y:y + TILE, x:x + TILE].reshape(
                SMALL, 2, SMALL, 2).mean(axis=(1, 3)) >= 0.5
            tiles.append((small.astype(np.uint8), small_mask))
    return tiles


def run_competition(data_dir, out_dir, workers=1, **config):
    jobs = prepare.competition_jobs(data_dir)
    return prepare.prepare(jobs, out_dir, prepare.TilingConfig(
        tile_size=TILE, reduction=REDUCTION, **config), workers)


def record_files(out_dir):
    return sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []


@pytest.mark.parametrize("overlap, pad_y, pad_x, stride", [
    # 300 rows need 3 tiles of 128 (84 px of padding, 42 on top); 420 columns need 4
    # (92 px, 46 on the left). With 64 px overlap: 4 and 6 tiles, padding 20 and 28.
    (0, (42, 42), (46, 46), 128),
    (64, (10, 10), (14, 14), 64),
])
def test_tiles_are_the_right_windows_of_image_and_mask(tmp_path, overlap, pad_y, pad_x,
                                                       stride):
    image, mask = make_slide(0)
    write_competition(tmp_path / "data", {"slide0": (image, mask)})
    summary = run_competition(tmp_path / "data", tmp_path / "out", overlap=overlap)
    expected = expected_tiles(image, mask, pad_y, pad_x, stride)
    assert 0 < len(expected) < (len(range(0, 2 * pad_y[0] + HEIGHT - TILE + 1, stride))
                                * len(range(0, 2 * pad_x[0] + WIDTH - TILE + 1, stride)))
    assert record_files(tmp_path / "out") == ["prepare.json", f"slide0-{len(expected)}.tfrec"]
    tiles = read_records(tmp_path / "out" / f"slide0-{len(expected)}.tfrec")
    assert len(tiles) == len(expected)
    for (got_image, got_mask), (want_image, want_mask) in zip(tiles, expected):
        np.testing.assert_array_equal(got_image, want_image)
        np.testing.assert_array_equal(got_mask, want_mask)
    assert any(m.any() for _, m in tiles)
    assert json.loads((tmp_path / "out" / "prepare.json").read_text()) == summary == {
        "tile_size": TILE, "reduction": REDUCTION, "overlap": overlap,
        "thresholds": {"saturation": 40, "min_pixels": 62},
        "padding": prepare.PADDING, "slide_mpp": None, "slides": {"slide0": len(expected)},
        "skipped_slides": []}


def test_grid_starts_and_overlap():
    assert prepare.grid_starts(512, 512, 0) == [0]
    assert prepare.grid_starts(300, 512, 0) == [-106]
    assert prepare.grid_starts(1000, 512, 0) == [-12, 500]
    assert prepare.grid_starts(1000, 512, 256) == [-12, 244, 500]
    assert prepare.overlap_pixels(0.25, 2048) == 512
    with pytest.raises(ValueError, match="overlap 100"):   # a fraction, never pixels
        prepare.overlap_pixels(100, 2048)
    with pytest.raises(ValueError, match="overlap 1.5"):
        prepare.overlap_pixels(1.5, 2048)
    with pytest.raises(ValueError, match="overlap 128 must be >= 0 and below tile_size 128"):
        prepare.TilingConfig(tile_size=128, reduction=2, overlap=128)
    with pytest.raises(ValueError, match="tile_size 100 is not divisible by reduction 3"):
        prepare.TilingConfig(tile_size=100, reduction=3)


def test_min_pixels_default_follows_the_notebook_for_multiples_of_256():
    assert prepare.TilingConfig().min_pixels == 4000           # 2048 / 4 = 512 px tiles
    assert prepare.default_min_pixels(256) == 1000
    assert prepare.default_min_pixels(768) == 9000
    assert prepare.default_min_pixels(128) == 250               # the notebook: 0


def test_background_filter_drops_blank_tiles_and_keeps_tissue():
    config = prepare.TilingConfig(tile_size=128, reduction=2)   # 64 px, min_pixels 62
    glass = np.empty((64, 64, 3), np.uint8)
    glass[:] = GLASS
    black = np.zeros((64, 64, 3), np.uint8)
    tissue = glass.copy()
    tissue[:8, :8] = (200, 120, 180)                            # 64 saturated pixels
    assert not prepare.is_tissue(glass, config)
    assert not prepare.is_tissue(black, config)
    assert prepare.is_tissue(tissue, config)
    tissue[0, :2] = GLASS                                       # 62: not more than 62
    assert not prepare.is_tissue(tissue, config)


def test_saturation_count_matches_hsv():
    pixels = np.random.default_rng(2).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    saturation = np.floor(255 * rgb_to_hsv(pixels / 255)[..., 1] + 0.5 + 1e-9)
    for threshold in (0, 40, 100):
        assert prepare.tissue_pixel_count(pixels, threshold) == (saturation > threshold).sum()


def test_images_mode_pairs_stems_and_counts_in_names(tmp_path):
    image, mask = make_slide(1)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / "a.png")
    Image.fromarray(image[:128, 170:298]).save(tmp_path / "images" / "b.jpg", quality=95)
    tifffile.imwrite(tmp_path / "masks" / "b.tiff", mask[:128, 170:298])
    jobs = prepare.image_jobs(tmp_path / "images", tmp_path / "masks")
    summary = prepare.prepare(jobs, tmp_path / "out",
                              prepare.TilingConfig(tile_size=TILE, reduction=REDUCTION),
                              workers=1)
    expected = expected_tiles(image, mask, (42, 42), (46, 46), TILE)
    assert summary["slides"] == {"a": len(expected), "b": 1}
    assert record_files(tmp_path / "out") == [f"a-{len(expected)}.tfrec", "b-1.tfrec",
                                              "prepare.json"]
    for (got_image, got_mask), (want_image, want_mask) in zip(
            read_records(tmp_path / "out" / f"a-{len(expected)}.tfrec"), expected):
        np.testing.assert_array_equal(got_image, want_image)
        np.testing.assert_array_equal(got_mask, want_mask)
    [(_, b_mask)] = read_records(tmp_path / "out" / "b-1.tfrec")
    np.testing.assert_array_equal(
        b_mask, mask[:128, 170:298].reshape(64, 2, 64, 2).mean(axis=(1, 3)) >= 0.5)


def test_prepare_json_records_the_slides_pixel_size_when_every_slide_has_one(tmp_path):
    """predict aims at slide_mpp * reduction micrometres per pixel; a guess for a slide
    that does not say its pixel size would mislead it, so then none is recorded."""
    image, mask = make_slide(1)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for name, size in [("a", 0.5), ("b", 0.25), ("c", 0.5)]:
        tifffile.imwrite(tmp_path / "images" / f"{name}.ome.tiff", image,
                         metadata={"PhysicalSizeX": size, "PhysicalSizeY": size})
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / f"{name}.png")
    config = prepare.TilingConfig(tile_size=TILE, reduction=REDUCTION)
    jobs = prepare.image_jobs(tmp_path / "images", tmp_path / "masks")
    assert prepare.prepare(jobs, tmp_path / "out", config, workers=1)["slide_mpp"] == 0.5
    Image.fromarray(image).save(tmp_path / "images" / "d.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / "d.png")
    jobs = prepare.image_jobs(tmp_path / "images", tmp_path / "masks")
    assert prepare.prepare(jobs, tmp_path / "out", config, workers=1)["slide_mpp"] is None


def test_an_ome_tiff_slide_is_the_id_train_csv_names(tmp_path):
    """train.csv writes the id without the whole extension: `x.ome.tiff` is `x`."""
    write_competition(tmp_path / "data", {"slide0": make_slide(0)})
    train = tmp_path / "data" / "train"
    (train / "slide0.tiff").rename(train / "slide0.ome.tiff")
    [job] = prepare.competition_jobs(tmp_path / "data")
    assert (job.slide_id, job.image_path.name) == ("slide0", "slide0.ome.tiff")


def test_a_slide_without_tissue_is_skipped_and_named(tmp_path, capsys):
    """Training rejects an empty record file, so none is written: the glass-only slide
    is named in a warning and in prepare.json, and its old records go."""
    image, mask = make_slide(0)
    glass = np.broadcast_to(np.array(GLASS, np.uint8), image.shape).copy()
    write_competition(tmp_path / "data", {"glass": (glass, mask), "tissue": (image, mask)})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "glass-4.tfrec").write_bytes(b"an earlier tiling")
    summary = run_competition(tmp_path / "data", tmp_path / "out")
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"warning: {tmp_path / 'data' / 'train' / 'glass.tiff'}: no tile passes the "
        "background filter; slide glass is skipped (no record file)")
    count = summary["slides"]["tissue"]
    assert record_files(tmp_path / "out") == ["prepare.json", f"tissue-{count}.tfrec"]
    assert (summary["slides"], summary["skipped_slides"]) == ({"tissue": count}, ["glass"])
    assert json.loads((tmp_path / "out" / "prepare.json").read_text()) == summary

    write_competition(tmp_path / "glass_only", {"glass": (glass, mask)})
    with pytest.raises(ValueError, match="^no tile of any slide passes the background "
                                         "filter \\(saturation > 40 on more than 62 "
                                         "pixels\\): nothing to train on$"):
        run_competition(tmp_path / "glass_only", tmp_path / "out2")
    assert record_files(tmp_path / "out2") == []


def test_rerun_replaces_the_slides_records(tmp_path):
    image, mask = make_slide(0)
    write_competition(tmp_path / "data", {"slide0": (image, mask)})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "slide0-999.tfrec").write_bytes(b"stale")
    count = run_competition(tmp_path / "data", tmp_path / "out")["slides"]["slide0"]
    assert record_files(tmp_path / "out") == ["prepare.json", f"slide0-{count}.tfrec"]


def test_an_output_holding_other_slides_records_is_refused(tmp_path):
    """Training reads every record file in the folder: another slide's old records would
    be mixed with this tiling under a prepare.json that does not list them."""
    write_competition(tmp_path / "data", {"slide0": make_slide(0)})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "slide01-3.tfrec").write_bytes(b"another slide, another tiling")
    with pytest.raises(ValueError, match=(
            f"^{tmp_path / 'out'}: holds records of slides this run does not prepare "
            r"\(slide01-3.tfrec\); training would mix them with this tiling")):
        run_competition(tmp_path / "data", tmp_path / "out")
    assert record_files(tmp_path / "out") == ["slide01-3.tfrec"]


# Tiles the slides of argv[1] into argv[2] and hangs before the second slide, so that
# the test kills it with one slide finished.
_HANGING_PREPARE = f"""
import os, sys, time
from jaxseg import prepare
tile_slide = prepare._tile_slide
def hanging(job, config, staging, progress):
    if any(name.endswith(prepare._DONE_SUFFIX) for name in os.listdir(staging)):
        time.sleep(600)
    return tile_slide(job, config, staging, progress)
prepare._tile_slide = hanging
prepare.prepare(prepare.competition_jobs(sys.argv[1]), sys.argv[2],
                prepare.TilingConfig(tile_size={TILE}, reduction={REDUCTION}), 1)
"""


def assert_same_records(out, reference):
    assert record_files(out) == record_files(reference)
    assert (out / "prepare.json").read_text() == (reference / "prepare.json").read_text()
    for name in record_files(out):
        if name.endswith(".tfrec"):
            for a, b in zip(read_records(out / name), read_records(reference / name),
                            strict=True):
                np.testing.assert_array_equal(a[0], b[0])
                np.testing.assert_array_equal(a[1], b[1])


def test_a_killed_prepare_resumes_with_the_slides_it_finished(tmp_path, capsys):
    slides = {f"s{index}": make_slide(index) for index in range(3)}
    write_competition(tmp_path / "data", slides)
    out = tmp_path / "out"
    with subprocess.Popen([sys.executable, "-c", _HANGING_PREPARE, str(tmp_path / "data"),
                           str(out)], cwd=REPO, stderr=subprocess.DEVNULL) as hung:
        deadline = time.monotonic() + 120
        while not list(out.glob(f".prepare-staging-*/*{prepare._DONE_SUFFIX}")):
            assert hung.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        hung.kill()
    [staging] = out.glob(".prepare-staging-*")
    (out / ".prepare-staging-of-another-tiling").mkdir()
    capsys.readouterr()
    summary = run_competition(tmp_path / "data", out)
    warning, resuming = capsys.readouterr().err.splitlines()[:2]
    assert warning == (f"warning: {out}: taking over the lock of process {hung.pid} on host "
                       f"{socket.gethostname()}: process {hung.pid} is not running")
    assert resuming == f"resuming: 1 of 3 slides were tiled by an earlier run ({staging})"
    assert_same_records(out, _clean_run(tmp_path, "data"))
    assert summary == json.loads((out / "prepare.json").read_text())
    assert not [path for path in out.iterdir() if path.name.startswith(".")]


def _clean_run(tmp_path, data_name):
    run_competition(tmp_path / data_name, tmp_path / "reference")
    return tmp_path / "reference"


def test_a_resumed_prepare_tiles_again_a_slide_whose_image_changed(tmp_path, monkeypatch,
                                                                   capsys):
    write_competition(tmp_path / "data", {"s0": make_slide(0), "s1": make_slide(1)})
    tile_slide = prepare._tile_slide

    def failing_second(job, *args):
        if job.slide_id == "s1":
            raise ValueError("s1: the slide broke")
        return tile_slide(job, *args)

    monkeypatch.setattr(prepare, "_tile_slide", failing_second)
    with pytest.raises(ValueError, match="s1: the slide broke"):
        run_competition(tmp_path / "data", tmp_path / "out")
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "note: the records of 1 slides stay in ")
    monkeypatch.undo()
    os.utime(tmp_path / "data" / "train" / "s0.tiff", ns=(0, 0))   # "changed"
    run_competition(tmp_path / "data", tmp_path / "out")
    assert "resuming" not in capsys.readouterr().err
    assert_same_records(tmp_path / "out", _clean_run(tmp_path, "data"))


def test_an_output_another_prepare_holds_is_refused(tmp_path):
    write_competition(tmp_path / "data", {"s0": make_slide(0)})
    holder = locking.acquire(tmp_path / "out", "a prepare")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'out'}: in use by a prepare "
                                         f"\\(process {os.getpid()} on host "):
        run_competition(tmp_path / "data", tmp_path / "out")
    assert record_files(tmp_path / "out") == [locking.LOCK_NAME]
    locking.release(tmp_path / "out", holder)


def test_a_run_stopped_while_moving_records_in_is_refused_by_training_and_rerun_whole(
        tmp_path, monkeypatch):
    """prepare.json is written before the records move in, so an output cut short there
    disagrees with it (training names the missing file) instead of looking whole."""
    write_competition(tmp_path / "data", {"s0": make_slide(0), "s1": make_slide(1)})
    out = tmp_path / "out"
    publish, moved = prepare.paths.publish, []

    def killed_at_the_second_record(staged, destination):
        if str(destination).endswith(".tfrec"):
            moved.append(destination)
            if len(moved) == 2:
                raise KeyboardInterrupt
        publish(staged, destination)

    monkeypatch.setattr(prepare.paths, "publish", killed_at_the_second_record)
    with pytest.raises(KeyboardInterrupt):
        run_competition(tmp_path / "data", out)
    monkeypatch.undo()
    summary = json.loads((out / "prepare.json").read_text())
    with pytest.raises(ValueError, match=f"lists s1-{summary['slides']['s1']}.tfrec, which "
                                         f"{out} lacks"):
        data.checked_counts(data.list_record_files(out), out)
    assert run_competition(tmp_path / "data", out) == summary
    assert len(data.checked_counts(data.list_record_files(out), out)) == 2
    assert not [path for path in out.iterdir() if path.name.startswith(".")]


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_input_errors_are_one_line_and_write_nothing(tmp_path):
    image, mask = make_slide(0)
    data = tmp_path / "data"
    write_competition(data, {"good": (image, mask)})
    tifffile.imwrite(data / "train" / "extra.tiff", image, photometric="rgb")
    with pytest.raises(ValueError) as error:
        prepare.competition_jobs(data)
    assert_one_line(error, "train.csv", "no row for slide extra")

    (data / "train" / "extra.tiff").write_bytes(b"II*\x00 broken" * 10)
    with open(data / "train.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["extra", ""])
    with pytest.raises(ValueError) as error:
        prepare.competition_jobs(data)
    assert_one_line(error, "extra.tiff: unreadable TIFF")

    (data / "train" / "extra.tiff").unlink()
    with open(data / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["id", "encoding"],
                                      ["good", f"{HEIGHT * WIDTH - 2} 5"]])
    with pytest.raises(ValueError) as error:
        prepare.competition_jobs(data)
    assert_one_line(error, "train.csv, id good: RLE runs past the image")

    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        prepare.competition_jobs(tmp_path / "empty")
    assert_one_line(error, "no .tiff slides found")

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask[:, :-10].astype(np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(ValueError) as error:
        prepare.image_jobs(tmp_path / "images", tmp_path / "masks")
    assert_one_line(error, "mask is 300 x 410 but the image a.png is 300 x 420")
    with pytest.raises(FileNotFoundError) as error:
        prepare.image_jobs(tmp_path / "masks" / "nothere", tmp_path / "masks")
    assert_one_line(error, "no such directory")
    Image.fromarray(image).save(tmp_path / "images" / "a.jpg")
    with pytest.raises(ValueError) as error:
        prepare.image_jobs(tmp_path / "images", tmp_path / "masks")
    assert_one_line(error, "two files named a (a.jpg, a.png)")


def test_failure_mid_run_leaves_no_records_and_the_fixed_rerun_resumes(tmp_path, capsys):
    image, mask = make_slide(0)
    write_competition(tmp_path / "data", {"a_good": (image, mask), "b_bad": (image, mask)})
    bad = tmp_path / "data" / "train" / "b_bad.tiff"
    tifffile.imwrite(bad, image, tile=(64, 64), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(bad) as tif:
        offset = tif.pages[0].dataoffsets[-1]
    with open(bad, "r+b") as handle:        # the last tile only fails when it is read
        handle.seek(offset)
        handle.write(b"\xff" * 16)
    with pytest.raises(ValueError, match="b_bad.tiff: cannot decode TIFF segment"):
        run_competition(tmp_path / "data", tmp_path / "out")
    assert [name for name in record_files(tmp_path / "out") if name[0] != "."] == []
    tifffile.imwrite(bad, image, tile=(64, 64), photometric="rgb", compression="zlib")
    capsys.readouterr()
    run_competition(tmp_path / "data", tmp_path / "out")
    assert capsys.readouterr().err.startswith("resuming: 1 of 2 slides were tiled")
    assert_same_records(tmp_path / "out", _clean_run(tmp_path, "data"))


def test_worker_processes_write_the_same_records(tmp_path):
    slides = {"s0": make_slide(0), "s1": make_slide(1)}
    write_competition(tmp_path / "data", slides)
    one = run_competition(tmp_path / "data", tmp_path / "one", workers=1)
    two = run_competition(tmp_path / "data", tmp_path / "two", workers=2)
    assert one == two
    assert record_files(tmp_path / "one") == record_files(tmp_path / "two")
    # Compared decoded: protobuf may order the feature map differently per process.
    for name in record_files(tmp_path / "one"):
        if name.endswith(".tfrec"):
            for a, b in zip(read_records(tmp_path / "one" / name),
                            read_records(tmp_path / "two" / name), strict=True):
                np.testing.assert_array_equal(a[0], b[0])
                np.testing.assert_array_equal(a[1], b[1])


def test_default_output_is_what_it_was_before_stain_normalisation(tmp_path):
    """prepare.json and every decoded tile, hashed: the digest is that of the commit
    before --stain_normalisation existed (decoded, as protobuf may order a record's
    features differently from one process to the next)."""
    write_competition(tmp_path / "data", {"s0": make_slide(0), "s1": make_slide(1)})
    run_competition(tmp_path / "data", tmp_path / "out", stain_normalisation="none")
    digest = hashlib.md5((tmp_path / "out" / "prepare.json").read_bytes())
    for name in ("s0-9.tfrec", "s1-9.tfrec"):
        for image, mask in read_records(tmp_path / "out" / name):
            digest.update(image.tobytes())
            digest.update(mask.tobytes())
    assert digest.hexdigest() == "9b22c993062cc82b0b493cfc404f54a4"


def test_reinhard_moves_every_slides_tiles_onto_the_recorded_target(tmp_path):
    image, mask = make_slide(0)
    bluer, _ = make_slide(1)
    bluer[:, 170:] = (bluer[:, 170:] * np.array([0.75, 0.9, 1.0])).astype(np.uint8)
    write_competition(tmp_path / "data", {"s0": (image, mask), "s1": (bluer, mask)})
    plain = run_competition(tmp_path / "data", tmp_path / "plain")
    summary = run_competition(tmp_path / "data", tmp_path / "out",
                              stain_normalisation="reinhard")
    record = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert record == summary
    assert {key: value for key, value in record.items() if key != "stain_normalisation"} \
        == plain   # the same tiles are kept
    stain_record = record["stain_normalisation"]
    assert stain_record["method"] == "reinhard" and set(stain_record["slides"]) == {"s0", "s1"}
    per_slide = [stain.StainStatistics.from_json(stain_record["slides"][slide_id], slide_id)
                 for slide_id in ("s0", "s1")]
    target = stain.StainStatistics.from_json(stain_record["target"], "target")
    assert target == stain.mean_statistics(per_slide)
    assert np.linalg.norm(np.subtract(per_slide[0].mean, per_slide[1].mean)) > 5
    for slide_id in ("s0", "s1"):
        name = f"{slide_id}-{record['slides'][slide_id]}.tfrec"
        tiles = np.stack([tile for tile, _ in read_records(tmp_path / "out" / name)])
        before = np.stack([tile for tile, _ in read_records(tmp_path / "plain" / name)])
        tissue = stain.tissue_pixels(before, 40)
        lab = stain.rgb_to_lab(tiles[tissue])
        np.testing.assert_allclose(lab.mean(axis=0), target.mean, atol=1.0)
        np.testing.assert_allclose(lab.std(axis=0), target.std, rtol=0.1)
        np.testing.assert_array_equal(tiles[~tissue], before[~tissue])   # glass, padding


def test_reinhard_statistics_in_worker_processes_are_the_same(tmp_path):
    write_competition(tmp_path / "data", {"s0": make_slide(0), "s1": make_slide(1)})
    one = run_competition(tmp_path / "data", tmp_path / "one", stain_normalisation="reinhard")
    two = run_competition(tmp_path / "data", tmp_path / "two", workers=2,
                          stain_normalisation="reinhard")
    assert one == two


def test_an_unknown_stain_normalisation_is_one_line_naming_the_flag(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.prepare", f"--competition_dir={tmp_path}",
         f"--out_dir={tmp_path / 'out'}", "--stain_normalisation=macenko"],
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "--stain_normalisation" in line and "macenko" in line
    with pytest.raises(ValueError, match="^--stain_normalisation must be one of none, "
                                         "reinhard, got 'macenko'$"):
        prepare.TilingConfig(stain_normalisation="macenko")


def test_command_line_error_is_one_line_with_exit_status_1(tmp_path):
    image, mask = make_slide(0)
    write_competition(tmp_path / "data", {"good": (image, mask)})
    with open(tmp_path / "data" / "train.csv", "w") as handle:
        handle.write("id,encoding\ngood,5 3 4 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "jaxseg.prepare", f"--competition_dir={tmp_path / 'data'}",
         f"--out_dir={tmp_path / 'out'}", "--tile_size=64", "--reduction=2"],
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'data' / 'train.csv'}, id good: RLE runs not increasing or "
        "overlapping: run 1 (5 3) then 4")
    assert record_files(tmp_path / "out") == []
