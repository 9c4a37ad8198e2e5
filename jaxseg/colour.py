"""The colour half of training augmentation, applied inside the jitted train step.

Images cross from the host to the device as uint8, a quarter of the bytes of float32:
the host flips and rotates them (`augment.py`, on whole bytes) and draws each example's
colour factors; the device turns them into floats and applies the factors, per-pixel
work that fuses into a few elementwise loops beside the network's convolutions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

PIXEL_MAX = 255.0
# Columns of the per-example factors, in the order the ops apply (the recipe's order).
SATURATION, CONTRAST, BRIGHTNESS = range(3)
NUM_FACTORS = 3
# Below this chroma a pixel is grey: its saturation stays 0 whatever the factor.
_MIN_CHROMA = 1e-6


def jitter(images: jax.Array, factors: jax.Array) -> jax.Array:
    """(N, H, W, 3) pixels on 0..255 (any dtype) with each example's saturation, contrast
    and brightness factors (N, 3) applied in turn, as float32 clipped to 0..255 after
    each op, as the same op on a uint8 image would be. A factor of exactly 1 is an op
    the host did not draw, and leaves the pixels bit for bit."""
    images = images.astype(jnp.float32)
    for column, adjust in ((SATURATION, adjust_saturation), (CONTRAST, adjust_contrast),
                           (BRIGHTNESS, jnp.multiply)):
        factor = factors[:, column, None, None, None].astype(jnp.float32)
        adjusted = jnp.clip(adjust(images, factor), 0.0, PIXEL_MAX)
        images = jnp.where(factor == 1.0, images, adjusted)
    return images


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
