"""The recipe's network: segmentation_models' Unet on a qubvel/efficientnet encoder, in Flax.

Every layer carries the name of the Keras layer it replaces (stem_conv, block2a_dwconv,
decoder_stage0a_bn, final_conv, ...), so converting Keras weights is a renaming. The Unet's
variables have two top-level keys, 'encoder' (which training can freeze by name) and
'decoder' (which `convert` can initialise alone when a file holds only an encoder).
"""
from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from jax import lax

BACKBONES = tuple(f"efficientnetb{i}" for i in range(8))
DEPTHWISE_IMPLS = ("auto", "native", "shifted")
SKIP_FEATURES = ("block6a_expand_activation", "block4a_expand_activation",
                 "block3a_expand_activation", "block2a_expand_activation")
TOP_FEATURE = "top_activation"
INPUT_MULTIPLE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
_BN_MOMENTUM = 0.99  # Keras defaults; Flax's default epsilon (1e-5) differs.
_BN_EPSILON = 1e-3

# Keras' initialisers, so that training from scratch starts where the recipe's would.
_ENCODER_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
# Keras counts a depthwise kernel's fan-out as k*k (its kernel is (k, k, C, 1)).
_DEPTHWISE_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal",
                                                   in_axis=-1, out_axis=-2)
_DECODER_INIT = nn.initializers.he_uniform()
_HEAD_INIT = nn.initializers.glorot_uniform()


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


