"""The colour half of training augmentation, applied inside the jitted train step.

Images cross from the host to the device as uint8, a quarter of the bytes of float32:
the host flips and rotates them (`augment.py`, on whole bytes) and draws each example's
colour factors; the device turns them into floats and applies the factors, per-pixel
work that fuses into a few elementwise loops beside the network's convolutions.

Besides the recipe's saturation, contrast and brightness, ops model slides stained or
scanned elsewhere: a jitter of the haematoxylin, eosin and DAB concentrations (Ruifrok &
Johnston's colour deconvolution, as in Tellez et al. 2018), a hue shift, and a blur and
noise (a scanner's focus and sensor).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

PIXEL_MAX = 255.0
# Columns of the per-example factors: the recipe's three first, then the stain ops, then
# the scanner's: a blur and noise (its standard deviation, and the seed of its draws).
SATURATION, CONTRAST, BRIGHTNESS, HUE = range(4)
HED_SCALE, HED_SHIFT = slice(4, 7), slice(7, 10)
HED = slice(HED_SCALE.start, HED_SHIFT.stop)
BLUR_SIGMA, NOISE_STD, NOISE_SEED = range(10, 13)
NOISE = slice(NOISE_STD, NOISE_SEED + 1)
# Each column's value for an op the host did not draw (the op's identity).
IDENTITY = (1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
NUM_FACTORS = len(IDENTITY)
# The blur's taps either side of a pixel: 2.7 standard deviations of the widest blur.
MAX_BLUR_SIGMA = 1.5
BLUR_RADIUS = 4
# Noise seeds are whole numbers below this, exact in a float32 column.
NOISE_SEEDS = 2**24
# Below this chroma a pixel is grey: its saturation stays 0 whatever the factor.
_MIN_CHROMA = 1e-6
# Optical density of one unit of haematoxylin, eosin and DAB (rows) in R, G, B: the
# vectors scikit-image's rgb2hed uses.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)
_RGB_FROM_HED = _RGB_FROM_HED.astype(np.float32)


def jitter(images: jax.Array, factors: jax.Array) -> jax.Array:
    """(N, H, W, 3) pixels on 0..255 (any dtype) with each example's factors (N,
    NUM_FACTORS) applied: stain (HED), hue, saturation, contrast, brightness, blur and
    noise in turn, as float32 clipped to 0..255 after each op. Stain comes first because
    a slide is stained before it is scanned, blur and noise last because the scanner
    adds them. Factors equal to IDENTITY are an op the host did not draw, and leave the
    pixels bit for bit."""
    images = images.astype(jnp.float32)
    factors = factors.astype(jnp.float32)[:, None, None, :]
    ops = ((HED, adjust_hed),
           (slice(HUE, HUE + 1), adjust_hue),
           (slice(SATURATION, SATURATION + 1), adjust_saturation),
           (slice(CONTRAST, CONTRAST + 1), adjust_contrast),
           (slice(BRIGHTNESS, BRIGHTNESS + 1), jnp.multiply),
           (slice(BLUR_SIGMA, BLUR_SIGMA + 1), gaussian_blur),
           (NOISE, add_noise))
    for columns, adjust in ops:
        params = factors[..., columns]
        drawn = jnp.any(params != jnp.asarray(IDENTITY[columns], jnp.float32), axis=-1,
                        keepdims=True)
        images = jax.lax.cond(jnp.any(drawn),
                              functools.partial(_adjust_drawn, params=params, drawn=drawn,
                                                adjust=adjust),
                              lambda images: images, images)
    return images


def _adjust_drawn(images: jax.Array, *, params: jax.Array, drawn: jax.Array,
                  adjust: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """The op on the examples that drew it; behind a `cond`, so that an op no example of
    the batch drew (every op whose probability is 0) costs no pass over the pixels."""
    return jnp.where(drawn, jnp.clip(adjust(images, params), 0.0, PIXEL_MAX), images)


def adjust_saturation(images: jax.Array, factor: jax.Array) -> jax.Array:
    """`tf.image.adjust_saturation` (HSV saturation times factor, clipped to 1) without HSV.

    Scaling S keeps hue and value, so each channel moves away from the pixel's maximum
    V in proportion: c' = V - r (V - c) with r = S'/S = min(factor, V / (V - min)).
    """
    value = jnp.max(images, axis=-1, keepdims=True)
    chroma = value - jnp.min(images, axis=-1, keepdims=True)
    ratio = jnp.minimum(factor, value / jnp.maximum(chroma, _MIN_CHROMA))
    return value - ratio * (value - images)


def adjust_contrast(images: jax.Array, factor: jax.Array) -> jax.Array:
    """`tf.image.adjust_contrast`: each channel's distance from its image mean, scaled."""
    mean = jnp.mean(images, axis=(1, 2), keepdims=True)
    return (images - mean) * factor + mean


