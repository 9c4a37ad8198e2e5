"""Training-time augmentation of (image, mask) tiles: the recipe's ops, with its intent fixed.

The recipe flips, rotates by a multiple of 90 degrees and jitters saturation, contrast and
brightness. Its code drew the rotation with a Python `int()` of a tensor (fails in graph
mode), passed the brightness factor as a delta (a no-op on 0..255 images) and never clipped.
Here every draw is a stateless random op seeded per example, so an epoch's augmentations
are a pure function of (dataset seed, example index) and a resumed run sees the same ones.

The host does the exact geometry (flips, quarter turns) on uint8 pixels and draws the
colour factors and the parameters of a shift-scale-rotate; the train step applies those
on the device (`colour.py`, `warp.py`), so images travel as uint8.

Beyond the recipe, a stain jitter (HED) and a hue shift make a model trained on a few
slides less sensitive to another lab's stain; both are off unless their probability is
set, and their draws leave the recipe's draws for a seed as they were. So are a
shift-scale-rotate (albumentations' ShiftScaleRotate), a blur and noise, the
augmentations top HuBMAP solutions added.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import ml_collections
import numpy as np

from jaxseg import cli, colour, warp
from jaxseg.tensorflow_quiet import tf

AugmentFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor],
                     tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]]

# Named rather than auto-selected, so that draws do not change when the ops run under XLA.
_RNG = "philox"
# float32 represents every multiple of 2**-24 in [0, 1) exactly.
_UNIFORM_STEPS = 2**24
_PROBABILITY_FIELDS = ("flip_left_right_prob", "flip_up_down_prob", "saturation_prob",
                       "contrast_prob", "brightness_prob", "hed_prob", "hue_prob",
                       "shift_scale_rotate_prob", "blur_prob", "noise_prob")
_RANGE_FIELDS = ("saturation_range", "contrast_range", "brightness_range")
# Beyond these a scale could turn a concentration negative, or the hue range cover the
# colour circle more than once.
# A scale limit of 1 could shrink an image to nothing; a shift beyond 1 moves it out of
# the frame; 180 degrees either way covers every angle.
_STRENGTH_LIMITS = {"hed_scale": 1.0, "hed_shift": math.inf, "hue_max_delta": 0.5,
                    "shift_limit": 1.0, "scale_limit": 0.99, "rotate_limit": 180.0,
                    "blur_max_sigma": colour.MAX_BLUR_SIGMA, "noise_max_std": 255.0}


def default_augment_config() -> ml_collections.ConfigDict:
    """The recipe's probabilities: it applied an op when uniform() > threshold."""
    return ml_collections.ConfigDict({
        "enabled": True,
        "flip_left_right_prob": 0.5,
        "flip_up_down_prob": 0.6,
        "rot90": True,
        "saturation_range": (0.6, 1.4),
        "saturation_prob": 0.55,
        "contrast_range": (0.7, 1.3),
        "contrast_prob": 0.55,
        "brightness_range": (0.7, 1.3),
        "brightness_prob": 0.55,
        # Not the recipe's: each example's haematoxylin, eosin and DAB concentrations
        # times uniform(1 - hed_scale, 1 + hed_scale) plus uniform(-hed_shift, hed_shift)
        # (optical density units), each stain drawn on its own.
        "hed_prob": 0.0,
        "hed_scale": 0.05,
        "hed_shift": 0.05,
        # Not the recipe's: tf.image.adjust_hue's delta (turns of the colour circle)
        # uniform in (-hue_max_delta, hue_max_delta).
        "hue_prob": 0.0,
        "hue_max_delta": 0.05,
        # Not the recipe's: albumentations' ShiftScaleRotate, with its default limits: an
        # angle uniform in (-rotate_limit, rotate_limit) degrees, a scale in
        # (1 - scale_limit, 1 + scale_limit), shifts in (-shift_limit, shift_limit) of
        # the width and height.
        "shift_scale_rotate_prob": 0.0,
        "shift_limit": 0.0625,
        "scale_limit": 0.1,
        "rotate_limit": 45.0,
        # Not the recipe's: a Gaussian blur of standard deviation uniform in
        # (0, blur_max_sigma) pixels, and Gaussian noise of standard deviation uniform in
        # (0, noise_max_std) on 0..255 (albumentations' GaussNoise default reaches 7).
        "blur_prob": 0.0,
        "blur_max_sigma": 1.0,
        "noise_prob": 0.0,
        "noise_max_std": 7.0,
        # TensorFlow's XLA aborts the process on an XLA_FLAGS entry it does not know (one
        # newer than its XLA version, meant for JAX): turn this off if that happens.
        "xla_compile": True,
    })


