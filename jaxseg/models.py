"""The recipe's network: segmentation_models' Unet on a qubvel/efficientnet encoder, in Flax.

Every layer carries the name of the Keras layer it replaces (stem_conv, block2a_dwconv,
decoder_stage0a_bn, final_conv, ...), so converting Keras weights is a renaming. The Unet's
variables have two top-level keys, 'encoder' (which training can freeze by name) and
'decoder' (which `convert` can initialise alone when a file holds only an encoder).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from jax import lax

BACKBONES = tuple(f"efficientnetb{i}" for i in range(8))
DEPTHWISE_IMPLS = ("auto", "native", "shifted")
CONV_IMPLS = ("auto", "native", "matmul")
UPSAMPLE_IMPLS = ("auto", "native", "folded")
BATCHNORM_IMPLS = ("auto", "native", "fused")
# Unet fields that choose how a layer is computed, never what it computes.
IMPL_FIELDS = ("depthwise_impl", "conv_impl", "upsample_impl", "batchnorm_impl")
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


def _resolve_impl(field: str, impl: str, choices: tuple[str, ...], on_cpu: str) -> str:
    if impl not in choices:
        raise ValueError(f"{field} {impl!r} is not one of {', '.join(choices)}")
    if impl == "auto":
        return on_cpu if jax.default_backend() == "cpu" else "native"
    return impl


def resolve_depthwise_impl(impl: str) -> str:
    """'auto' picks what is fast where it runs: XLA:CPU's grouped convolution (and even
    more its gradient) is several times slower than shifted multiply-adds, while on
    TPU/GPU the native grouped convolution is the fast one."""
    return _resolve_impl("depthwise_impl", impl, DEPTHWISE_IMPLS, "shifted")


def resolve_conv_impl(impl: str) -> str:
    """'auto' is 'matmul' on CPU: XLA:CPU computes the kernel gradient of a 1x1
    convolution as a convolution over the whole image, up to 15x slower than the
    dot_general it is; TPU/GPU convolutions need no help."""
    return _resolve_impl("conv_impl", impl, CONV_IMPLS, "matmul")


def resolve_upsample_impl(impl: str) -> str:
    """'auto' is 'folded' on CPU, where convolutions are compute-bound and folding saves
    5/9 of the upsampled part's FLOPs; accelerators keep the one large convolution."""
    return _resolve_impl("upsample_impl", impl, UPSAMPLE_IMPLS, "folded")


