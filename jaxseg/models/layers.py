"""Variants of the Unet's layers that XLA:CPU runs faster, each a drop-in for the plain
layer it names: the same fields, call, variables, outputs and gradients (the tests
check them against the plain layer in float64). Accelerators run the plain layers well;
`build_model` chooses.

- ShiftedDepthwiseConv: a depthwise convolution as strided slices times weights, with a
  hand-written kernel gradient.
- MatmulPointwiseConv: a 1x1 convolution as one matrix product.
- FusedBatchNorm: BatchNorm and its activation with a hand-written training gradient.
- FoldedUpsampleConcatConv: nearest 2x upsampling and a 3x3 convolution as 2x2
  convolutions of the small map.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxseg.models.efficientnet import (ACTIVATIONS, KERAS_BN_EPSILON, KERAS_BN_MOMENTUM,
                                        DepthwiseConv)
from jaxseg.models.unet import UpsampleConcatConv, conv_same

_SUM_BLOCK_ROWS = 8


def _per_device_like(param: jax.Array, x: jax.Array) -> jax.Array:
    """Under shard_map a parameter replicated over the devices meets per-device
    activations. Made per-device before a function with a hand-written gradient, its
    gradient there has the type of its input, and autodiff sums that gradient over the
    devices as it does for any replicated parameter."""
    per_device_axes = tuple(sorted(jax.typeof(x).manual_axis_type.varying
                                   - jax.typeof(param).manual_axis_type.varying))
    if per_device_axes:
        return lax.pcast(param, per_device_axes, to="varying")
    return param


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


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, tuple[int, int]]:
    """Output size and (low, high) padding of 'SAME' (Keras and XLA agree: extra on the high side)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, (total // 2, total - total // 2)


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
    grad32 = grad.astype(jnp.float32)
    grad_kernel = jnp.stack(_channel_sums([
        window.astype(jnp.float32) * grad32
        for window in _depthwise_windows(x, kernel_h, kernel_w, stride)]))
    return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


def shifted_depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """'SAME' depthwise convolution of NHWC `x` with a (kh, kw, C) kernel, as kh*kw
    strided slices of the padded input times per-channel weights. Products are summed in
    float32 so that bfloat16 compute loses no more than the native convolution does.

    The kernel gradient is one variadic reduction of all kh*kw window-times-gradient
    products: derived automatically, it is kh*kw separate reductions that XLA:CPU hands
    to a library after copying every window out, several times slower.
    """
    return _shifted_depthwise(x, _per_device_like(kernel, x), stride)


class ShiftedDepthwiseConv(DepthwiseConv):
    """DepthwiseConv computed by `shifted_depthwise_conv`: XLA:CPU's grouped convolution,
    and even more its gradient, is several times slower."""

    @nn.nowrap
    def convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return shifted_depthwise_conv(x, kernel[:, :, 0, :], self.stride)


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


class MatmulPointwiseConv(nn.Conv):
    """nn.Conv for 1x1 kernels at stride 1, computed by `pointwise_conv_as_matmul`:
    XLA:CPU computes the kernel gradient of a 1x1 convolution as a convolution over the
    whole image, many times slower than the matrix product it is."""
    conv_general_dilated: Any = pointwise_conv_as_matmul


class FusedBatchNorm(nn.Module):
    """BatchNormActivation with the same variables and results, whose training-mode
    gradient is written by hand: two per-channel sums and one pass over the activations,
    where autodiff of BatchNorm and activation makes about a dozen passes and XLA:CPU runs
    their reductions on one thread. Takes NHWC activations only."""
    activation: str | None = None
    axis_name: str | None = None
    dtype: Any = jnp.float32
    momentum: float = KERAS_BN_MOMENTUM
    epsilon: float = KERAS_BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        channels = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        if use_running_average:
            normalized = (x - running_mean.value) * (
                lax.rsqrt(running_var.value + self.epsilon) * scale) + bias
            return ACTIVATIONS[self.activation](normalized.astype(self.dtype))
        # Flax computes initial statistics without the device axis, which init lacks.
        axis_name = None if self.is_initializing() else self.axis_name
        y, mean, var = _batch_norm_train(x, _per_device_like(scale, x), _per_device_like(bias, x),
                                         self.activation, axis_name, self.dtype, self.epsilon)
        if not self.is_initializing():
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return y


def _mean_over_devices(x: jax.Array, axis_name: str | None) -> jax.Array:
    return x if axis_name is None else lax.pmean(x, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, activation: str | None,
                      axis_name: str | None, dtype: Any,
                      epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The activation of x normalised with its own (global batch) statistics, and those
    statistics: float32 mean and biased variance per channel, as Flax computes them. Like
    Flax, the normalised value is rounded to `dtype` before the activation."""
    return _batch_norm_train_fwd(x, scale, bias, activation, axis_name, dtype, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, activation, axis_name, dtype, epsilon):
    count = x.size // x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = _mean_over_devices(_channel_sums([x32])[0] / count, axis_name)
    var = _mean_over_devices(_channel_sums([jnp.square(x32 - mean)])[0] / count, axis_name)
    inverse_std = lax.rsqrt(var + epsilon)
    normalized = (x32 - mean) * (inverse_std * scale) + bias
    y = ACTIVATIONS[activation](normalized.astype(dtype))
    return (y, mean, var), (x, scale, bias, mean, inverse_std)


def _batch_norm_train_bwd(activation, axis_name, dtype, epsilon, residuals, grads):
    x, scale, bias, mean, inverse_std = residuals
    grad_y, grad_mean, grad_var = grads
    local_count = x.size // x.shape[-1]
    count = local_count * (1 if axis_name is None else lax.axis_size(axis_name))
    centered = x.astype(jnp.float32) - mean
    x_hat = centered * inverse_std
    normalized = (centered * (inverse_std * scale) + bias).astype(dtype)
    grad_normalized = jax.vjp(ACTIVATIONS[activation], normalized)[1](grad_y)[0].astype(
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


# Output row 2i+a of a 3x3 'SAME' convolution of a nearest-2x-upsampled map reads
# upsampled rows 2i+a-1..2i+a+1, which are low-resolution rows (i-1, i, i) for a=0 and
# (i, i, i+1) for a=1: phase a reads two low-resolution rows, from a map padded by
# _FOLD_PADDING[a], with the kernel rows _fold_taps sums. Columns likewise.
_FOLD_PADDING = ((1, 0), (0, 1))


def _fold_taps(kernel: jax.Array, phase: int, axis: int) -> jax.Array:
    first, middle, last = (lax.index_in_dim(kernel, tap, axis) for tap in range(3))
    pair = (first, middle + last) if phase == 0 else (first + middle, last)
    return jnp.concatenate(pair, axis=axis)


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
        [conv_same(x, kernels[row][col], (_FOLD_PADDING[row], _FOLD_PADDING[col]))
         for col in range(2)] for row in range(2)])


def _phases_as_one_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Phase (a, b) at low-resolution pixel (i, j) is the 2x2 window at (i+a, j+b) of
    `x` padded by one on every side (see _FOLD_PADDING), so all four are one 2x2 'VALID'
    convolution of that map with the four phase kernels side by side."""
    _, height, width, _ = x.shape
    features = kernel.shape[-1]
    kernels = _phase_kernels(kernel, x.dtype)
    stacked = jnp.concatenate([k for row_kernels in kernels for k in row_kernels], axis=-1)
    y = conv_same(x, stacked, ((1, 1), (1, 1)))
    return _interleave_phases([
        [y[:, row:row + height, col:col + width,
           (2 * row + col) * features:(2 * row + col + 1) * features] for col in range(2)]
        for row in range(2)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _folded_upsample_conv(x: jax.Array, kernel: jax.Array, as_one_conv: bool) -> jax.Array:
    return _phases_as_one_conv(x, kernel) if as_one_conv else _phase_convs(x, kernel)


def _folded_upsample_conv_fwd(x: jax.Array, kernel: jax.Array, as_one_conv: bool
                              ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _folded_upsample_conv(x, kernel, as_one_conv), (x, kernel)


def _folded_upsample_conv_bwd(as_one_conv: bool, residuals: tuple[jax.Array, jax.Array],
                              grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    _, transpose = jax.vjp(_phase_convs, x, kernel)  # XLA drops the unused forward
    return transpose(grad)


_folded_upsample_conv.defvjp(_folded_upsample_conv_fwd, _folded_upsample_conv_bwd)


def folded_upsample_conv(x: jax.Array, kernel: jax.Array, as_one_conv: bool) -> jax.Array:
    """3x3 'SAME' convolution of nearest-2x-upsampled NHWC `x`, computed as one 2x2
    convolution of `x` per output phase (kernel taps summed in `kernel`'s dtype, then
    cast to `x`'s), interleaved: 4 instead of 9 multiply-adds per output pixel and input
    channel, and no upsampled copy of `x`. `as_one_conv` runs the forward's four as one
    convolution with 4x the output channels; the gradient always comes from the four."""
    return _folded_upsample_conv(x, _per_device_like(kernel, x), as_one_conv)


class FoldedUpsampleConcatConv(UpsampleConcatConv):
    """UpsampleConcatConv with the kernel split into the upsampled part, computed by
    `folded_upsample_conv` (which saves 5/9 of its multiply-adds, where XLA:CPU is
    compute-bound), and the skip part, a plain convolution. From `one_conv_min_side`
    (the smaller side of the low-resolution map) up, the forward's four phase
    convolutions run as one."""
    one_conv_min_side: int = dataclasses.field(kw_only=True)

    @nn.nowrap
    def convolve(self, x: jax.Array, skip: jax.Array | None, kernel: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x, = nn.dtypes.promote_dtype(x, dtype=self.dtype)
        y = folded_upsample_conv(x, kernel[:, :, :channels],
                                 min(x.shape[1:3]) >= self.one_conv_min_side)
        if skip is not None:
            skip, skip_kernel = nn.dtypes.promote_dtype(skip, kernel[:, :, channels:],
                                                        dtype=self.dtype)
            y = y + conv_same(skip, skip_kernel)
        return y
