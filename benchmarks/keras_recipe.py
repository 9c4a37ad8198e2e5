"""The Keras recipe's model as the recipe compiles it, for the benchmarks that run it beside
jaxseg (train_speed.py for speed, quality.py for Dice). Imports TensorFlow."""
from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("SM_FRAMEWORK", "tf.keras")

import segmentation_models as sm  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402


def dice_coe(target: tf.Tensor, output: tf.Tensor, smooth: float = 1e-10) -> tf.Tensor:
    """The recipe's metric (tensorlayer's hard Dice over the whole batch)."""
    output = tf.cast(output > 0.5, tf.float32)
    target = tf.cast(target > 0.5, tf.float32)
    inse = tf.reduce_sum(output * target)
    return (2.0 * inse + smooth) / (tf.reduce_sum(output) + tf.reduce_sum(target) + smooth)


def compiled_unet(backbone: str, seed: int, learning_rate: float,
                  loss: str = "dice") -> tf_keras.Model:
    """`sm.Unet` with random weights (ImageNet files cannot be downloaded here), Adam, the
    recipe's loss and metrics."""
    tf_keras.utils.set_random_seed(seed)
    model = sm.Unet(backbone, encoder_weights=None, input_shape=(None, None, 3))
    losses = {"dice": sm.losses.DiceLoss(), "bce_dice": sm.losses.bce_dice_loss}
    model.compile(optimizer=tf_keras.optimizers.Adam(learning_rate=learning_rate),
                  loss=losses[loss], metrics=[dice_coe, "accuracy"])
    return model