def resolve_batchnorm_impl(impl: str) -> str:
    """'auto' is 'fused' on CPU, where a training BatchNorm and its activation under
    autodiff are a dozen passes over the activations, several of them single-threaded
    reductions; accelerators fuse those passes themselves."""
    return _resolve_impl("batchnorm_impl", impl, BATCHNORM_IMPLS, "fused")


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, tuple[int, int]]:
    """Output size and (low, high) padding of 'SAME' (Keras and XLA agree: extra on the high side)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, (total // 2, total - total // 2)


_SUM_BLOCK_ROWS = 8


def _depthwise_windows(x: jax.Array, kernel_h: int, kernel_w: int,
                       stride: int) -> list[jax.Array]:
    """The kh*kw strided views of 'SAME'-padded NHWC `x` that meet each kernel tap,
    row-major over the taps."""
    batch, height, width, channels = x.shape
    out_h, pad_h = _same_padding(height, kernel_h, stride)
    out_w, pad_w = _same_padding(width, kernel_w, stride)
    padded = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    return [lax.slice(padded, (0, i, j, 0),
                      (batch, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1,
                       channels),
                      (1, stride, stride, 1))
            for i in range(kernel_h) for j in range(kernel_w)]


def _shifted_depthwise_forward(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    kernel_h, kernel_w, _ = kernel.shape
    windows = _depthwise_windows(x, kernel_h, kernel_w, stride)
    taps = kernel.reshape(kernel_h * kernel_w, -1).astype(jnp.float32)
    total = windows[0].astype(jnp.float32) * taps[0]
    for window, tap in zip(windows[1:], taps[1:]):
        total = total + window.astype(jnp.float32) * tap
    return total.astype(x.dtype)


def _varying_axes(x: jax.Array) -> frozenset:
    """The shard_map mesh axes along which `x` differs between devices."""
    return jax.typeof(x).manual_axis_type.varying


def _per_device_like(param: jax.Array, x: jax.Array) -> jax.Array:
    """Under shard_map a parameter replicated over the devices meets per-device
    activations. Made per-device before a function with a hand-written gradient, its
    gradient there has the type of its input, and autodiff sums that gradient over the
    devices as it does for any replicated parameter."""
    per_device_axes = tuple(sorted(_varying_axes(x) - _varying_axes(param)))
    if per_device_axes:
        return lax.pcast(param, per_device_axes, to="varying")
    return param


def shifted_depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """'SAME' depthwise convolution of NHWC `x` with a (kh, kw, C) kernel, as kh*kw
    strided slices of the padded input times per-channel weights. Products are summed in
    float32 so that bfloat16 compute loses no more than the native convolution does.

    The kernel gradient is one variadic reduction of all kh*kw window-times-gradient
    products: derived automatically, it is kh*kw separate reductions that XLA:CPU hands
    to a library after copying every window out, several times slower.
    """
    return _shifted_depthwise(x, _per_device_like(kernel, x), stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifted_depthwise(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return _shifted_depthwise_forward(x, kernel, stride)


def _shifted_depthwise_fwd(x: jax.Array, kernel: jax.Array,
                           stride: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _shifted_depthwise_forward(x, kernel, stride), (x, kernel)


def _shifted_depthwise_bwd(stride: int, residuals: tuple[jax.Array, jax.Array],
                           grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    kernel_h, kernel_w, _ = kernel.shape
    grad_x, = jax.linear_transpose(
        functools.partial(_shifted_depthwise_forward, kernel=kernel, stride=stride), x)(grad)
    grad_kernel = _window_grad_sums(_depthwise_windows(x, kernel_h, kernel_w, stride), grad)
    return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


def _window_grad_sums(windows: list[jax.Array], grad: jax.Array) -> jax.Array:
    """(len(windows), C) sums over N, H, W of each window times `grad`."""
    grad32 = grad.astype(jnp.float32)
    return jnp.stack(_channel_sums([window.astype(jnp.float32) * grad32 for window in windows]))


def _channel_sums(terms: list[jax.Array]) -> list[jax.Array]:
    """Per-channel float32 sums of same-shaped NHWC arrays in one pass over the data: one
    variadic reduction within blocks of rows first (XLA:CPU runs a reduction straight to C
    values on one thread), then over the blocks."""
    _, height, width, channels = terms[0].shape
    rows = math.gcd(height, _SUM_BLOCK_ROWS)
    blocked = [term.astype(jnp.float32).reshape(-1, rows, width, channels) for term in terms]
    block_sums = lax.reduce(blocked, [np.float32(0)] * len(blocked),
                            lambda totals, values: [a + b for a, b in zip(totals, values)], (1, 2))
    return [block_sum.sum(axis=0) for block_sum in block_sums]


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


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


_ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array]] = {
    "swish": nn.swish, "relu": nn.relu, None: lambda x: x}


def _batch_norm(name: str, axis_name: str | None, dtype: Any, impl: str,
                activation: str | None) -> Callable[[jax.Array, bool], jax.Array]:
    """Keras' BatchNormalization followed by `activation`, under the Keras layer's name."""
    if resolve_batchnorm_impl(impl) == "fused":
        return FusedBatchNorm(activation, axis_name, dtype, name=name)
    # Two-pass variance: E[x^2]-E[x]^2 cancels badly on the large unnormalised
    # activations of a 0..255 input.
    batch_norm = nn.BatchNorm(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, axis_name=axis_name,
                              dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                              name=name)
    return lambda x, use_running_average: _ACTIVATIONS[activation](
        batch_norm(x, use_running_average))


class FusedBatchNorm(nn.Module):
    """nn.BatchNorm (as `_batch_norm` configures it) and an activation, with the same
    variables and results, whose training-mode gradient is written by hand: two
    per-channel sums and one pass over the activations, where autodiff of the two layers
    makes about a dozen passes and XLA:CPU runs their reductions on one thread.
    Takes NHWC activations only."""
    activation: str | None
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        channels = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        if use_running_average:
            normalized = (x - running_mean.value) * (
                lax.rsqrt(running_var.value + _BN_EPSILON) * scale) + bias
            return _ACTIVATIONS[self.activation](normalized.astype(self.dtype))
        # Flax computes initial statistics without the device axis, which init lacks.
        axis_name = None if self.is_initializing() else self.axis_name
        y, mean, var = _batch_norm_train(x, _per_device_like(scale, x), _per_device_like(bias, x),
                                         self.activation, axis_name, self.dtype)
        if not self.is_initializing():
            running_mean.value = _BN_MOMENTUM * running_mean.value + (1 - _BN_MOMENTUM) * mean
            running_var.value = _BN_MOMENTUM * running_var.value + (1 - _BN_MOMENTUM) * var
        return y


def _mean_over_devices(x: jax.Array, axis_name: str | None) -> jax.Array:
    return x if axis_name is None else lax.pmean(x, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, activation: str | None,
                      axis_name: str | None, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The activation of x normalised with its own (global batch) statistics, and those
    statistics: float32 mean and biased variance per channel, as Flax computes them. Like
    Flax, the normalised value is rounded to `dtype` before the activation."""
    return _batch_norm_train_fwd(x, scale, bias, activation, axis_name, dtype)[0]


