"""Losses and metrics, as segmentation_models and the recipe define them, and the Lovasz
hinge (Berman et al. 2018) that the top HuBMAP solutions trained with.

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
LOSSES = ("dice", "bce_dice", "lovasz", "bce_lovasz")

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


def lovasz_hinge(logits: jax.Array, masks: jax.Array, weights: jax.Array,
                 reduce: Reduce = _no_reduce) -> jax.Array:
    """Binary Lovasz hinge (Berman et al. 2018, `lovasz_hinge(per_image=True)`), mean over
    the real images of the global batch.

    A convex surrogate of each image's Jaccard loss, the one the top HuBMAP solutions
    fine-tuned with, so training optimises an overlap score rather than pixel counts.
    Each image needs only its own sort, so a device never needs another's pixels and
    the image losses sum over devices like every other statistic here.
    """
    labels = masks.reshape(masks.shape[0], -1)
    errors = 1.0 - logits.reshape(logits.shape[0], -1) * (2.0 * labels - 1.0)
    negated_sorted, labels_sorted = jax.lax.sort((-errors, labels), dimension=1, num_keys=1)
    truth = jnp.sum(labels_sorted, axis=1, keepdims=True)
    intersection = truth - jnp.cumsum(labels_sorted, axis=1)
    union = truth + jnp.cumsum(1.0 - labels_sorted, axis=1)  # >= 1: no division by zero
    jaccard = 1.0 - intersection / union
    jaccard_gradient = jnp.concatenate([jaccard[:, :1], jnp.diff(jaccard, axis=1)], axis=1)
    image_losses = jnp.sum(jax.nn.relu(-negated_sorted) * jaccard_gradient, axis=1)
    return reduce(jnp.sum(image_losses * weights)) / jnp.maximum(reduce(jnp.sum(weights)), 1.0)


def loss_from_logits(name: str, logits: jax.Array, masks: jax.Array, weights: jax.Array,
                     reduce: Reduce = _no_reduce) -> jax.Array:
    """The configured training loss; 'bce_dice' is the sum, as sm.losses' `bce_dice_loss`,
    and 'bce_lovasz' likewise."""
    if name == "dice":
        return soft_dice_loss(jax.nn.sigmoid(logits), masks, weights, reduce)
    if name == "bce_dice":
        return (soft_dice_loss(jax.nn.sigmoid(logits), masks, weights, reduce)
                + binary_crossentropy(logits, masks, weights, reduce))
    if name == "lovasz":
        return lovasz_hinge(logits, masks, weights, reduce)
    if name == "bce_lovasz":
        return (lovasz_hinge(logits, masks, weights, reduce)
                + binary_crossentropy(logits, masks, weights, reduce))
    raise ValueError(f"config.loss: unknown loss {name!r}, expected one of {', '.join(LOSSES)}")


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
