"""segmentation_models' Unet (decoder_block_type='upsampling', batchnorm on) on an
EfficientNet encoder: the recipe's network.

The Unet's variables have two top-level keys, 'encoder' (which training can freeze by
name) and 'decoder' (which `convert` can initialise alone when a file holds only an
encoder); below them every layer carries its Keras name (decoder_stage0a_conv,
final_conv, ...). How layers are computed is chosen by `build_model`, which passes the
layer factories down; the defaults are the plain layers.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseg.models.efficientnet import (TOP_FEATURE, BatchNormActivation, DepthwiseConv,
                                        EfficientNet, ModuleDef, check_backbone, rematerialized)

# The encoder's feature maps the decoder stages concatenate, deepest first.
SKIP_FEATURES = ("block6a_expand_activation", "block4a_expand_activation",
                 "block3a_expand_activation", "block2a_expand_activation")
INPUT_MULTIPLE = 32  # the encoder halves its input five times
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODER_INIT = nn.initializers.he_uniform()
_HEAD_INIT = nn.initializers.glorot_uniform()


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


def conv_same(x: jax.Array, kernel: jax.Array, padding: Any = "SAME") -> jax.Array:
    """Stride-1 NHWC convolution with an HWIO kernel."""
    return lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _upsample_nearest_x2(x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)


class UpsampleConcatConv(nn.Module):
    """The entry of a decoder stage: nearest 2x upsampling, concatenation with the skip
    features, 3x3 'SAME' convolution without bias. It holds the kernel of that one
    convolution (upsampled channels first), as nn.Conv would; a variant changes
    `convolve` only, so weights convert and checkpoints load whichever computes it."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None) -> jax.Array:
        in_features = x.shape[-1] + (0 if skip is None else skip.shape[-1])
        kernel = self.param("kernel", DECODER_INIT, (3, 3, in_features, self.features),
                            jnp.float32)
        return self.convolve(x, skip, kernel)

    @nn.nowrap
    def convolve(self, x: jax.Array, skip: jax.Array | None, kernel: jax.Array) -> jax.Array:
        x = _upsample_nearest_x2(x)
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        return conv_same(*nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype))


def _decoder_stage(decoder: UnetDecoder, x: jax.Array, skip: jax.Array | None, name: str,
                   filters: int, train: bool) -> jax.Array:
    x = decoder.upsample_conv(filters, decoder.dtype, name=name + "a_conv")(x, skip)
    x = decoder.batch_norm_relu(name + "a_bn")(x, not train)
    x = nn.Conv(filters, (3, 3), use_bias=False, dtype=decoder.dtype, kernel_init=DECODER_INIT,
                name=name + "b_conv")(x)
    return decoder.batch_norm_relu(name + "b_bn")(x, not train)


class UnetDecoder(nn.Module):
    """segmentation_models' Unet decoder and head, on the features of `EfficientNet`;
    returns logits in the compute dtype."""
    decoder_filters: Sequence[int] = (256, 128, 64, 32, 16)
    classes: int = 1
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    remat: bool = True
    upsample_conv: ModuleDef = UpsampleConcatConv
    norm: ModuleDef = BatchNormActivation

    def __post_init__(self) -> None:
        check_decoder_filters(self.decoder_filters)
        super().__post_init__()

    @nn.compact
    def __call__(self, features: dict[str, jax.Array], train: bool) -> jax.Array:
        x = features[TOP_FEATURE]
        skips = [features[name] for name in SKIP_FEATURES] + [None]
        for stage, (filters, skip) in enumerate(zip(self.decoder_filters, skips)):
            x = rematerialized(functools.partial(
                _decoder_stage, name=f"decoder_stage{stage}", filters=filters, train=train),
                self.remat)(self, x, skip)
        return nn.Conv(self.classes, (3, 3), dtype=self.dtype, kernel_init=_HEAD_INIT,
                       name="final_conv")(x)

    @nn.nowrap
    def batch_norm_relu(self, name: str) -> nn.Module:
        return self.norm(activation="relu", axis_name=self.bn_axis_name, dtype=self.dtype,
                         name=name)


class Unet(nn.Module):
    """segmentation_models' Unet on an EfficientNet encoder.

    Takes float NHWC images on 0..255 and returns float32 logits (N, H, W, classes), or
    float64 ones when it computes in float64 (the tests' exact reference); the sigmoid
    belongs to the loss and the predictor. `normalize_input` applies
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
    remat: bool = True
    pointwise_conv: ModuleDef = nn.Conv
    depthwise_conv: ModuleDef = DepthwiseConv
    upsample_conv: ModuleDef = UpsampleConcatConv
    norm: ModuleDef = BatchNormActivation

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
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
        features = EfficientNet(
            self.backbone, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
            drop_connect_rate=self.drop_connect_rate, remat=self.remat,
            pointwise_conv=self.pointwise_conv, depthwise_conv=self.depthwise_conv,
            norm=self.norm, name="encoder")(x.astype(self.dtype), train, freeze_encoder)
        logits = UnetDecoder(
            self.decoder_filters, self.classes, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
            remat=self.remat, upsample_conv=self.upsample_conv, norm=self.norm,
            name="decoder")(features, train)
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32))
