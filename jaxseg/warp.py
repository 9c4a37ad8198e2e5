"""Shift, scale and rotate (albumentations' ShiftScaleRotate), inside the jitted train step.

The flips and quarter turns of the recipe move whole bytes and stay on the host
(`augment.py`). A rotation by any angle, a zoom and a sub-pixel shift interpolate, so
they run where the pixels are already float32, beside the network, from four
parameters per example that the host draws. Several of the top HuBMAP solutions trained
with this op: glomeruli appear at every angle and at slightly different sizes between
scanners, which flips and quarter turns alone do not show a model with a few slides.

Borders are mirrored without repeating the edge pixel (OpenCV's BORDER_REFLECT_101, the
albumentations default), so no black corners teach the model that corners are empty.
The mask is sampled at the nearest pixel so it stays 0/1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

# Columns of an example's parameters, and their value for an op the host did not draw.
ANGLE, SCALE, SHIFT_X, SHIFT_Y = range(4)
IDENTITY = (0.0, 1.0, 0.0, 0.0)
NUM_PARAMS = len(IDENTITY)


def source_coordinates(height: int, width: int, params: jax.Array) -> jax.Array:
    """(2, H, W) row and column in the input that each output pixel samples.

    `params` holds the angle (degrees, counter-clockwise as the image is viewed), the
    scale, and the shifts (fractions of the width and height, right and down). The
    output is the input turned and scaled about the image centre, then shifted: the
    inverse of that map sends each output pixel back to its source.
    """
    angle = jnp.deg2rad(params[ANGLE])
    scale = params[SCALE]
    centre_y, centre_x = (height - 1) / 2.0, (width - 1) / 2.0
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                              jnp.arange(width, dtype=jnp.float32), indexing="ij")
    y = rows - centre_y - params[SHIFT_Y] * height
    x = cols - centre_x - params[SHIFT_X] * width
    # Rows grow downwards, so a counter-clockwise turn on screen is clockwise in (x, y).
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    return jnp.stack([centre_y + cos * y + sin * x, centre_x - sin * y + cos * x])


def shift_scale_rotate(images: jax.Array, masks: jax.Array,
                       params: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(N, H, W, C) float images (bilinear) and (N, H, W, 1) masks (nearest) warped by
    each example's (N, NUM_PARAMS) parameters. Examples whose parameters are IDENTITY
    come back bit for bit, and a batch that drew none costs no pass over the pixels."""
    drawn = jnp.any(params != jnp.asarray(IDENTITY, params.dtype), axis=-1)

    def warp_batch(images: jax.Array, masks: jax.Array) -> tuple[jax.Array, jax.Array]:
        warped_images, warped_masks = jax.vmap(_warp_one)(images, masks, params)
        keep = drawn[:, None, None, None]
        return jnp.where(keep, warped_images, images), jnp.where(keep, warped_masks, masks)

    return jax.lax.cond(jnp.any(drawn), warp_batch, lambda i, m: (i, m), images, masks)


def _warp_one(image: jax.Array, mask: jax.Array,
              params: jax.Array) -> tuple[jax.Array, jax.Array]:
    coordinates = source_coordinates(image.shape[0], image.shape[1], params)

    def sample(channel: jax.Array, order: int) -> jax.Array:
        return ndimage.map_coordinates(channel, list(coordinates), order=order, mode="mirror")

    image = jax.vmap(lambda c: sample(c, 1), in_axes=-1, out_axes=-1)(image)
    mask = jax.vmap(lambda c: sample(c, 0), in_axes=-1, out_axes=-1)(mask)
    return image, mask
