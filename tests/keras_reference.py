"""The recipe's Keras models with random but well-scaled weights: the outside truth the
Flax port and the weight conversion are checked against. Imports TensorFlow."""
from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("SM_FRAMEWORK", "tf.keras")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
import segmentation_models as sm  # noqa: E402
import efficientnet.tfkeras as qubvel_efficientnet  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _variant(backbone: str) -> str:
    return backbone.replace("efficientnetb", "EfficientNetB")


def unet(backbone: str, seed: int) -> tf_keras.Model:
    """The recipe's model (without ImageNet weights, which cannot be downloaded here)."""
    tf_keras.utils.set_random_seed(seed)
    return sm.Unet(backbone, encoder_weights=None, input_shape=(None, None, 3))


def qubvel_encoder(backbone: str, seed: int) -> tf_keras.Model:
    """What qubvel's ImageNet 'notop' files were saved from."""
    tf_keras.utils.set_random_seed(seed)
    return getattr(qubvel_efficientnet, _variant(backbone))(
        include_top=False, weights=None, input_shape=(None, None, 3))


def applications_encoder(backbone: str, seed: int) -> tf_keras.Model:
    """keras.applications' EfficientNet (its own ImageNet files), normalising its 0..255
    input inside the model with ImageNet mean and standard deviation."""
    tf_keras.utils.set_random_seed(seed)
    model = getattr(tf_keras.applications, _variant(backbone))(
        include_top=False, weights=None, input_shape=(None, None, 3))
    normalization = model.get_layer("normalization")
    count = normalization.get_weights()[2]
    normalization.set_weights([IMAGENET_MEAN, IMAGENET_STD ** 2, count])
    return model


def randomize(model: tf_keras.Model, images: np.ndarray, seed: int) -> None:
    """Random biases and BatchNorm affine weights, and BatchNorm moving statistics fitted
    to `images`, so that inference activations on these images stay well scaled through
    the whole network: random moving statistics would saturate the output and hide
    errors, and so would statistics of other images, as deviations compound with depth.

    The moving mean is the batch mean (with the model's drop-connect off); the moving
    variance is the batch variance plus a tenth of its median over channels. Without that
    floor, nearly constant channels get gains in the hundreds and a random network
    amplifies float32 rounding (Keras against Keras on another machine) to ~1e-4 at the
    output; with it, Keras and a faithful port agree to ~1e-5.
    """
    rng = np.random.default_rng(seed)
    norms = [layer for layer in model.layers
             if isinstance(layer, tf_keras.layers.BatchNormalization)]
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                               mean, var])
        elif isinstance(layer, tf_keras.layers.Conv2D) and layer.use_bias:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
    dropouts = [layer for layer in model.layers if isinstance(layer, tf_keras.layers.Dropout)]
    rates = [layer.rate for layer in dropouts]
    for layer in dropouts:
        layer.rate = 0.0
    norm_inputs = tf_keras.Model(model.input, [layer.input for layer in norms])(
        tf.constant(images), training=True)
    for layer, rate in zip(dropouts, rates):
        layer.rate = rate
    for layer, x in zip(norms, norm_inputs):
        gamma, beta, _, _ = layer.get_weights()
        var = np.var(x, axis=(0, 1, 2))
        layer.set_weights([gamma, beta, np.mean(x, axis=(0, 1, 2)), var + 0.1 * np.median(var)])


def outputs(model: tf_keras.Model, layer_names: list[str], images: np.ndarray) -> list[np.ndarray]:
    """Inference-mode outputs of the named layers."""
    probe = tf_keras.Model(model.input, [model.get_layer(name).output for name in layer_names])
    results = probe(tf.constant(images), training=False)
    return [np.asarray(y) for y in (results if isinstance(results, list) else [results])]


def random_images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)
