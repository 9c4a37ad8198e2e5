"""Shift-scale-rotate on the device: scipy's interpolation, the stated directions, and
examples that drew nothing left bit for bit."""
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from jaxseg import warp

HEIGHT, WIDTH = 24, 20


def _batch(seed: int, count: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (count, HEIGHT, WIDTH, 3)).astype(np.float32)
    masks = (rng.random((count, HEIGHT, WIDTH, 1)) > 0.6).astype(np.float32)
    return images, masks


def _params(*rows) -> np.ndarray:
    return np.array(rows, np.float32)


def _warped(images, masks, params):
    out_images, out_masks = warp.shift_scale_rotate(jnp.asarray(images), jnp.asarray(masks),
                                                    jnp.asarray(params))
    return np.asarray(out_images), np.asarray(out_masks)


@pytest.mark.parametrize("row", [(30.0, 1.1, 0.05, -0.03), (-135.0, 0.85, -0.1, 0.2),
                                 (7.5, 1.0, 0.0, 0.0)])
def test_images_are_scipys_bilinear_and_masks_its_nearest_with_mirrored_borders(row):
    """scipy.ndimage at the same source coordinates, mode 'mirror' (OpenCV's
    BORDER_REFLECT_101), order 1 for images and 0 for masks."""
    images, masks = _batch(0, 1)
    out_images, out_masks = _warped(images, masks, _params(row))
    coordinates = np.asarray(warp.source_coordinates(HEIGHT, WIDTH, jnp.asarray(row)))
    expected = np.stack([scipy.ndimage.map_coordinates(images[0, ..., c], coordinates,
                                                       order=1, mode="mirror")
                         for c in range(3)], axis=-1)
    np.testing.assert_allclose(out_images[0], expected, atol=2e-3)
    expected_mask = scipy.ndimage.map_coordinates(masks[0, ..., 0], coordinates, order=0,
                                                  mode="mirror")
    # scipy and jnp.round may part on a coordinate exactly halfway between two pixels.
    assert np.mean(out_masks[0, ..., 0] != expected_mask) < 0.005
    assert set(np.unique(out_masks)) <= {0.0, 1.0}


def test_angle_turns_counter_clockwise_shift_moves_right_and_down_scale_zooms():
    size = 21
    centre = size // 2
    image = np.zeros((1, size, size, 1), np.float32)
    image[0, centre, centre + 4] = 255.0   # right of the centre
    mask = image / 255.0

    def where_it_went(row) -> tuple[float, float]:
        """The mean position of the marked pixel in the warped mask."""
        _, out_mask = _warped(image, mask, _params(row))
        rows, cols = np.nonzero(out_mask[0, ..., 0])
        return float(rows.mean()), float(cols.mean())

    assert where_it_went((90.0, 1.0, 0.0, 0.0)) == (centre - 4, centre)    # now above
    assert where_it_went((-90.0, 1.0, 0.0, 0.0)) == (centre + 4, centre)   # now below
    assert where_it_went((0.0, 1.5, 0.0, 0.0)) == (centre, centre + 6)     # 1.5 times as far
    assert where_it_went((0.0, 1.0, 3 / size, 2 / size)) == (centre + 2, centre + 7)

def test_examples_that_drew_nothing_are_bit_for_bit_and_a_batch_of_none_is_untouched():
    images, masks = _batch(1)
    identity = warp.IDENTITY
    out_images, out_masks = _warped(images, masks, _params(identity, (20.0, 1.0, 0, 0),
                                                           identity))
    for index in (0, 2):
        np.testing.assert_array_equal(out_images[index], images[index])
        np.testing.assert_array_equal(out_masks[index], masks[index])
    assert not np.array_equal(out_images[1], images[1])
    untouched = _warped(images, masks, _params(*[identity] * 3))
    np.testing.assert_array_equal(untouched[0], images)
    np.testing.assert_array_equal(untouched[1], masks)


def test_a_full_turn_and_unit_scale_give_the_image_back():
    images, masks = _batch(2, 1)
    out_images, out_masks = _warped(images, masks, _params((360.0, 1.0, 0.0, 0.0)))
    np.testing.assert_allclose(out_images, images, atol=0.05)
    np.testing.assert_array_equal(out_masks, masks)
