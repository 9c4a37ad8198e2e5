"""Variables for tests of the Unet: random but well scaled ones, and their count as Keras
reports it."""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.models import INPUT_MULTIPLE


def count_weights(variables: dict) -> int:
    """Parameters plus BatchNorm statistics: the number Keras' count_params() reports."""
    return sum(int(np.prod(leaf.shape)) for collection in ("params", "batch_stats")
               for leaf in jax.tree.leaves(variables.get(collection, {})))


def random_variables(model: nn.Module, seed: int, random_affine: bool = False) -> dict:
    """He-scaled random kernels, drawn in numpy: compiling `model.init` costs far more on
    CPU (its random generators dominate), and tests need only plausible scales. BatchNorm
    statistics stay at mean 0, variance 1; its scale and offset (and biases) stay at 1
    and 0 unless `random_affine`, for tests in which every parameter must matter."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, INPUT_MULTIPLE, INPUT_MULTIPLE, 3)))

    def fill(path, leaf) -> np.ndarray:
        name = path[-1].key
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            return rng.normal(0, math.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
        if name == "var" or (name == "scale" and not random_affine):
            return np.ones(leaf.shape, np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if name == "mean" or not random_affine:
            return np.zeros(leaf.shape, np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)
