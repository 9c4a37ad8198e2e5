"""The Unet a config describes, with each layer computed the way that is fast where it runs.

Four config fields choose how layers are computed, never what they compute: `'native'`
is the plain layer, which accelerators compile well; the other name is the variant in
`layers` that XLA:CPU runs faster (its docstring says why); `'auto'` picks the variant
on CPU and the plain layer elsewhere. The choice is made here once and reaches the
network as module factories.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxseg.models import layers
from jaxseg.models.efficientnet import BatchNormActivation, DepthwiseConv, ModuleDef
from jaxseg.models.unet import INPUT_MULTIPLE, Unet, UpsampleConcatConv

# The folded upsampling runs its forward's four phase convolutions as one convolution
# with four times the output channels from this side of the low-resolution map up. The
# one convolution computes (h+1)(w+1) positions for h*w outputs, little waste on a large
# map, and XLA:CPU runs it faster there than four convolutions with few output channels
# each; on smaller maps the four are faster (BENCHMARKS.md).
FOLDED_ONE_CONV_MIN_SIDE = 32

# Per config field: the plain layer first, then the variant 'auto' picks on CPU.
LAYER_VARIANTS: dict[str, dict[str, ModuleDef]] = {
    "depthwise_impl": {"native": DepthwiseConv, "shifted": layers.ShiftedDepthwiseConv},
    "conv_impl": {"native": nn.Conv, "matmul": layers.MatmulPointwiseConv},
    "upsample_impl": {"native": UpsampleConcatConv, "folded": functools.partial(
        layers.FoldedUpsampleConcatConv, one_conv_min_side=FOLDED_ONE_CONV_MIN_SIDE)},
    "batchnorm_impl": {"native": BatchNormActivation, "fused": layers.FusedBatchNorm},
}
IMPL_FIELDS = tuple(LAYER_VARIANTS)
# Unet fields a config may set under the same name; absent ones keep the Unet's default.
_UNET_FIELDS = ("drop_connect_rate", "normalize_input", "remat")


def resolve_impl(field: str, choice: str) -> str:
    """The variant of LAYER_VARIANTS[field] that `choice` ('auto' or a variant) means here."""
    variants = list(LAYER_VARIANTS[field])
    if choice not in ("auto", *variants):
        raise ValueError(f"{field} {choice!r} is not one of {', '.join(['auto', *variants])}")
    if choice == "auto":
        return variants[1] if jax.default_backend() == "cpu" else variants[0]
    return choice


def build_model(config: Mapping[str, Any] | ml_collections.ConfigDict,
                bn_axis_name: str | None = None) -> Unet:
    """The Unet of a training config or of a run's config.json; only `backbone` is
    required, so that the config.json of a run made before a field existed still builds
    the model it trained. `bn_axis_name` synchronises training BatchNorm statistics over
    that device axis (`parallel.AXIS` under `parallel.data_parallel`)."""
    chosen = {field: LAYER_VARIANTS[field][resolve_impl(field, config.get(field, "auto"))]
              for field in IMPL_FIELDS}
    return Unet(backbone=config["backbone"],
                dtype=jnp.bfloat16 if config.get("half_precision", False) else jnp.float32,
                bn_axis_name=bn_axis_name,
                depthwise_conv=chosen["depthwise_impl"], pointwise_conv=chosen["conv_impl"],
                upsample_conv=chosen["upsample_impl"], norm=chosen["batchnorm_impl"],
                **{name: config[name] for name in _UNET_FIELDS if name in config})


def init_variables(model: Unet, seed: int) -> dict:
    """Random initial variables as Keras initialises the recipe's layers, on the host.
    Parameter shapes do not depend on the input size, so a small input keeps this cheap;
    the counter-based 'unsafe_rbg' generator compiles the initialisers faster on CPU than
    the default threefry, and initial weights need no cryptographic-quality bits."""
    init = jax.jit(functools.partial(model.init, train=False))
    return jax.device_get(init(jax.random.key(seed, impl="unsafe_rbg"),
                               jnp.zeros((1, INPUT_MULTIPLE, INPUT_MULTIPLE, 3))))
