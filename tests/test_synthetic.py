"""Synthetic slides: competition layout, every TIFF layout, a learnable but non-trivial task."""
import csv

import numpy as np
import pytest

from jaxseg import rle, synthetic
from jaxseg.slides import open_slide

SMALL = dict(glomeruli_per_mpx=40, radius=(20, 35))


@pytest.fixture(scope="module")
def scene():
    return synthetic.make_scene(500, 640, seed=4, **SMALL)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_dataset_has_the_competition_layout_and_every_tiff_layout(tmp_path):
    summary = synthetic.make_dataset(tmp_path, num_train=4, num_test=2, height=260,
                                     width=300, seed=5, **SMALL)
    train, test = summary["train"], summary["test"]
    assert (len(train), len(test)) == (4, 2)
    layouts = [info["layout"] for split in (train, test) for info in split.values()]
    assert set(layouts) == set(synthetic.LAYOUTS)
    assert read_csv(tmp_path / "train.csv")[0] == ["id", "encoding"]
    assert read_csv(tmp_path / "test_truth.csv")[0] == ["id", "encoding"]
    assert read_csv(tmp_path / "sample_submission.csv") == [["id", "predicted"]] + [
        [slide_id, ""] for slide_id in test]
    for split, csv_name in (("train", "train.csv"), ("test", "test_truth.csv")):
        encodings = dict(read_csv(tmp_path / csv_name)[1:])
        assert set(encodings) == set(summary[split])
        for slide_id in summary[split]:
            with open_slide(tmp_path / split / f"{slide_id}.tiff") as slide:
                assert (slide.height, slide.width) == (260, 300)
                assert slide.read(0, 260, 0, 300).std() > 10
            assert rle.decode(encodings[slide_id], (260, 300)).any()


@pytest.mark.parametrize("layout", synthetic.LAYOUTS)
def test_written_layouts_read_back_as_rendered(tmp_path, scene, layout):
    path = tmp_path / "slide.tiff"
    synthetic.write_slide(path, scene, layout)
    rendered = synthetic.render(scene, 0, scene.height, 0, scene.width)
    with open_slide(path) as slide:
        pixels = slide.read(0, scene.height, 0, scene.width).astype(np.int16)
    error = np.abs(pixels - rendered)
    if layout == "tiled-jpeg":
        assert error.mean() < 4
    else:
        assert error.max() == 0


def test_rendering_is_seamless_and_deterministic(scene):
    whole = synthetic.render(scene, 0, 500, 0, 640)
    np.testing.assert_array_equal(synthetic.render(scene, 37, 401, 250, 619),
                                  whole[37:401, 250:619])
    again = synthetic.make_scene(500, 640, seed=4, **SMALL)
    np.testing.assert_array_equal(synthetic.render(again, 0, 500, 0, 640), whole)
    other = synthetic.make_scene(500, 640, seed=5, **SMALL)
    assert not np.array_equal(synthetic.render(other, 0, 500, 0, 640), whole)


def saturation(pixels):
    high = pixels.max(axis=-1).astype(np.float64)
    return 255 * (high - pixels.min(axis=-1)) / np.maximum(high, 1)


def test_glass_tissue_glomeruli_and_distractors(scene):
    pixels = synthetic.render(scene, 0, scene.height, 0, scene.width)
    mask = synthetic.glomerulus_mask(scene)
    assert len(scene.glomeruli.cy) >= 5 and len(scene.vessels.cy) >= 3
    assert 0.02 < mask.mean() < 0.3
    # Glass is bright and unsaturated, tissue saturated: the background filter relies
    # on it. (Bowman's space is pale too, hence the mask's lower bound.)
    pale = saturation(pixels) < 20
    assert 0.1 < (pale & ~mask).mean() < 0.6
    assert pixels[pale].mean() > 220
    assert (saturation(pixels[mask]) > 40).mean() > 0.6
    # Pixels of the tuft's colour lie outside glomeruli too (arteriole walls): colour
    # alone cannot segment the task.
    tuft_coloured = np.linalg.norm(pixels - synthetic._COLOURS[synthetic._TUFT],
                                   axis=-1) < 25
    assert tuft_coloured[mask].mean() > 0.2
    assert (tuft_coloured & ~mask).sum() > 0.3 * (tuft_coloured & mask).sum()


def test_mask_is_what_the_glomeruli_look_like(scene):
    mask = synthetic.glomerulus_mask(scene)
    for cy, cx, radius in zip(scene.glomeruli.cy, scene.glomeruli.cx,
                              scene.glomeruli.radius):
        assert mask[int(cy), int(cx)]
        assert mask[int(cy), int(cx + 0.8 * radius)]
        assert not mask[int(cy), min(scene.width - 1, int(cx + 1.3 * radius))]
