"""RLE in the Kaggle convention: column-major, 1-indexed `start length` pairs."""
import numpy as np
import pytest

from jaxseg import rle

# Columns read top to bottom, then left to right: pixels 1-3 are column 0, 4-6 column 1,
# 7-9 column 2, 10-12 column 3. Ones at pixels 2, 4, 5, 6, 7 and 12.
HAND_MASK = np.array([[0, 1, 1, 0],
                      [1, 1, 0, 0],
                      [0, 1, 0, 1]], dtype=bool)
HAND_RLE = "2 1 4 4 12 1"


def reference_encode(mask: np.ndarray) -> str:
    """The competition's published recipe: mask.T.flatten(), padded, np.diff."""
    pixels = np.concatenate([[0], (mask != 0).T.flatten().astype(np.int8), [0]])
    runs = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    runs[1::2] -= runs[::2]
    return " ".join(map(str, runs))


def test_hand_made_example_encodes_and_decodes():
    assert rle.encode(HAND_MASK) == HAND_RLE
    decoded = rle.decode(HAND_RLE, (3, 4))
    assert decoded.dtype == np.bool_ and decoded.shape == (3, 4)
    np.testing.assert_array_equal(decoded, HAND_MASK)


def test_nonzero_values_count_as_mask():
    assert rle.encode(HAND_MASK.astype(np.uint8) * 255) == HAND_RLE


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (5, 5), (13, 29)])
def test_empty_and_full_masks(shape):
    assert rle.encode(np.zeros(shape, bool)) == ""
    assert not rle.decode("", shape).any()
    full = f"1 {shape[0] * shape[1]}"
    assert rle.encode(np.ones(shape, bool)) == full
    assert rle.decode(full, shape).all()


@pytest.mark.parametrize("block_pixels", [1, 7, 1 << 26])
@pytest.mark.parametrize("looped_piece_pixels", [0, 64, 1 << 30])
def test_random_round_trips_match_the_reference(monkeypatch, block_pixels,
                                                looped_piece_pixels):
    # Tiny blocks force runs across block boundaries; the piece threshold switches
    # between the per-piece loop and the cumulative-sum fill.
    monkeypatch.setattr(rle, "_BLOCK_PIXELS", block_pixels)
    monkeypatch.setattr(rle, "_PIXELS_PER_LOOPED_PIECE", looped_piece_pixels)
    rng = np.random.default_rng(0)
    for _ in range(40):
        height, width = rng.integers(1, 25, size=2)
        mask = rng.random((height, width)) < rng.random()
        encoded = rle.encode(mask)
        assert encoded == reference_encode(mask)
        np.testing.assert_array_equal(rle.decode(encoded, (height, width)), mask)


def test_windows_decode_on_their_own():
    rng = np.random.default_rng(1)
    mask = rng.random((37, 23)) < 0.4
    mask[:, 5] = True                      # a run spanning whole columns
    runs = rle.RleMask(rle.encode(mask), mask.shape)
    assert runs.shape == (37, 23)
    for _ in range(50):
        y0, x0 = rng.integers(0, 37), rng.integers(0, 23)
        y1, x1 = rng.integers(y0 + 1, 38), rng.integers(x0 + 1, 24)
        np.testing.assert_array_equal(runs.read(y0, y1, x0, x1), mask[y0:y1, x0:x1])


def test_window_outside_the_mask_is_rejected():
    with pytest.raises(ValueError, match="outside the 3 x 4 mask"):
        rle.RleMask(HAND_RLE, (3, 4)).read(0, 4, 0, 4)


@pytest.mark.parametrize("bad, message", [
    ("2 1 4", "odd number of values"),
    ("4 1 2 1", "not increasing or overlapping"),
    ("2 3 4 1", "not increasing or overlapping"),
    ("2 1 2 1", "not increasing or overlapping"),
    ("10 4", "past the image: last pixel 13 > 12"),
    ("13 1", "past the image"),
    ("0 2", "below 1"),
    ("2 0", "run length 0 is below 1"),
    ("2 x", "'x' is not an integer"),
])
def test_malformed_rle_is_one_clear_line(bad, message):
    with pytest.raises(ValueError, match=message) as error:
        rle.decode(bad, (3, 4))
    assert "\n" not in str(error.value)


def test_adjacent_runs_are_accepted():
    np.testing.assert_array_equal(rle.decode("1 2 3 1", (3, 1)), [[True], [True], [True]])
