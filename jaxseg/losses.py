"""Loss and metrics, as segmentation_models and the recipe define them.

Every quantity is built from per-device sums that the caller reduces over the device
axis before the final ratio, so an 8-device step computes exactly the global-batch
value that the Keras recipe computes on one replica (a mean of per-device Dice ratios
would not be the same number).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

DICE_LOSS_SMOOTH = 1e-5   # sm.losses.DiceLoss default
DICE_COE_SMOOTH = 1e-10   # the recipe's dice_coe (tensorlayer)
THRESHOLD = 0.5

Reduce = Callable[[jax.Array], jax.Array]


def _no_reduce(x: jax.Array) -> jax.Array:
    return x


def soft_dice_loss(probs: jax.Array, masks: jax.Array, weights: jax.Array,
                   reduce: Reduce = _no_reduce) -> jax.Array:
    """`sm.losses.DiceLoss(beta=1)`: one Dice over (batch, H, W) per channel, mean of channels.

    `weights` (B,) zeroes padded examples; `reduce` sums over devices.
    """
    w = weights[:, None, None, None]
    tp = reduce(jnp.sum(masks * probs * w, axis=(0, 1, 2)))
    sum_pred = reduce(jnp.sum(probs * w, axis=(0, 1, 2)))
    sum_true = reduce(jnp.sum(masks * w, axis=(0, 1, 2)))
    fp = sum_pred - tp
    fn = sum_true - tp
    score = (2 * tp + DICE_LOSS_SMOOTH) / (2 * tp + fn + fp + DICE_LOSS_SMOOTH)
    return 1.0 - jnp.mean(score)


def binary_crossentropy(logits: jax.Array, masks: jax.Array, weights: jax.Array,
                        reduce: Reduce = _no_reduce) -> jax.Array:
    """Mean pixel BCE over the real examples of the global batch, from logits for stability."""
    per_pixel = jnp.maximum(logits, 0) - logits * masks + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    w = weights[:, None, None, None]
    total = reduce(jnp.sum(per_pixel * w))
    count = reduce(jnp.sum(w * jnp.ones_like(per_pixel)))
    return total / jnp.maximum(count, 1.0)


def loss_from_logits(name: str, logits: jax.Array, masks: jax.Array, weights: jax.Array,
                     reduce: Reduce = _no_reduce) -> jax.Array:
    """The configured training loss; 'bce_dice' is the sum, as sm.losses' `bce_dice_loss`."""
    probs = jax.nn.sigmoid(logits)
    if name == "dice":
        return soft_dice_loss(probs, masks, weights, reduce)
    if name == "bce_dice":
        return (soft_dice_loss(probs, masks, weights, reduce)
                + binary_crossentropy(logits, masks, weights, reduce))
    raise ValueError(f"config.loss: unknown loss {name!r}, expected 'dice' or 'bce_dice'")


def thresholded_metrics(probs: jax.Array, masks: jax.Array, weights: jax.Array,
                        reduce: Reduce = _no_reduce) -> dict[str, jax.Array]:
    """The recipe's `dice_coe` and Keras' binary accuracy, plus per-image Dice sums.

    `dice_coe` is one hard Dice over the whole batch (the recipe's metric, what Keras
    logs); `per_image_dice_sum` adds the competition's Dice of each real image (1 when
    prediction and truth are both empty), to be divided by `num_images` over an epoch.
    """
    pred = (probs > THRESHOLD).astype(jnp.float32)
    true = (masks > THRESHOLD).astype(jnp.float32)
    w = weights[:, None, None, None]
    inter_img = jnp.sum(pred * true, axis=(1, 2, 3))
    pred_img = jnp.sum(pred, axis=(1, 2, 3))
    true_img = jnp.sum(true, axis=(1, 2, 3))
    inter = reduce(jnp.sum(inter_img * weights))
    denom = reduce(jnp.sum((pred_img + true_img) * weights))
    union = pred_img + true_img
    image_dice = jnp.where(union > 0, 2 * inter_img / jnp.maximum(union, 1.0), 1.0)
    pixels_per_image = pred.shape[1] * pred.shape[2] * pred.shape[3]
    num_images = reduce(jnp.sum(weights))
    correct = reduce(jnp.sum((pred == true) * w))
    return {
        "dice_coe": (2 * inter + DICE_COE_SMOOTH) / (denom + DICE_COE_SMOOTH),
        "accuracy": correct / jnp.maximum(num_images * pixels_per_image, 1.0),
        "per_image_dice_sum": reduce(jnp.sum(image_dice * weights)),
        "num_images": num_images,
    }
