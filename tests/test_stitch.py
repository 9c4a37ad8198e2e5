"""The sliding-window engine with an identity 'model': stitching must give the input back."""
import numpy as np
import pytest

from jaxseg import stitch

TILE = 64


def image_reader(image: np.ndarray, calls: list | None = None):
    def read(y0, y1, x0, x1):
        assert 0 <= y0 < y1 <= image.shape[0] and 0 <= x0 < x1 <= image.shape[1]
        if calls is not None:
            calls.append((y0, y1, x0, x1))
        return image[y0:y1, x0:x1]
    return read


def identity(batch: np.ndarray) -> np.ndarray:
    """Probability = first channel / 255: any misplaced or mis-weighted pixel shows."""
    assert batch.dtype == np.uint8 and batch.shape[1:] == (TILE, TILE, 3)
    return batch[..., 0] / np.float32(255)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def predict_image(grid: stitch.WindowGrid, read_window, predict_fn, **options) -> np.ndarray:
    """The whole (height, width) probability map, which the tests' images fit in memory."""
    return np.concatenate([rows for _, rows in
                           stitch.predict_rows(grid, read_window, predict_fn, **options)])


def test_window_starts_shift_the_last_window_inwards():
    assert stitch.window_starts(200, 64, 48) == (0, 48, 96, 136)
    assert stitch.window_starts(208, 64, 48) == (0, 48, 96, 144)
    assert stitch.window_starts(64, 64, 48) == (0,)
    assert stitch.window_starts(30, 64, 48) == (0,)


@pytest.mark.parametrize("height,width", [(64, 64), (200, 333), (30, 50), (1, 130), (129, 7)])
@pytest.mark.parametrize("blend", stitch.BLENDS)
@pytest.mark.parametrize("overlap", [0, 16, 45])
def test_identity_model_reproduces_the_image(height, width, blend, overlap):
    image = random_image(height, width)
    grid = stitch.plan_windows(height, width, TILE, overlap)
    probabilities = predict_image(grid, image_reader(image), identity, blend=blend,
                                         batch_size=3)
    assert probabilities.shape == (height, width)
    np.testing.assert_allclose(probabilities, image[..., 0] / np.float32(255), rtol=1e-6,
                               atol=0)


@pytest.mark.parametrize("blend", stitch.BLENDS)
def test_mask_is_the_thresholded_identity(blend):
    image = random_image(150, 170, seed=1)
    grid = stitch.plan_windows(150, 170, TILE, 16)
    mask = stitch.predict_mask(grid, image_reader(image), identity, threshold=0.5, blend=blend)
    np.testing.assert_array_equal(mask, image[..., 0] > 127)


def test_centre_crop_takes_each_pixel_from_one_window_when_the_stride_fits():
    starts = stitch.window_starts(208, TILE, 48)
    weights = stitch.axis_weights(208, TILE, 16, starts, "center")
    np.testing.assert_array_equal(stitch.weight_totals(208, starts, weights), np.ones(208))
    # Inner windows drop 8 px on each side; the border sides are kept.
    np.testing.assert_array_equal(weights[1], np.r_[np.zeros(8), np.ones(48), np.zeros(8)])
    np.testing.assert_array_equal(weights[0], np.r_[np.ones(56), np.zeros(8)])
    np.testing.assert_array_equal(weights[-1], np.r_[np.zeros(8), np.ones(56)])


def test_window_borders_are_blended_away():
    """A model that is wrong near its window edges is right after stitching with overlap."""
    image = random_image(300, 260, seed=2)
    margin = 8

    def wrong_at_edges(batch):
        probabilities = identity(batch).copy()
        probabilities[:, :margin] = probabilities[:, -margin:] = 7.0
        probabilities[:, :, :margin] = probabilities[:, :, -margin:] = 7.0
        return probabilities

    grid = stitch.plan_windows(300, 260, TILE, 2 * margin)
    probabilities = predict_image(grid, image_reader(image), wrong_at_edges,
                                         blend="center")
    expected = image[..., 0] / np.float32(255)
    inner = (slice(margin, -margin), slice(margin, -margin))
    np.testing.assert_allclose(probabilities[inner], expected[inner], rtol=1e-6)
    assert (probabilities[:margin] == 7.0).all()


def test_rows_stream_in_order_and_the_buffer_stays_a_strip():
    image = random_image(1000, 90, seed=3)
    calls = []
    grid = stitch.plan_windows(1000, 90, TILE, 16)
    firsts, lengths, done = [], [], []
    for first, rows in stitch.predict_rows(grid, image_reader(image, calls), identity,
                                           batch_size=4, progress=done.append):
        firsts.append(first)
        lengths.append(len(rows))
    assert firsts == list(np.cumsum([0] + lengths[:-1]))
    assert sum(lengths) == 1000 and max(lengths) <= TILE
    assert len(calls) == grid.num_windows == sum(done)
    assert sorted(set(calls)) == sorted(calls)  # each window read once


def test_bad_plans_and_models_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        stitch.plan_windows(100, 100, TILE, TILE)
    with pytest.raises(ValueError, match="image size"):
        stitch.plan_windows(0, 100, TILE, 0)
    grid = stitch.plan_windows(100, 100, TILE, 0)
    with pytest.raises(ValueError, match="blend"):
        predict_image(grid, image_reader(random_image(100, 100)), identity, blend="max")
    with pytest.raises(ValueError, match="returned shape"):
        predict_image(grid, image_reader(random_image(100, 100)),
                             lambda batch: batch[..., 0, 0])


def test_a_non_finite_probability_stops_naming_the_window():
    """NaN > threshold is False: without the check the window would become background."""
    image = random_image(100, 150)
    image[..., 1] = np.minimum(image[..., 1], 200)
    image[70, 120, 1] = 255                     # the one pixel the model fails on
    grid = stitch.plan_windows(100, 150, TILE, 16)

    def fails_on_the_marked_pixel(batch):
        return np.where(batch[..., 1] == 255, np.nan, identity(batch))

    first = next(number for number, (y, x) in enumerate(grid.windows())
                 if y <= 70 < y + TILE and x <= 120 < x + TILE)
    y, x = grid.windows()[first]
    with pytest.raises(FloatingPointError, match=(
            rf"^window {first + 1} of {grid.num_windows} \(rows {y}:{y + TILE}, cols "
            rf"{x}:{min(x + TILE, 150)}\): 1 of {TILE * TILE} predicted probabilities are NaN "
            "or infinite$")):
        stitch.predict_mask(grid, image_reader(image), fails_on_the_marked_pixel)