def _batch_norm_train_fwd(x, scale, bias, activation, axis_name, dtype):
    count = x.size // x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = _mean_over_devices(_channel_sums([x32])[0] / count, axis_name)
    var = _mean_over_devices(_channel_sums([jnp.square(x32 - mean)])[0] / count, axis_name)
    inverse_std = lax.rsqrt(var + _BN_EPSILON)
    normalized = (x32 - mean) * (inverse_std * scale) + bias
    y = _ACTIVATIONS[activation](normalized.astype(dtype))
    return (y, mean, var), (x, scale, bias, mean, inverse_std)


def _batch_norm_train_bwd(activation, axis_name, dtype, residuals, grads):
    x, scale, bias, mean, inverse_std = residuals
    grad_y, grad_mean, grad_var = grads
    local_count = x.size // x.shape[-1]
    count = local_count * (1 if axis_name is None else lax.axis_size(axis_name))
    centered = x.astype(jnp.float32) - mean
    x_hat = centered * inverse_std
    normalized = (centered * (inverse_std * scale) + bias).astype(dtype)
    grad_normalized = jax.vjp(_ACTIVATIONS[activation], normalized)[1](grad_y)[0].astype(
        jnp.float32)
    grad_bias, grad_scale = _channel_sums([grad_normalized, grad_normalized * x_hat])
    mean_grad = _mean_over_devices(grad_bias / local_count, axis_name)
    mean_grad_x_hat = _mean_over_devices(grad_scale / local_count, axis_name)
    grad_x = (scale * inverse_std) * (grad_normalized - mean_grad - x_hat * mean_grad_x_hat)
    # The statistics are outputs too; their cotangents are zero in training, where only
    # the running averages read them.
    grad_x = grad_x + (grad_mean + 2 * grad_var * centered) / count
    return grad_x.astype(x.dtype), grad_scale, grad_bias


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def pointwise_conv_as_matmul(x: jax.Array, kernel: jax.Array, window_strides, padding,
                             **conv_options) -> jax.Array:
    """A drop-in for lax.conv_general_dilated (as nn.Conv calls it, NHWC/HWIO) for
    1x1 kernels at stride 1: one matrix product of the pixels (as rows) and the kernel.
    Its gradients are matrix products too; the rows are flattened first because XLA:CPU
    runs the kernel gradient of the 4-D form several times slower."""
    if kernel.shape[:2] != (1, 1) or tuple(window_strides) != (1, 1):
        raise ValueError(f"pointwise_conv_as_matmul needs a 1x1 kernel at stride 1, got kernel "
                         f"{kernel.shape} and strides {tuple(window_strides)}")
    unpadded = padding in ("SAME", "VALID") or all(tuple(pair) == (0, 0) for pair in padding)
    undilated = all(tuple(conv_options.get(name) or (1, 1)) == (1, 1)
                    for name in ("lhs_dilation", "rhs_dilation"))
    if not (unpadded and undilated and conv_options.get("feature_group_count", 1) == 1):
        raise ValueError("pointwise_conv_as_matmul computes no padding, dilation or groups, "
                         f"got padding {padding} and {conv_options}")
    rows = lax.dot(x.reshape(-1, x.shape[-1]), kernel[0, 0],
                   precision=conv_options.get("precision"))
    return rows.reshape(*x.shape[:-1], kernel.shape[-1])