def check_augment_config(config: ml_collections.ConfigDict) -> None:
    """Rejects values that would silently disable or distort an op."""
    for field in _PROBABILITY_FIELDS:
        if not 0.0 <= config[field] <= 1.0:
            raise cli.InputError(f"augment.{field} must be in [0, 1], got {config[field]}")
    for field in _RANGE_FIELDS:
        bounds = tuple(config[field])
        if len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1]:
            raise cli.InputError(f"augment.{field} must be (low, high) with 0 <= low <= high, "
                                 f"got {config[field]}")
    for field, high in _STRENGTH_LIMITS.items():
        if not 0.0 <= config[field] <= high:
            raise cli.InputError(f"augment.{field} must be in [0, {high}], got {config[field]}")


def augment(image: tf.Tensor, mask: tf.Tensor, config: ml_collections.ConfigDict,
            seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Flips and rotates one uint8 (D, D, 3) image and its (D, D, 1) mask together, and
    draws what the device applies to them.

    `seed` is a shape-[2] int32 tensor (the stateless-op convention; XLA takes only
    int32). Returns the image and mask in their dtypes, the float32 factors of
    `colour.jitter` and the float32 parameters of `warp.shift_scale_rotate` (their
    columns), the op's IDENTITY for an op not drawn.
    """
    check_augment_config(config)
    if not config.enabled:
        return (image, mask, tf.constant(colour.IDENTITY, tf.float32),
                tf.constant(warp.IDENTITY, tf.float32))
    flip_lr_seed, flip_ud_seed, rot_seed, sat_seed, con_seed, bri_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=6, alg=_RNG))

    image, mask = _maybe(_coin(flip_lr_seed, config.flip_left_right_prob),
                         lambda: (tf.reverse(image, [1]), tf.reverse(mask, [1])),
                         (image, mask))
    image, mask = _maybe(_coin(flip_ud_seed, config.flip_up_down_prob),
                         lambda: (tf.reverse(image, [0]), tf.reverse(mask, [0])),
                         (image, mask))
    if config.rot90:
        quarter_turns = tf.random.stateless_uniform([], rot_seed, minval=0, maxval=4,
                                                    dtype=tf.int32, alg=_RNG)
        image, mask = _maybe(quarter_turns > 0,
                             lambda: (tf.image.rot90(image, quarter_turns),
                                      tf.image.rot90(mask, quarter_turns)),
                             (image, mask))
    factors = tf.stack([
        _draw(sat_seed, config.saturation_prob, config.saturation_range),
        _draw(con_seed, config.contrast_prob, config.contrast_range),
        _draw(bri_seed, config.brightness_prob, config.brightness_range)])
    colour_factors = tf.concat([factors, _stain_factors(seed, config),
                                _scanner_factors(seed, config)], axis=0)
    return image, mask, colour_factors, _warp_params(seed, config)


def augment_fn(config: ml_collections.ConfigDict) -> AugmentFn:
    """`augment` for one config as an (image, mask, seed) function, for tf.data's map.

    With `config.xla_compile`, XLA compiles the flips and draws into one program; the
    draws, and so the results, are the same either way.
    """
    check_augment_config(config)
    return tf.function(lambda image, mask, seed: augment(image, mask, config, seed),
                       jit_compile=config.xla_compile)


def _stain_factors(seed: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
    """The hue delta, then the HED scales and shifts, from a seed folded off the
    example's so that the recipe's ops draw what they drew before these existed."""
    hue_seed, hed_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, 1, alg=_RNG), num=2, alg=_RNG))
    delta, scale, shift = config.hue_max_delta, config.hed_scale, config.hed_shift
    hue = _draw(hue_seed, config.hue_prob, (-delta, delta),
                identity=colour.IDENTITY[colour.HUE])
    hed = _draw(hed_seed, config.hed_prob,
                ([1 - scale] * 3 + [-shift] * 3, [1 + scale] * 3 + [shift] * 3),
                identity=colour.IDENTITY[colour.HED])
    return tf.concat([hue[None], hed], axis=0)


def _scanner_factors(seed: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
    """The blur's deviation, then the noise's deviation and seed, from a seed folded off
    the example's so that the other ops draw what they drew before these existed."""
    blur_seed, noise_seed, noise_draws_seed = tf.unstack(
        tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, 3, alg=_RNG), num=3, alg=_RNG))
    blur = _draw(blur_seed, config.blur_prob, (0.0, config.blur_max_sigma),
                 identity=colour.IDENTITY[colour.BLUR_SIGMA])
    noise_std = _draw(noise_seed, config.noise_prob, (0.0, config.noise_max_std),
                      identity=colour.IDENTITY[colour.NOISE_STD])
    draws = tf.cast(tf.random.stateless_uniform([], noise_draws_seed, minval=0,
                                                maxval=colour.NOISE_SEEDS, dtype=tf.int32,
                                                alg=_RNG), tf.float32)
    noise_draws = tf.where(noise_std != colour.IDENTITY[colour.NOISE_STD], draws,
                           colour.IDENTITY[colour.NOISE_SEED])
    return tf.stack([blur, noise_std, noise_draws])


