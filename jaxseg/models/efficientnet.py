"""EfficientNet-B0..B7 as qubvel/efficientnet (what segmentation_models loads) builds it in
Keras, without its classifier: the Unet's encoder.

Every layer carries the name of the Keras layer it replaces (stem_conv, block2a_dwconv,
block2a_se_reduce, top_bn, ...), so converting Keras weights is a renaming. How the
depthwise and 1x1 convolutions and the BatchNorm layers are computed is the caller's
choice (`depthwise_conv`, `pointwise_conv`, `norm`: module factories, the plain layers
below by default); what they compute is fixed here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# A Flax module class, or a functools.partial of one: how a layer is computed.
ModuleDef = Any

BACKBONES = tuple(f"efficientnetb{i}" for i in range(8))
# (width, depth) coefficients of EfficientNet-B0..B7.
_SCALING = {
    "efficientnetb0": (1.0, 1.0), "efficientnetb1": (1.0, 1.1),
    "efficientnetb2": (1.1, 1.2), "efficientnetb3": (1.2, 1.4),
    "efficientnetb4": (1.4, 1.8), "efficientnetb5": (1.6, 2.2),
    "efficientnetb6": (1.8, 2.6), "efficientnetb7": (2.0, 3.1),
}
# B0 stages: (kernel, repeats, input filters, output filters, expand ratio, stride).
_B0_STAGES = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2),
              (3, 3, 40, 80, 6, 2), (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2),
              (3, 1, 192, 320, 6, 1))
_STEM_FILTERS = 32
_TOP_FILTERS = 1280
_SE_RATIO = 0.25
_DEPTH_DIVISOR = 8
# Keras' BatchNormalization defaults; Flax's epsilon (1e-5) differs.
KERAS_BN_MOMENTUM = 0.99
KERAS_BN_EPSILON = 1e-3
TOP_FEATURE = "top_activation"

# Keras' initialisers, so that training from scratch starts where the recipe's would.
ENCODER_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
# Keras counts a depthwise kernel's fan-out as k*k (its kernel is (k, k, C, 1)).
DEPTHWISE_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal",
                                                  in_axis=-1, out_axis=-2)

ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array]] = {
    "swish": nn.swish, "relu": nn.relu, None: lambda x: x}


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    """One MBConv block of a scaled EfficientNet, named as in Keras ('block2b')."""
    name: str
    kernel_size: int
    stride: int
    input_filters: int
    output_filters: int
    expand_ratio: int
    drop_rate: float

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.input_filters == self.output_filters


def check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"backbone {backbone!r} is not supported; valid: {', '.join(BACKBONES)}")


def round_filters(filters: int, width: float) -> int:
    """Channel count after width scaling, a multiple of 8 never 10% below the exact value."""
    scaled = filters * width
    rounded = max(_DEPTH_DIVISOR, int(scaled + _DEPTH_DIVISOR / 2) // _DEPTH_DIVISOR * _DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += _DEPTH_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def block_args(backbone: str, drop_connect_rate: float = 0.2) -> list[BlockArgs]:
    """The blocks of a scaled EfficientNet in order.

    The drop-connect rate grows linearly with the block index over the scaled block
    count, as in keras.applications (the released qubvel package divides by the B0 count
    instead, which only matters when training from scratch).
    """
    check_backbone(backbone)
    width, depth = _SCALING[backbone]
    stages = [(kernel, round_repeats(repeats, depth), round_filters(filters_in, width),
               round_filters(filters_out, width), expand, stride)
              for kernel, repeats, filters_in, filters_out, expand, stride in _B0_STAGES]
    total = sum(stage[1] for stage in stages)
    blocks = []
    for stage_index, (kernel, repeats, filters_in, filters_out, expand, stride) in enumerate(stages):
        for repeat in range(repeats):
            blocks.append(BlockArgs(
                name=f"block{stage_index + 1}{string.ascii_lowercase[repeat]}",
                kernel_size=kernel,
                stride=stride if repeat == 0 else 1,
                input_filters=filters_in if repeat == 0 else filters_out,
                output_filters=filters_out,
                expand_ratio=expand,
                drop_rate=drop_connect_rate * len(blocks) / total))
    return blocks


class DepthwiseConv(nn.Module):
    """Keras' DepthwiseConv2D (depth multiplier 1, no bias, 'same' padding). The kernel is
    (k, k, 1, C), as Flax's grouped nn.Conv stores it; a variant changes `convolve` only,
    so its variables are these."""
    kernel_size: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", DEPTHWISE_INIT,
                            (self.kernel_size, self.kernel_size, 1, x.shape[-1]), jnp.float32)
        return self.convolve(*nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype))

    @nn.nowrap
    def convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(
            x, kernel, window_strides=(self.stride, self.stride), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


class BatchNormActivation(nn.BatchNorm):
    """Keras' BatchNormalization followed by `activation`, as one layer so that a variant
    can compute both in one pass. The variance takes two passes over the batch:
    E[x^2]-E[x]^2 cancels badly on the large unnormalised activations of a 0..255 input."""
    activation: str | None = None
    momentum: float = KERAS_BN_MOMENTUM
    epsilon: float = KERAS_BN_EPSILON
    use_fast_variance: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        return ACTIVATIONS[self.activation](super().__call__(x, use_running_average))


def _save_products_and_statistics(primitive, *args, **params) -> bool:
    """The rematerialisation policy: keep what convolutions and matrix products compute,
    and the (per-channel) BatchNorm statistics; recompute the elementwise work between."""
    return primitive.name in ("dot_general", "conv_general_dilated", "reduce_sum", "psum",
                              "psum_invariant")


def rematerialized(fn: Callable, enabled: bool) -> Callable:
    """`fn(module, ...)`, recomputing its elementwise work in the backward pass when
    `enabled`: less memory for a little more compute."""
    return nn.remat(fn, policy=_save_products_and_statistics) if enabled else fn


def _squeeze_excite(encoder: EfficientNet, x: jax.Array, reduced: int, prefix: str) -> jax.Array:
    """Per-channel gates from the global mean (sized by the block's input filters)."""
    gates = jnp.mean(x, axis=(1, 2), keepdims=True)
    gates = nn.swish(encoder.conv1x1(reduced, prefix + "se_reduce", use_bias=True)(gates))
    gates = nn.sigmoid(encoder.conv1x1(x.shape[-1], prefix + "se_expand", use_bias=True)(gates))
    return x * gates


def _mbconv(encoder: EfficientNet, x: jax.Array, block: BlockArgs, train: bool,
            use_running_average: bool) -> tuple[jax.Array, jax.Array | None]:
    """One MBConv block; returns its output and its expand activation (None without)."""
    prefix = block.name + "_"
    inputs = x
    expanded = None
    if block.expand_ratio != 1:
        x = encoder.conv1x1(block.input_filters * block.expand_ratio, prefix + "expand_conv")(x)
        x = expanded = encoder.batch_norm(prefix + "expand_bn")(x, use_running_average)
    x = encoder.depthwise_conv(block.kernel_size, block.stride, encoder.dtype,
                               name=prefix + "dwconv")(x)
    x = encoder.batch_norm(prefix + "bn")(x, use_running_average)
    x = _squeeze_excite(encoder, x, max(1, int(block.input_filters * _SE_RATIO)), prefix)
    x = encoder.conv1x1(block.output_filters, prefix + "project_conv")(x)
    x = encoder.batch_norm(prefix + "project_bn", activation=None)(x, use_running_average)
    if block.has_residual:
        if block.drop_rate > 0:
            x = nn.Dropout(block.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train,
                           name=prefix + "drop")(x)
        x = x + inputs
    return x, expanded


class EfficientNet(nn.Module):
    """qubvel/efficientnet's EfficientNet without its classifier. Returns its feature maps
    by Keras layer name: each block's '<block>_expand_activation' and TOP_FEATURE."""
    backbone: str
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    drop_connect_rate: float = 0.2
    remat: bool = True
    pointwise_conv: ModuleDef = nn.Conv
    depthwise_conv: ModuleDef = DepthwiseConv
    norm: ModuleDef = BatchNormActivation

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, freeze_bn: bool = False) -> dict[str, jax.Array]:
        """`freeze_bn` normalises with the running statistics even in training, as Keras
        does for non-trainable BatchNormalization layers; drop-connect still follows `train`."""
        use_running_average = freeze_bn or not train
        width, _ = _SCALING[self.backbone]
        x = nn.Conv(round_filters(_STEM_FILTERS, width), (3, 3), strides=(2, 2), use_bias=False,
                    dtype=self.dtype, kernel_init=ENCODER_INIT, name="stem_conv")(x)
        x = self.batch_norm("stem_bn")(x, use_running_average)
        features = {}
        for block in block_args(self.backbone, self.drop_connect_rate):
            mbconv = rematerialized(functools.partial(
                _mbconv, block=block, train=train, use_running_average=use_running_average),
                self.remat)
            x, expanded = mbconv(self, x)
            if expanded is not None:
                features[block.name + "_expand_activation"] = expanded
        x = self.conv1x1(round_filters(_TOP_FILTERS, width), "top_conv")(x)
        features[TOP_FEATURE] = self.batch_norm("top_bn")(x, use_running_average)
        return features

    @nn.nowrap
    def conv1x1(self, features: int, name: str, use_bias: bool = False) -> nn.Module:
        return self.pointwise_conv(features, (1, 1), use_bias=use_bias, dtype=self.dtype,
                                   kernel_init=ENCODER_INIT, name=name)

    @nn.nowrap
    def batch_norm(self, name: str, activation: str | None = "swish") -> nn.Module:
        return self.norm(activation=activation, axis_name=self.bn_axis_name, dtype=self.dtype,
                         name=name)