def _conv(features: int, kernel_size: int, name: str, dtype: Any, *, stride: int = 1,
          use_bias: bool = False, kernel_init=_ENCODER_INIT, impl: str = "native") -> nn.Conv:
    as_matmul = kernel_size == 1 and stride == 1 and resolve_conv_impl(impl) == "matmul"
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding="SAME", use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=kernel_init, name=name,
                   conv_general_dilated=pointwise_conv_as_matmul if as_matmul else None)


def _squeeze_excite(x: jax.Array, reduced: int, prefix: str, dtype: Any, impl: str) -> jax.Array:
    """Per-channel gates from the global mean (sized by the block's input filters)."""
    gates = jnp.mean(x, axis=(1, 2), keepdims=True)
    gates = nn.swish(_conv(reduced, 1, prefix + "se_reduce", dtype, use_bias=True,
                           impl=impl)(gates))
    gates = nn.sigmoid(_conv(x.shape[-1], 1, prefix + "se_expand", dtype, use_bias=True,
                             impl=impl)(gates))
    return x * gates


def _save_products_and_statistics(primitive, *args, **params) -> bool:
    """The rematerialisation policy: keep what convolutions and matrix products compute,
    and the (per-channel) BatchNorm statistics; recompute the elementwise work between."""
    return primitive.name in ("dot_general", "conv_general_dilated", "reduce_sum", "psum",
                              "psum_invariant")


def _rematerialized(fn: Callable, enabled: bool) -> Callable:
    return nn.remat(fn, policy=_save_products_and_statistics) if enabled else fn


def _mbconv(encoder: "EfficientNet", x: jax.Array, block: BlockArgs, train: bool,
            use_running_average: bool) -> tuple[jax.Array, jax.Array | None]:
    """One MBConv block; returns its output and its expand activation (None without)."""
    prefix = block.name + "_"

    def batch_norm(name: str, y: jax.Array, activation: str | None = "swish") -> jax.Array:
        return _batch_norm(prefix + name, encoder.bn_axis_name, encoder.dtype,
                           encoder.batchnorm_impl, activation)(y, use_running_average)

    inputs = x
    expanded = None
    if block.expand_ratio != 1:
        x = _conv(block.input_filters * block.expand_ratio, 1, prefix + "expand_conv",
                  encoder.dtype, impl=encoder.conv_impl)(x)
        x = expanded = batch_norm("expand_bn", x)
    x = DepthwiseConv(block.kernel_size, block.stride, encoder.depthwise_impl, encoder.dtype,
                      name=prefix + "dwconv")(x)
    x = batch_norm("bn", x)
    x = _squeeze_excite(x, max(1, int(block.input_filters * _SE_RATIO)), prefix, encoder.dtype,
                        encoder.conv_impl)
    x = _conv(block.output_filters, 1, prefix + "project_conv", encoder.dtype,
              impl=encoder.conv_impl)(x)
    x = batch_norm("project_bn", x, activation=None)
    if block.has_residual:
        if block.drop_rate > 0:
            x = nn.Dropout(block.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train,
                           name=prefix + "drop")(x)
        x = x + inputs
    return x, expanded