def _warp_params(seed: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
    """Angle, scale and shifts (`warp` columns), from a seed folded off the example's
    so that the other ops draw what they drew before this one existed."""
    rotate, scale, shift = config.rotate_limit, config.scale_limit, config.shift_limit
    return _draw(tf.random.experimental.stateless_fold_in(seed, 2, alg=_RNG),
                 config.shift_scale_rotate_prob,
                 ([-rotate, 1 - scale, -shift, -shift], [rotate, 1 + scale, shift, shift]),
                 identity=warp.IDENTITY)


def _uniform(seed: tf.Tensor, low: Any = 0.0, high: Any = 1.0) -> tf.Tensor:
    """Floats uniform in [low, high) built from integer draws, one per element of the
    bounds (a scalar for scalar bounds).

    TensorFlow's float draws differ between its own kernels and XLA for the same seed;
    integer draws agree, so augmentations do not depend on how the graph is compiled.
    """
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    bits = tf.random.stateless_uniform(low.shape, seed, minval=0, maxval=_UNIFORM_STEPS,
                                       dtype=tf.int32, alg=_RNG)
    # The bounds' difference is taken before rounding to float32, as for Python floats.
    return (tf.constant(low, tf.float32)
            + tf.constant(high - low, tf.float32) * (tf.cast(bits, tf.float32) / _UNIFORM_STEPS))


def _coin(seed: tf.Tensor, probability: float) -> tf.Tensor:
    return _uniform(seed) < probability


def _maybe(condition: tf.Tensor, transform: Callable[[], Any], identity: Any) -> Any:
    """tf.cond, so that a skipped op costs no pass over the pixels."""
    return tf.cond(condition, transform, lambda: identity)


def _draw(seed: tf.Tensor, probability: float, factor_range: tuple[Any, Any],
          identity: Any = 1.0) -> tf.Tensor:
    """Factors uniform in the range (scalar bounds, or one pair per factor) with the
    op's probability, else the op's identity (no op)."""
    coin_seed, factor_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2, alg=_RNG))
    low, high = factor_range
    return tf.where(_coin(coin_seed, probability), _uniform(factor_seed, low, high),
                    tf.constant(identity, tf.float32))