def resolve_depthwise_impl(impl: str) -> str:
    """'auto' picks what is fast where it runs: XLA:CPU's grouped convolution (and even
    more its gradient) is several times slower than shifted multiply-adds, while on
    TPU/GPU the native grouped convolution is the fast one."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl {impl!r} is not one of {', '.join(DEPTHWISE_IMPLS)}")
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "native"
    return impl


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, tuple[int, int]]:
    """Output size and (low, high) padding of 'SAME' (Keras and XLA agree: extra on the high side)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, (total // 2, total - total // 2)


def shifted_depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """'SAME' depthwise convolution of NHWC `x` with a (kh, kw, C) kernel, as kh*kw
    strided slices of the padded input times per-channel weights. Products are summed in
    float32 so that bfloat16 compute loses no more than the native convolution does."""
    kernel_h, kernel_w, _ = kernel.shape
    batch, height, width, channels = x.shape
    out_h, pad_h = _same_padding(height, kernel_h, stride)
    out_w, pad_w = _same_padding(width, kernel_w, stride)
    padded = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    total = jnp.zeros((batch, out_h, out_w, channels), jnp.float32)
    for i in range(kernel_h):
        for j in range(kernel_w):
            window = lax.slice(padded, (0, i, j, 0),
                               (batch, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1,
                                channels),
                               (1, stride, stride, 1))
            total = total + window.astype(jnp.float32) * kernel[i, j].astype(jnp.float32)
    return total.astype(x.dtype)


class DepthwiseConv(nn.Module):
    """Keras' DepthwiseConv2D (depth multiplier 1, no bias, 'same' padding); the kernel
    is (k, k, 1, C) as Flax's grouped nn.Conv stores it, whichever `impl` computes it."""
    kernel_size: int
    stride: int = 1
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param("kernel", _DEPTHWISE_INIT,
                            (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if resolve_depthwise_impl(self.impl) == "shifted":
            return shifted_depthwise_conv(x, kernel[:, :, 0, :], self.stride)
        return lax.conv_general_dilated(
            x, kernel, window_strides=(self.stride, self.stride), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


def _batch_norm(name: str, axis_name: str | None, dtype: Any) -> nn.BatchNorm:
    # Two-pass variance: E[x^2]-E[x]^2 cancels badly on the large unnormalised
    # activations of a 0..255 input.
    return nn.BatchNorm(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, axis_name=axis_name,
                        dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                        name=name)


def _conv(features: int, kernel_size: int, name: str, dtype: Any, *, stride: int = 1,
          use_bias: bool = False, kernel_init=_ENCODER_INIT) -> nn.Conv:
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding="SAME", use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=kernel_init, name=name)


def _squeeze_excite(x: jax.Array, reduced: int, prefix: str, dtype: Any) -> jax.Array:
    """Per-channel gates from the global mean (sized by the block's input filters)."""
    gates = jnp.mean(x, axis=(1, 2), keepdims=True)
    gates = nn.swish(_conv(reduced, 1, prefix + "se_reduce", dtype, use_bias=True)(gates))
    gates = nn.sigmoid(_conv(x.shape[-1], 1, prefix + "se_expand", dtype, use_bias=True)(gates))
    return x * gates


class EfficientNet(nn.Module):
    """qubvel/efficientnet's EfficientNet without its classifier; returns the features
    the Unet decoder reads (SKIP_FEATURES and TOP_FEATURE)."""
    backbone: str
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    drop_connect_rate: float = 0.2
    depthwise_impl: str = "auto"

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        resolve_depthwise_impl(self.depthwise_impl)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, freeze_bn: bool = False) -> dict[str, jax.Array]:
        """`freeze_bn` normalises with the running statistics even in training, as Keras
        does for non-trainable BatchNormalization layers; drop-connect still follows `train`."""
        use_running_average = freeze_bn or not train
        width, _ = _SCALING[self.backbone]
        features = {}

        def batch_norm(name: str, y: jax.Array) -> jax.Array:
            return _batch_norm(name, self.bn_axis_name, self.dtype)(y, use_running_average)

        x = _conv(round_filters(_STEM_FILTERS, width), 3, "stem_conv", self.dtype, stride=2)(x)
        x = nn.swish(batch_norm("stem_bn", x))
        for block in block_args(self.backbone, self.drop_connect_rate):
            prefix = block.name + "_"
            inputs = x
            filters = block.input_filters * block.expand_ratio
            if block.expand_ratio != 1:
                x = _conv(filters, 1, prefix + "expand_conv", self.dtype)(x)
                x = nn.swish(batch_norm(prefix + "expand_bn", x))
                features[prefix + "expand_activation"] = x
            x = DepthwiseConv(block.kernel_size, block.stride, self.depthwise_impl, self.dtype,
                              name=prefix + "dwconv")(x)
            x = nn.swish(batch_norm(prefix + "bn", x))
            x = _squeeze_excite(x, max(1, int(block.input_filters * _SE_RATIO)), prefix, self.dtype)
            x = _conv(block.output_filters, 1, prefix + "project_conv", self.dtype)(x)
            x = batch_norm(prefix + "project_bn", x)
            if block.has_residual:
                if block.drop_rate > 0:
                    x = nn.Dropout(block.drop_rate, broadcast_dims=(1, 2, 3),
                                   deterministic=not train, name=prefix + "drop")(x)
                x = x + inputs
        x = _conv(round_filters(_TOP_FILTERS, width), 1, "top_conv", self.dtype)(x)
        features[TOP_FEATURE] = nn.swish(batch_norm("top_bn", x))
        return {name: features[name] for name in SKIP_FEATURES + (TOP_FEATURE,)}


def check_input_shape(shape: Sequence[int]) -> None:
    """The decoder concatenates upsampled maps with skips, so sizes must halve exactly 5 times."""
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"Unet input must be (N, H, W, 3), got shape {tuple(shape)}")
    height, width = shape[1], shape[2]
    if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
        raise ValueError(f"Unet input size {height}x{width} (HxW) is not a multiple of "
                         f"{INPUT_MULTIPLE} in both dimensions")


def check_decoder_filters(decoder_filters: Sequence[int]) -> None:
    """One stage per skip plus one without: fewer or more would not return the input size."""
    if len(decoder_filters) != len(SKIP_FEATURES) + 1:
        raise ValueError(f"decoder_filters needs {len(SKIP_FEATURES) + 1} stages, "
                         f"got {tuple(decoder_filters)}")


def _upsample_nearest_x2(x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)


class UnetDecoder(nn.Module):
    """segmentation_models' Unet decoder (decoder_block_type='upsampling', batchnorm on)
    and head, on the features of `EfficientNet`; returns logits in the compute dtype."""
    decoder_filters: Sequence[int] = (256, 128, 64, 32, 16)
    classes: int = 1
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    def __post_init__(self) -> None:
        check_decoder_filters(self.decoder_filters)
        super().__post_init__()

    @nn.compact
    def __call__(self, features: dict[str, jax.Array], train: bool) -> jax.Array:
        x = features[TOP_FEATURE]
        skips = [features[name] for name in SKIP_FEATURES] + [None]
        for stage, (filters, skip) in enumerate(zip(self.decoder_filters, skips)):
            x = _upsample_nearest_x2(x)
            if skip is not None:
                x = jnp.concatenate([x, skip], axis=-1)
            for part in "ab":
                name = f"decoder_stage{stage}{part}"
                x = _conv(filters, 3, name + "_conv", self.dtype, kernel_init=_DECODER_INIT)(x)
                x = _batch_norm(name + "_bn", self.bn_axis_name, self.dtype)(x, not train)
                x = nn.relu(x)
        return _conv(self.classes, 3, "final_conv", self.dtype, use_bias=True,
                     kernel_init=_HEAD_INIT)(x)


class Unet(nn.Module):
    """segmentation_models' Unet on an EfficientNet encoder.

    Takes float NHWC images on 0..255 and returns float32 logits (N, H, W, classes); the
    sigmoid belongs to the loss and the predictor. `normalize_input` applies
    segmentation_models' 'torch' preprocessing (x/255, ImageNet mean/std), which the
    recipe never did but keras.applications' ImageNet weights expect. Parameters stay
    float32 whatever the compute `dtype`.
    """
    backbone: str = "efficientnetb5"
    classes: int = 1
    decoder_filters: Sequence[int] = (256, 128, 64, 32, 16)
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    drop_connect_rate: float = 0.2
    normalize_input: bool = False
    depthwise_impl: str = "auto"

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        resolve_depthwise_impl(self.depthwise_impl)
        check_decoder_filters(self.decoder_filters)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, freeze_encoder: bool = False) -> jax.Array:
        """`freeze_encoder` runs the encoder's BatchNorm on running statistics, as
        segmentation_models' encoder_freeze does; training also masks its gradients."""
        check_input_shape(x.shape)
        x = jnp.asarray(x, jnp.float32)
        if self.normalize_input:
            x = (x / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        features = EfficientNet(self.backbone, self.dtype, self.bn_axis_name,
                                self.drop_connect_rate, self.depthwise_impl,
                                name="encoder")(x.astype(self.dtype), train, freeze_encoder)
        logits = UnetDecoder(self.decoder_filters, self.classes, self.dtype, self.bn_axis_name,
                             name="decoder")(features, train)
        return logits.astype(jnp.float32)


def count_weights(variables: dict) -> int:
    """Parameters plus BatchNorm statistics: the number Keras' count_params() reports."""
    return sum(int(np.prod(leaf.shape)) for collection in ("params", "batch_stats")
               for leaf in jax.tree.leaves(variables.get(collection, {})))