class EfficientNet(nn.Module):
    """qubvel/efficientnet's EfficientNet without its classifier; returns the features
    the Unet decoder reads (SKIP_FEATURES and TOP_FEATURE)."""
    backbone: str
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    drop_connect_rate: float = 0.2
    depthwise_impl: str = "auto"
    conv_impl: str = "auto"
    remat: bool = True
    batchnorm_impl: str = "auto"

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        resolve_depthwise_impl(self.depthwise_impl)
        resolve_conv_impl(self.conv_impl)
        resolve_batchnorm_impl(self.batchnorm_impl)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, freeze_bn: bool = False) -> dict[str, jax.Array]:
        """`freeze_bn` normalises with the running statistics even in training, as Keras
        does for non-trainable BatchNormalization layers; drop-connect still follows `train`."""
        use_running_average = freeze_bn or not train
        width, _ = _SCALING[self.backbone]
        features = {}

        def batch_norm(name: str, y: jax.Array) -> jax.Array:
            return _batch_norm(name, self.bn_axis_name, self.dtype, self.batchnorm_impl,
                               "swish")(y, use_running_average)

        x = _conv(round_filters(_STEM_FILTERS, width), 3, "stem_conv", self.dtype, stride=2)(x)
        x = batch_norm("stem_bn", x)
        for block in block_args(self.backbone, self.drop_connect_rate):
            mbconv = _rematerialized(functools.partial(
                _mbconv, block=block, train=train, use_running_average=use_running_average),
                self.remat)
            x, expanded = mbconv(self, x)
            if expanded is not None:
                features[block.name + "_expand_activation"] = expanded
        x = _conv(round_filters(_TOP_FILTERS, width), 1, "top_conv", self.dtype,
                  impl=self.conv_impl)(x)
        features[TOP_FEATURE] = batch_norm("top_bn", x)
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


def _conv_same(x: jax.Array, kernel: jax.Array, padding: Any = "SAME") -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Output row 2i+a of a 3x3 'SAME' convolution of a nearest-2x-upsampled map reads
# upsampled rows 2i+a-1..2i+a+1, which are low-resolution rows (i-1, i, i) for a=0 and
# (i, i, i+1) for a=1: phase a reads two low-resolution rows, from a map padded by
# _FOLD_PADDING[a], with the kernel rows _fold_taps sums. Columns likewise.
_FOLD_PADDING = ((1, 0), (0, 1))


def _fold_taps(kernel: jax.Array, phase: int, axis: int) -> jax.Array:
    first, middle, last = (lax.index_in_dim(kernel, tap, axis) for tap in range(3))
    pair = (first, middle + last) if phase == 0 else (first + middle, last)
    return jnp.concatenate(pair, axis=axis)


# From this side (of the low-resolution map) up, the four phases run forward as one
# convolution with 4x the output channels over the map padded by one on every side: it
# computes (h+1)(w+1) positions for h*w outputs, at most 6% extra, and runs 1.1-1.8x
# faster on XLA:CPU than four convolutions with few output channels each; on smaller maps
# the four are faster. The gradient always comes from the four: XLA:CPU runs the one
# convolution's gradients up to 2x slower than theirs (BENCHMARKS.md).
ONE_CONV_MIN_SIDE = 32


