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


def test_no_stain_spread_renders_the_slide_as_without_a_stain(scene):
    assert synthetic.draw_stain(7, 0.0) == synthetic.NO_STAIN
    assert scene.stain == synthetic.NO_STAIN
    explicit = synthetic.make_scene(500, 640, seed=4, stain=synthetic.NO_STAIN, **SMALL)
    np.testing.assert_array_equal(synthetic.render(explicit, 0, 500, 0, 640),
                                  synthetic.render(scene, 0, 500, 0, 640))


def test_stain_scales_each_channels_optical_density_and_keeps_the_layout(scene):
    stain = (1.15, 0.9, 1.0)
    stained_scene = synthetic.make_scene(500, 640, seed=4, stain=stain, **SMALL)
    mask = synthetic.glomerulus_mask(scene)
    np.testing.assert_array_equal(synthetic.glomerulus_mask(stained_scene), mask)
    plain = synthetic.render(scene, 0, 500, 0, 640).astype(np.float64)
    stained = synthetic.render(stained_scene, 0, 500, 0, 640).astype(np.float64)
    # Both are rounded from the same floats: I' = 255 (I / 255) ** factor, up to the two
    # roundings (the curve's slope stays below 1.2 on this range).
    usable = (plain >= 20) & (plain <= 250)
    expected = 255 * (plain / 255) ** np.array(stain)
    assert np.abs(stained - expected)[usable].max() <= 1.2
    # On the glomeruli (dense, dark pixels) the optical density moves by the factor.
    glomeruli = mask[..., None] & usable
    for channel, factor in enumerate(stain):
        inside = glomeruli[..., channel]
        ratio = (np.log(stained[..., channel][inside] / 255).mean()
                 / np.log(plain[..., channel][inside] / 255).mean())
        assert ratio == pytest.approx(factor, abs=0.01)


def test_draw_stain_spreads_per_channel_around_the_shift_deterministically():
    shift = (1.2, 1.0, 0.8)
    stains = np.array([synthetic.draw_stain(seed, 0.1, shift) for seed in range(200)])
    ratios = stains / shift
    assert ratios.min() >= 0.9 - 1e-9 and ratios.max() <= 1.1 + 1e-9
    assert ratios.min() < 0.91 and ratios.max() > 1.09
    assert len({tuple(row) for row in stains}) == 200
    assert synthetic.draw_stain(3, 0.1, shift) == tuple(stains[3])


@pytest.mark.parametrize("arguments,field", [
    (dict(stain_spread=1.0), "stain_spread"),
    (dict(stain_spread=-0.1), "stain_spread"),
    (dict(test_stain_shift=(1.0, 1.0)), "test_stain_shift"),
    (dict(test_stain_shift=(1.0, 0.0, 1.0)), "test_stain_shift"),
])
def test_bad_stain_arguments_name_the_field(tmp_path, arguments, field):
    with pytest.raises(ValueError, match=field):
        synthetic.make_dataset(tmp_path, num_train=1, num_test=1, height=50, width=50,
                               **arguments)
    assert not list(tmp_path.iterdir())


def test_stained_dataset_keeps_masks_shifts_test_slides_and_repeats(tmp_path):
    arguments = dict(num_train=2, num_test=2, height=200, width=240, seed=5, **SMALL)
    plain = synthetic.make_dataset(tmp_path / "plain", **arguments)
    stained = [synthetic.make_dataset(tmp_path / name, **arguments, stain_spread=0.1,
                                      test_stain_shift=(1.3, 1.3, 1.3))
               for name in ("stained", "again")]
    assert stained[0] == stained[1]
    for name in ("train.csv", "test_truth.csv"):
        assert read_csv(tmp_path / "stained" / name) == read_csv(tmp_path / "plain" / name)
    for split in ("train", "test"):
        for slide_id, info in stained[0][split].items():
            assert plain[split][slide_id]["stain"] == synthetic.NO_STAIN
            low, high = (0.9, 1.1) if split == "train" else (1.17, 1.43)
            assert all(low <= f <= high for f in info["stain"])
            files = [(tmp_path / name / split / f"{slide_id}.tiff").read_bytes()
                     for name in ("plain", "stained", "again")]
            assert files[0] != files[1] and files[1] == files[2]
