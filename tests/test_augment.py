"""Augmentations: image and mask move together, ops occur as configured, colours clip.

The host half (`augment`: geometry and colour draws) and the device half (`colour.jitter`)
are checked together where the recipe's op is the whole of both.
"""
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf
from skimage import color as skimage_color

from jaxseg import colour, warp
from jaxseg.augment import augment, augment_fn, check_augment_config, default_augment_config

SIZE = 8
NUM_SEEDS = 400


def _position_image() -> np.ndarray:
    """Channel 0 holds the row, channel 1 the column, so every pixel knows its origin."""
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    return np.stack([rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def _asymmetric_mask() -> np.ndarray:
    """No symmetry of the square maps this mask onto itself."""
    return np.random.default_rng(3).random((SIZE, SIZE, 1)) > 0.5


def _config(**overrides):
    config = default_augment_config()
    config.update(overrides)
    return config


GEOMETRY_ONLY = dict(saturation_prob=0.0, contrast_prob=0.0, brightness_prob=0.0)
COLOUR_ONLY = dict(flip_left_right_prob=0.0, flip_up_down_prob=0.0, rot90=False)


def _run(config, image, mask, num_seeds=NUM_SEEDS, with_warp=False):
    """(image, mask, colour factors[, warp parameters]) of one tile for seeds
    (11, 0..num_seeds-1), in a graph like data.py's.

    Uncompiled, as XLA compilation would dominate the test time; a test below checks
    that the compiled function data.py uses draws the same.
    """
    seeds = tf.data.Dataset.range(num_seeds).map(
        lambda seed: tf.stack([tf.constant(11, tf.int32), tf.cast(seed, tf.int32)]))
    outputs = seeds.map(lambda seed: augment(image, mask, config, seed)).batch(
        num_seeds).get_single_element()
    return list(zip(*[output.numpy() for output in outputs[:4 if with_warp else 3]]))


def _augmented(config, image, mask, num_seeds=NUM_SEEDS):
    """(float32 image, mask) pairs as the train step sees them: the host's output with
    its colour factors applied on the device."""
    outputs = _run(config, image, mask, num_seeds)
    images = np.asarray(colour.jitter(np.stack([o[0] for o in outputs]),
                                      np.stack([o[2] for o in outputs])))
    return [(jittered, out_mask) for jittered, (_, out_mask, _) in zip(images, outputs)]


def _dihedral(image: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square, identity first."""
    rotations = [np.rot90(image, k) for k in range(4)]
    return rotations + [np.fliplr(r) for r in rotations]


def _which(transformed: np.ndarray, candidates: list[np.ndarray]) -> int:
    matches = [i for i, c in enumerate(candidates) if np.array_equal(transformed, c)]
    assert len(matches) == 1, "output is not a symmetry of the input"
    return matches[0]


def test_geometry_moves_mask_with_image_and_every_symmetry_occurs():
    image, mask = _position_image(), _asymmetric_mask()
    seen = set()
    for out_image, out_mask, factors in _run(_config(**GEOMETRY_ONLY), image, mask):
        assert out_image.dtype == np.uint8
        np.testing.assert_array_equal(factors, colour.IDENTITY)
        rows, cols = out_image[..., 0].astype(int), out_image[..., 1].astype(int)
        np.testing.assert_array_equal(out_mask, mask[rows, cols])
        seen.add(_which(out_image, _dihedral(image)))
    assert seen == set(range(8))


def test_mask_stays_aligned_under_the_full_default_augmentation():
    # Mask pixels are white and the rest black: every colour op with a positive factor
    # keeps white brighter than black, so the mask can be read back from the image.
    mask = _asymmetric_mask()
    image = np.repeat(mask * 255, 3, axis=-1).astype(np.uint8)
    for out_image, out_mask in _augmented(default_augment_config(), image, mask):
        foreground = out_image[out_mask[..., 0]]
        background = out_image[~out_mask[..., 0]]
        assert foreground.min() > background.max()
        assert _which(out_mask, _dihedral(mask)) >= 0


def test_rot90_draws_each_quarter_turn_uniformly():
    image = _position_image()
    outputs = _run(_config(flip_left_right_prob=0.0, flip_up_down_prob=0.0, **GEOMETRY_ONLY),
                   image, _asymmetric_mask())
    turns = [_which(out, [np.rot90(image, k) for k in range(4)]) for out, _, _ in outputs]
    for k in range(4):
        assert turns.count(k) / NUM_SEEDS == pytest.approx(0.25, abs=0.06)


@pytest.mark.parametrize("field,probability,flip", [
    ("flip_left_right_prob", 0.5, np.fliplr),
    ("flip_up_down_prob", 0.6, np.flipud),
    ("flip_left_right_prob", 1.0, np.fliplr),
])
def test_flips_happen_with_their_probability_and_direction(field, probability, flip):
    others = dict(flip_left_right_prob=0.0, flip_up_down_prob=0.0, rot90=False)
    others[field] = probability
    image = _position_image()
    outputs = _run(_config(**others, **GEOMETRY_ONLY), image, _asymmetric_mask())
    flipped = [_which(out, [image, flip(image)]) for out, _, _ in outputs]
    assert np.mean(flipped) == pytest.approx(probability, abs=0.06)


def test_default_config_matches_the_recipe():
    config = default_augment_config()
    assert (config.flip_left_right_prob, config.flip_up_down_prob) == (0.5, 0.6)
    assert config.rot90 and config.enabled
    assert tuple(config.saturation_range) == (0.6, 1.4)
    assert tuple(config.contrast_range) == (0.7, 1.3)
    assert tuple(config.brightness_range) == (0.7, 1.3)
    assert config.saturation_prob == config.contrast_prob == config.brightness_prob == 0.55
    assert config.xla_compile
    assert config.hed_prob == config.hue_prob == 0.0  # not the recipe's: off


def _random_tile(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
            rng.random((SIZE, SIZE, 1)) > 0.5)


def test_colour_ops_clip_to_pixel_range_and_leave_mask_alone():
    image, mask = _random_tile(0)
    for ranges in [dict(brightness_range=(2.0, 3.0), contrast_range=(1.5, 2.0)),
                   dict(brightness_range=(0.0, 0.1), contrast_range=(0.0, 0.1))]:
        config = _config(saturation_prob=1.0, contrast_prob=1.0, brightness_prob=1.0,
                         **ranges, **COLOUR_ONLY)
        for out_image, out_mask in _augmented(config, image, mask, num_seeds=20):
            assert out_image.dtype == np.float32
            assert 0.0 <= out_image.min() and out_image.max() <= 255.0
            np.testing.assert_array_equal(out_mask, mask)
    bright = _augmented(_config(brightness_prob=1.0, brightness_range=(2.0, 3.0),
                                **COLOUR_ONLY, saturation_prob=0.0, contrast_prob=0.0),
                        image, mask, num_seeds=1)
    assert bright[0][0].max() == 255.0


def test_brightness_is_a_factor_applied_with_its_probability():
    image, mask = _random_tile(1)
    config = _config(saturation_prob=0.0, contrast_prob=0.0, brightness_prob=0.55,
                     brightness_range=(0.5, 0.5), **COLOUR_ONLY)
    outputs = [out for out, _ in _augmented(config, image, mask)]
    halved = [np.allclose(out, image * 0.5) for out in outputs]
    assert all(h or np.array_equal(out, image) for h, out in zip(halved, outputs))
    assert np.mean(halved) == pytest.approx(0.55, abs=0.06)


@pytest.mark.parametrize("column,field", [(colour.SATURATION, "saturation"),
                                          (colour.CONTRAST, "contrast"),
                                          (colour.BRIGHTNESS, "brightness")])
def test_each_colour_factor_is_drawn_in_its_range_with_its_probability(column, field):
    config = _config(**{f"{name}_prob": 0.0 for name in ("saturation", "contrast",
                                                           "brightness")}, **COLOUR_ONLY)
    config[f"{field}_prob"], config[f"{field}_range"] = 0.3, (0.7, 0.9)
    factors = np.stack([f for _, _, f in _run(config, *_random_tile(3))])
    drawn = factors[:, column] != 1.0
    assert np.mean(drawn) == pytest.approx(0.3, abs=0.06)
    assert factors[drawn, column].min() >= 0.7 and factors[drawn, column].max() < 0.9
    assert (np.delete(factors - colour.IDENTITY, column, axis=1) == 0.0).all()


def test_a_factor_of_one_leaves_pixels_bit_for_bit():
    image, _ = _random_tile(4)
    np.testing.assert_array_equal(
        colour.jitter(image[None], np.array([colour.IDENTITY], np.float32))[0],
        image.astype(np.float32))


def test_contrast_is_tf_image_adjust_contrast_clipped():
    image, mask = _random_tile(2)
    config = _config(saturation_prob=0.0, contrast_prob=1.0, contrast_range=(1.25, 1.25),
                     brightness_prob=0.0, **COLOUR_ONLY)
    expected = tf.clip_by_value(tf.image.adjust_contrast(tf.cast(image, tf.float32), 1.25),
                                0.0, 255.0)
    np.testing.assert_allclose(_augmented(config, image, mask, num_seeds=1)[0][0], expected,
                               atol=1e-3)


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.0, 1.4, 3.0])
def test_saturation_equals_tf_image_hsv_saturation(factor):
    image = np.random.default_rng(4).integers(0, 256, (32, 32, 3)).astype(np.float32)
    image[0, :4] = [[0, 0, 0], [255, 255, 255], [90, 90, 90], [255, 0, 0]]
    expected = tf.image.adjust_saturation(image / 255.0, factor) * 255.0
    np.testing.assert_allclose(colour.adjust_saturation(image, np.float32(factor)), expected,
                               atol=0.02)


@pytest.mark.parametrize("overrides", [
    {}, dict(hed_prob=0.5, hue_prob=0.5, shift_scale_rotate_prob=0.5)])
def test_xla_compiled_augment_draws_what_uncompiled_augment_draws(overrides):
    image, mask = _random_tile(5)
    compiled = augment_fn(_config(**overrides))
    for seed, plain in enumerate(_run(_config(**overrides), image, mask, num_seeds=40,
                                      with_warp=True)):
        xla = compiled(image, mask, tf.constant([11, seed], tf.int32))
        np.testing.assert_array_equal(xla[0], plain[0])
        np.testing.assert_array_equal(xla[1], plain[1])
        # One float32 rounding apart at most: XLA may fuse low + (high - low) * u (an
        # absolute rounding of the range for a draw near 0: a stain shift, an angle).
        np.testing.assert_allclose(xla[2], plain[2], rtol=2e-7, atol=1e-8)
        np.testing.assert_allclose(xla[3], plain[3], rtol=2e-7, atol=2 * 90.0 * 2**-24)


def test_same_seed_same_result_and_seeds_differ():
    image, mask = _random_tile(6)
    first = _augmented(default_augment_config(), image, mask, num_seeds=10)
    again = _augmented(default_augment_config(), image, mask, num_seeds=10)
    for (a, _), (b, _) in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a, _ in first}) == 10


def test_disabled_leaves_the_tile_as_it_is():
    image, mask = _random_tile(7)
    out_image, out_mask, factors, params = _run(_config(enabled=False, shift_scale_rotate_prob=1.0),
                                                image, mask, num_seeds=1, with_warp=True)[0]
    assert out_image.dtype == np.uint8
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)
    np.testing.assert_array_equal(factors, colour.IDENTITY)
    np.testing.assert_array_equal(params, warp.IDENTITY)


@pytest.mark.parametrize("overrides,field", [
    (dict(flip_up_down_prob=1.5), "flip_up_down_prob"),
    (dict(brightness_prob=-0.1), "brightness_prob"),
    (dict(contrast_range=(1.3, 0.7)), "contrast_range"),
    (dict(saturation_range=(-0.5, 1.0)), "saturation_range"),
    (dict(hed_prob=1.5), "hed_prob"),
    (dict(hue_prob=-1.0), "hue_prob"),
    (dict(hed_scale=1.5), "hed_scale"),
    (dict(hed_shift=-0.1), "hed_shift"),
    (dict(hue_max_delta=0.6), "hue_max_delta"),
    (dict(shift_scale_rotate_prob=2.0), "shift_scale_rotate_prob"),
    (dict(scale_limit=1.0), "scale_limit"),
    (dict(rotate_limit=-5.0), "rotate_limit"),
    (dict(shift_limit=1.5), "shift_limit"),
    (dict(blur_prob=1.1), "blur_prob"),
    (dict(blur_max_sigma=2.0), "blur_max_sigma"),
    (dict(noise_max_std=-1.0), "noise_max_std"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"augment.{field}"):
        check_augment_config(_config(**overrides))


STAIN_ONLY = dict(saturation_prob=0.0, contrast_prob=0.0, brightness_prob=0.0, **COLOUR_ONLY)


def _factors(**columns) -> np.ndarray:
    """One example's factor row: the identity but for the named columns."""
    row = np.array(colour.IDENTITY, np.float32)
    for name, value in columns.items():
        row[getattr(colour, name.upper())] = value
    return row


def test_stain_ops_are_drawn_in_their_ranges_with_their_probabilities():
    config = _config(hed_prob=0.3, hed_scale=0.2, hed_shift=0.1, hue_prob=0.4,
                     hue_max_delta=0.05, **STAIN_ONLY)
    factors = np.stack([f for _, _, f in _run(config, *_random_tile(8))])
    recipe = factors[:, :colour.HUE]
    assert (recipe == 1.0).all()
    hue = factors[:, colour.HUE]
    assert np.mean(hue != 0.0) == pytest.approx(0.4, abs=0.06)
    assert hue.min() >= -0.05 and hue.max() < 0.05
    hed_drawn = (factors[:, colour.HED] != colour.IDENTITY[colour.HED]).all(axis=1)
    hed_skipped = (factors[:, colour.HED] == colour.IDENTITY[colour.HED]).all(axis=1)
    assert (hed_drawn | hed_skipped).all()
    assert np.mean(hed_drawn) == pytest.approx(0.3, abs=0.06)
    scale, shift = factors[hed_drawn, colour.HED_SCALE], factors[hed_drawn, colour.HED_SHIFT]
    assert scale.min() >= 0.8 and scale.max() < 1.2
    assert shift.min() >= -0.1 and shift.max() < 0.1
    # Each stain is drawn on its own, and the two ops independently of each other.
    assert (scale[:, 0] != scale[:, 1]).all() and (shift[:, 1] != shift[:, 2]).all()
    assert np.mean(hed_drawn & (hue != 0)) == pytest.approx(0.3 * 0.4, abs=0.05)


def test_stain_ops_leave_the_recipes_draws_as_they_were():
    image, mask = _random_tile(9)
    recipe = _run(default_augment_config(), image, mask, num_seeds=40)
    stained = _run(_config(hed_prob=1.0, hue_prob=1.0), image, mask, num_seeds=40)
    for (image_a, mask_a, factors_a), (image_b, mask_b, factors_b) in zip(recipe, stained):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)
        np.testing.assert_array_equal(factors_a[:colour.HUE], factors_b[:colour.HUE])
        stain = slice(colour.HUE, colour.HED.stop)
        assert (factors_b[stain] != factors_a[stain]).all()


def test_stain_ops_not_drawn_leave_pixels_bit_for_bit():
    image, _ = _random_tile(10)
    factors = np.stack([_factors(hue=0.1), _factors(), _factors(hed_scale=1.1)])
    out = np.asarray(colour.jitter(np.stack([image] * 3), factors))
    np.testing.assert_array_equal(out[1], image.astype(np.float32))
    assert not np.array_equal(out[0], out[1]) and not np.array_equal(out[2], out[1])


# scikit-image divides optical density by -log(1e-6) and clips concentrations at 0.
SKIMAGE_UNIT = -np.log(1e-6)


def test_hed_concentrations_are_scikit_images_rgb2hed_and_back():
    image = np.random.default_rng(11).integers(1, 256, (16, 16, 3)).astype(np.uint8)
    image[0, :3] = [[255, 255, 255], [1, 1, 1], [255, 1, 128]]
    hed = np.asarray(colour.rgb_to_hed(image.astype(np.float32)))
    reference = skimage_color.rgb2hed(image)
    np.testing.assert_allclose(np.maximum(hed, 0) / SKIMAGE_UNIT, reference, atol=2e-6)
    np.testing.assert_allclose(
        np.clip(colour.hed_to_rgb(reference.astype(np.float32) * SKIMAGE_UNIT), 0, 255),
        skimage_color.hed2rgb(reference) * 255, atol=2e-3)
    # Unclipped, the concentrations invert exactly: the identity jitter changes nothing.
    np.testing.assert_allclose(colour.hed_to_rgb(hed), image, atol=2e-3)


def test_hed_jitter_scales_and_shifts_each_stains_concentration():
    image = np.random.default_rng(12).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    scale, shift = np.array([[1.2, 0.9, 1.05], [0.8, 1.1, 1.0]], np.float32), np.array(
        [[0.05, -0.1, 0.0], [-0.02, 0.03, 0.1]], np.float32)
    factors = np.stack([_factors(hed_scale=a, hed_shift=b) for a, b in zip(scale, shift)])
    # An independent float64 computation of the same colour deconvolution.
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    density = -np.log(np.maximum(image, 1) / 255.0)
    hed = density @ np.linalg.inv(stains)
    moved = hed * scale[:, None, None] + shift[:, None, None]
    expected = np.clip(255 * np.exp(-moved @ stains), 0, 255)
    np.testing.assert_allclose(colour.jitter(image, factors), expected, atol=0.02)


@pytest.mark.parametrize("delta", [-0.5, -0.2, 0.03, 0.25, 0.5, 0.9])
def test_hue_equals_tf_image_adjust_hue(delta):
    image = np.random.default_rng(13).integers(0, 256, (32, 32, 3)).astype(np.float32)
    image[0, :8] = [[0, 0, 0], [255, 255, 255], [90, 90, 90], [255, 0, 0], [0, 255, 0],
                    [0, 0, 255], [200, 200, 10], [10, 200, 200]]
    expected = tf.image.adjust_hue(image / 255.0, delta) * 255.0
    np.testing.assert_allclose(colour.adjust_hue(image, np.full((1,), delta, np.float32)),
                               expected, atol=0.02)


def test_hue_through_the_jitter_is_adjust_hue_per_example():
    image = np.random.default_rng(14).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    factors = np.stack([_factors(hue=0.1), _factors(hue=-0.3)])
    out = np.asarray(colour.jitter(image, factors))
    for example, delta in enumerate((0.1, -0.3)):
        expected = tf.image.adjust_hue(image[example] / 255.0, delta) * 255.0
        np.testing.assert_allclose(out[example], expected, atol=0.02)


def test_shift_scale_rotate_is_drawn_in_its_ranges_and_leaves_the_other_draws():
    image, mask = _random_tile(12)
    config = _config(shift_scale_rotate_prob=0.4, rotate_limit=30.0, scale_limit=0.2,
                     shift_limit=0.1, hed_prob=0.5, hue_prob=0.5)
    recipe = _run(_config(hed_prob=0.5, hue_prob=0.5), image, mask, with_warp=True)
    warped = _run(config, image, mask, with_warp=True)
    for before, after in zip(recipe, warped):
        for array_before, array_after in zip(before[:3], after[:3]):
            np.testing.assert_array_equal(array_before, array_after)
    params = np.stack([row[3] for row in warped])
    drawn = (params != warp.IDENTITY).all(axis=1)
    assert (drawn | (params == warp.IDENTITY).all(axis=1)).all()
    assert np.mean(drawn) == pytest.approx(0.4, abs=0.06)
    angle, scale = params[drawn, warp.ANGLE], params[drawn, warp.SCALE]
    shifts = params[drawn][:, [warp.SHIFT_X, warp.SHIFT_Y]]
    assert angle.min() >= -30 and angle.max() < 30 and angle.std() > 10
    assert scale.min() >= 0.8 and scale.max() < 1.2
    assert shifts.min() >= -0.1 and shifts.max() < 0.1
    assert (shifts[:, 0] != shifts[:, 1]).all()


def test_blur_and_noise_are_drawn_in_their_ranges_and_leave_the_other_draws():
    image, mask = _random_tile(13)
    before = _run(_config(hed_prob=0.5), image, mask)
    config = _config(hed_prob=0.5, blur_prob=0.3, blur_max_sigma=1.2, noise_prob=0.6,
                     noise_max_std=5.0)
    after = _run(config, image, mask)
    for (image_a, mask_a, factors_a), (image_b, mask_b, factors_b) in zip(before, after):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)
        np.testing.assert_array_equal(factors_a[:colour.BLUR_SIGMA], factors_b[:colour.BLUR_SIGMA])
    factors = np.stack([f for _, _, f in after])
    blur, std, seed = (factors[:, column] for column in
                       (colour.BLUR_SIGMA, colour.NOISE_STD, colour.NOISE_SEED))
    # Four standard deviations of a frequency over NUM_SEEDS draws.
    assert np.mean(blur > 0) == pytest.approx(0.3, abs=4 * np.sqrt(0.3 * 0.7 / NUM_SEEDS))
    assert np.mean(std > 0) == pytest.approx(0.6, abs=4 * np.sqrt(0.6 * 0.4 / NUM_SEEDS))
    assert blur.max() < 1.2 and std.max() < 5.0
    assert ((seed > 0) == (std > 0)).all() and (seed == np.round(seed)).all()
    assert len(np.unique(seed[std > 0])) == np.sum(std > 0)


@pytest.mark.parametrize("sigma", [0.4, 1.5])
def test_blur_is_scipys_gaussian_filter_with_mirrored_borders(sigma):
    image, _ = _random_tile(14)
    blurred = colour.jitter(image[None], _factors(blur_sigma=sigma)[None])[0]
    expected = scipy.ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0),
                                             mode="mirror", truncate=colour.BLUR_RADIUS / sigma)
    np.testing.assert_allclose(blurred, np.clip(expected, 0, 255), atol=1e-3)


def test_noise_has_its_deviation_and_follows_the_example_not_its_batch_row():
    flat = np.full((SIZE * 4, SIZE * 4, 3), 128, np.uint8)
    noisy = _factors(noise_std=6.0, noise_seed=77.0)
    other = _factors(noise_std=6.0, noise_seed=78.0)
    first = np.asarray(colour.jitter(np.stack([flat, flat]), np.stack([noisy, other])))
    swapped = np.asarray(colour.jitter(np.stack([flat, flat]), np.stack([other, noisy])))
    np.testing.assert_array_equal(first[0], swapped[1])
    assert not np.array_equal(first[0], first[1])
    difference = first[0] - 128.0
    assert difference.std() == pytest.approx(6.0, rel=0.1)
    assert abs(difference.mean()) < 0.5