def folded_upsample_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 'SAME' convolution of nearest-2x-upsampled NHWC `x`, computed as one 2x2
    convolution of `x` per output phase (kernel taps summed in `kernel`'s dtype, then
    cast to `x`'s), interleaved: 4 instead of 9 multiply-adds per output pixel and input
    channel, and no upsampled copy of `x`. From ONE_CONV_MIN_SIDE up, the forward runs
    the four as one convolution."""
    return _folded_upsample_conv(x, _per_device_like(kernel, x))


def _phase_kernels(kernel: jax.Array, dtype: Any) -> list[list[jax.Array]]:
    return [[_fold_taps(_fold_taps(kernel, row, 0), col, 1).astype(dtype) for col in range(2)]
            for row in range(2)]


def _interleave_phases(phases: list[list[jax.Array]]) -> jax.Array:
    batch, height, width, features = phases[0][0].shape
    interleaved = jnp.stack([jnp.stack(row_phases, axis=3) for row_phases in phases], axis=2)
    return interleaved.reshape(batch, 2 * height, 2 * width, features)


def _phase_convs(x: jax.Array, kernel: jax.Array) -> jax.Array:
    kernels = _phase_kernels(kernel, x.dtype)
    return _interleave_phases([
        [_conv_same(x, kernels[row][col], (_FOLD_PADDING[row], _FOLD_PADDING[col]))
         for col in range(2)] for row in range(2)])


def _phases_as_one_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Phase (a, b) at low-resolution pixel (i, j) is the 2x2 window at (i+a, j+b) of
    `x` padded by one on every side (see _FOLD_PADDING), so all four are one 2x2 'VALID'
    convolution of that map with the four phase kernels side by side."""
    _, height, width, _ = x.shape
    features = kernel.shape[-1]
    kernels = _phase_kernels(kernel, x.dtype)
    stacked = jnp.concatenate([k for row_kernels in kernels for k in row_kernels], axis=-1)
    y = _conv_same(x, stacked, ((1, 1), (1, 1)))
    return _interleave_phases([
        [y[:, row:row + height, col:col + width,
           (2 * row + col) * features:(2 * row + col + 1) * features] for col in range(2)]
        for row in range(2)])


@jax.custom_vjp
def _folded_upsample_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    if min(x.shape[1:3]) >= ONE_CONV_MIN_SIDE:
        return _phases_as_one_conv(x, kernel)
    return _phase_convs(x, kernel)


def _folded_upsample_conv_fwd(x: jax.Array, kernel: jax.Array
                              ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _folded_upsample_conv(x, kernel), (x, kernel)


def _folded_upsample_conv_bwd(residuals: tuple[jax.Array, jax.Array],
                              grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    _, transpose = jax.vjp(_phase_convs, x, kernel)  # XLA drops the unused forward
    return transpose(grad)


_folded_upsample_conv.defvjp(_folded_upsample_conv_fwd, _folded_upsample_conv_bwd)


class UpsampleConcatConv(nn.Module):
    """The entry of a segmentation_models decoder stage: nearest 2x upsampling,
    concatenation with the skip features, 3x3 'SAME' convolution without bias. It holds
    the kernel of that one convolution (upsampled channels first), as nn.Conv would, so
    weights convert and checkpoints load whichever `impl` computes it; 'folded' splits
    the kernel into the upsampled part (folded_upsample_conv) and the skip part."""
    features: int
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None) -> jax.Array:
        channels = x.shape[-1]
        in_features = channels + (0 if skip is None else skip.shape[-1])
        kernel = self.param("kernel", _DECODER_INIT, (3, 3, in_features, self.features),
                            jnp.float32)
        if resolve_upsample_impl(self.impl) == "native":
            x = _upsample_nearest_x2(x)
            if skip is not None:
                x = jnp.concatenate([x, skip], axis=-1)
            x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
            return _conv_same(x, kernel)
        x, = nn.dtypes.promote_dtype(x, dtype=self.dtype)
        y = folded_upsample_conv(x, kernel[:, :, :channels])
        if skip is not None:
            skip, skip_kernel = nn.dtypes.promote_dtype(skip, kernel[:, :, channels:],
                                                        dtype=self.dtype)
            y = y + _conv_same(skip, skip_kernel)
        return y


class UnetDecoder(nn.Module):
    """segmentation_models' Unet decoder (decoder_block_type='upsampling', batchnorm on)
    and head, on the features of `EfficientNet`; returns logits in the compute dtype."""
    decoder_filters: Sequence[int] = (256, 128, 64, 32, 16)
    classes: int = 1
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    upsample_impl: str = "auto"
    remat: bool = True
    batchnorm_impl: str = "auto"

    def __post_init__(self) -> None:
        check_decoder_filters(self.decoder_filters)
        resolve_upsample_impl(self.upsample_impl)
        resolve_batchnorm_impl(self.batchnorm_impl)
        super().__post_init__()

    @nn.compact
    def __call__(self, features: dict[str, jax.Array], train: bool) -> jax.Array:
        x = features[TOP_FEATURE]
        skips = [features[name] for name in SKIP_FEATURES] + [None]
        for stage, (filters, skip) in enumerate(zip(self.decoder_filters, skips)):
            x = _rematerialized(functools.partial(
                _decoder_stage, name=f"decoder_stage{stage}", filters=filters, train=train),
                self.remat)(self, x, skip)
        return _conv(self.classes, 3, "final_conv", self.dtype, use_bias=True,
                     kernel_init=_HEAD_INIT)(x)


def _decoder_stage(decoder: UnetDecoder, x: jax.Array, skip: jax.Array | None, name: str,
                   filters: int, train: bool) -> jax.Array:
    x = UpsampleConcatConv(filters, decoder.upsample_impl, decoder.dtype,
                           name=name + "a_conv")(x, skip)

    def batch_norm_relu(bn_name: str, y: jax.Array) -> jax.Array:
        return _batch_norm(bn_name, decoder.bn_axis_name, decoder.dtype, decoder.batchnorm_impl,
                           "relu")(y, not train)

    x = batch_norm_relu(name + "a_bn", x)
    x = _conv(filters, 3, name + "b_conv", decoder.dtype, kernel_init=_DECODER_INIT)(x)
    return batch_norm_relu(name + "b_bn", x)


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
    depthwise_impl: str = "auto"
    conv_impl: str = "auto"
    upsample_impl: str = "auto"
    remat: bool = True
    batchnorm_impl: str = "auto"

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        resolve_depthwise_impl(self.depthwise_impl)
        resolve_conv_impl(self.conv_impl)
        resolve_upsample_impl(self.upsample_impl)
        resolve_batchnorm_impl(self.batchnorm_impl)
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
                                self.drop_connect_rate, self.depthwise_impl, self.conv_impl,
                                self.remat, self.batchnorm_impl,
                                name="encoder")(x.astype(self.dtype), train, freeze_encoder)
        logits = UnetDecoder(self.decoder_filters, self.classes, self.dtype, self.bn_axis_name,
                             self.upsample_impl, self.remat, self.batchnorm_impl,
                             name="decoder")(features, train)
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


def count_weights(variables: dict) -> int:
    """Parameters plus BatchNorm statistics: the number Keras' count_params() reports."""
    return sum(int(np.prod(leaf.shape)) for collection in ("params", "batch_stats")
               for leaf in jax.tree.leaves(variables.get(collection, {})))


def random_variables(model: nn.Module, seed: int, random_affine: bool = False) -> dict:
    """He-scaled random kernels, drawn in numpy: compiling `model.init` costs far more on
    CPU (its random generators dominate, a minute for B5), and benchmarks and tests need
    only plausible scales. BatchNorm statistics stay at mean 0, variance 1; its scale and
    offset (and biases) stay at 1 and 0 unless `random_affine`, for tests in which every
    parameter must matter."""
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