def adjust_hue(images: jax.Array, delta: jax.Array) -> jax.Array:
    """`tf.image.adjust_hue`: HSV hue plus `delta` turns of the colour circle, with
    saturation and value kept.

    Value V and chroma C are those of the input; the output channel n (5, 3, 1 for R,
    G, B) is V - C clip(min(k, 4 - k), 0, 1) with k = (n + 6 hue) mod 6, the HSV to
    RGB map without its case split.
    """
    red, green, blue = images[..., 0], images[..., 1], images[..., 2]
    value = jnp.max(images, axis=-1)
    chroma = value - jnp.min(images, axis=-1)
    safe = jnp.maximum(chroma, _MIN_CHROMA)
    # Hue in sixths of a turn, with tf's tie order (red, then green, then blue).
    sixths = jnp.where(value == red, (green - blue) / safe,
                       jnp.where(value == green, (blue - red) / safe + 2,
                                 (red - green) / safe + 4))
    sixths = jnp.mod(sixths + 6 * delta[..., 0], 6.0)
    k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + sixths[..., None], 6.0)
    return value[..., None] - chroma[..., None] * jnp.clip(jnp.minimum(k, 4 - k), 0, 1)


def adjust_hed(images: jax.Array, params: jax.Array) -> jax.Array:
    """Each stain's concentration c scaled and shifted, c' = scale c + shift, with
    params (..., 6) holding the three scales then the three shifts (optical density
    units): more or less of each dye, as slides stained in another lab show."""
    return hed_to_rgb(rgb_to_hed(images) * params[..., :3] + params[..., 3:])


def gaussian_blur(images: jax.Array, sigma: jax.Array) -> jax.Array:
    """Each example blurred by a Gaussian of its own standard deviation `sigma` (..., 1)
    in pixels (at most MAX_BLUR_SIGMA), BLUR_RADIUS taps either side, borders mirrored
    without repeating the edge (as `warp`): a scanner slightly out of focus."""
    offsets = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * jnp.square(offsets / jnp.maximum(sigma, 1e-3)))
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    for axis in (1, 2):
        padding = [(0, 0)] * images.ndim
        padding[axis] = (BLUR_RADIUS, BLUR_RADIUS)
        padded = jnp.pad(images, padding, mode="reflect")
        length = images.shape[axis]
        images = sum(weights[..., tap, None] * jax.lax.slice_in_dim(padded, tap, tap + length,
                                                                    axis=axis)
                     for tap in range(2 * BLUR_RADIUS + 1))
    return images


def add_noise(images: jax.Array, params: jax.Array) -> jax.Array:
    """Gaussian noise of each example's standard deviation (0..255 units), independent
    per pixel and channel, drawn from the example's own seed (params (..., 2): the
    deviation, then the seed) so that an example's noise does not depend on which
    device or host trains on it."""
    seeds = params[:, 0, 0, 1].astype(jnp.uint32)
    noise = jax.vmap(lambda seed: jax.random.normal(jax.random.PRNGKey(seed),
                                                    images.shape[1:]))(seeds)
    return images + params[..., :1] * noise


def rgb_to_hed(images: jax.Array) -> jax.Array:
    """Haematoxylin, eosin and DAB concentrations of 0..255 pixels, in optical density
    units (natural log), not clipped at 0 so that `hed_to_rgb` inverts it. Pixels
    below 1 count as 1, where the optical density would be infinite."""
    density = -jnp.log(jnp.maximum(images, 1.0) / PIXEL_MAX)
    return _mix(density, _HED_FROM_RGB)


def hed_to_rgb(hed: jax.Array) -> jax.Array:
    """0..255 pixels (unclipped) of the given stain concentrations."""
    return PIXEL_MAX * jnp.exp(-_mix(hed, _RGB_FROM_HED))


def _mix(vectors: jax.Array, matrix: np.ndarray) -> jax.Array:
    """(..., 3) @ (3, 3) as multiply-adds, so that it fuses with the elementwise work
    around it and keeps float32 where a TPU matmul would round its inputs to bfloat16."""
    return sum(vectors[..., i, None] * matrix[i] for i in range(3))
