"""The CPU fast paths of the Unet compute what the native convolutions compute.

conv_impl='matmul', upsample_impl='folded', depthwise_impl='shifted' and
batchnorm_impl='fused' (the last two with their own gradients) must give the native
outputs AND gradients, and keep the parameter layout, so that weight conversion and
checkpoints do not care which path ran. In float32 both the fast and the native path are
judged by their distance from the float64 evaluation of the native function, within a
bound that follows from float32 rounding of that computation (tests/float32_rounding.py):
two float32 paths differ from each other by rounding that depends on the CPU's kernels.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from float32_rounding import (ROUNDING_FACTOR, assert_within_rounding, check_against_float64,
                              exact_and_rounding_scale)
from jaxseg import parallel
from jaxseg.models import Unet, build_model, layers
from jaxseg.models.build import resolve_impl
from jaxseg.models.efficientnet import DepthwiseConv
from jaxseg.models.layers import (FoldedUpsampleConcatConv, FusedBatchNorm, ShiftedDepthwiseConv,
                                  pointwise_conv_as_matmul)
from jaxseg.models.unet import UpsampleConcatConv
from unet_variables import random_variables

NATIVE = {"conv_impl": "native", "upsample_impl": "native", "depthwise_impl": "native",
          "batchnorm_impl": "native"}
FAST = {"conv_impl": "matmul", "upsample_impl": "folded", "depthwise_impl": "shifted",
        "batchnorm_impl": "fused"}


def _assert_close_in_bfloat16(actual, expected, tolerance: float) -> None:
    """Each leaf within `tolerance` of the float32 leaf's largest magnitude: bfloat16 keeps
    8 significant bits, and float32's own rounding, which differs between CPUs, is 2**16
    times finer."""
    def check(path, a, e):
        scale = max(float(np.max(np.abs(e))), 1e-30)
        error = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))))
        assert error <= tolerance * scale, (f"{jax.tree_util.keystr(path)}: {error:.2e} > "
                                            f"{tolerance} x {scale:.2e}")
    jax.tree_util.tree_map_with_path(check, actual, expected)


def _values_and_grads(layer: nn.Module, variables: dict, inputs: tuple,
                      projection: jax.Array) -> tuple:
    """Outputs, and gradients w.r.t. parameters and inputs of a random projection of them."""
    def projected(params, *inputs):
        return jnp.sum(layer.apply({"params": params}, *inputs) * projection)

    grads = jax.grad(projected, argnums=tuple(range(1 + len(inputs))))(variables["params"],
                                                                        *inputs)
    return layer.apply(variables, *inputs), grads


@pytest.mark.parametrize("use_bias", [False, True])
def test_pointwise_conv_as_matmul_matches_conv(use_bias):
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
    native = nn.Conv(4, (1, 1), padding="SAME", use_bias=use_bias)
    matmul = nn.Conv(4, (1, 1), padding="SAME", use_bias=use_bias,
                     conv_general_dilated=pointwise_conv_as_matmul)
    variables = native.init(jax.random.key(1), x)
    if use_bias:
        variables = {"params": {**variables["params"], "bias": jnp.arange(4.0)}}
    projection = jax.random.normal(jax.random.key(7), (2, 5, 7, 4))
    check_against_float64(
        functools.partial(_values_and_grads, native),
        {name: functools.partial(_values_and_grads, layer)
         for name, layer in (("native", native), ("matmul", matmul))},
        variables, (x,), projection)


def test_pointwise_conv_as_matmul_refuses_other_kernels():
    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match=r"1x1 kernel at stride 1.*\(3, 3, 2, 4\)"):
        nn.Conv(4, (3, 3), conv_general_dilated=pointwise_conv_as_matmul).init(
            jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"strides \(2, 2\)"):
        nn.Conv(4, (1, 1), strides=2, conv_general_dilated=pointwise_conv_as_matmul).init(
            jax.random.key(0), x)
    for options in ({"padding": 1}, {"kernel_dilation": 2}, {"feature_group_count": 2}):
        with pytest.raises(ValueError, match="no padding, dilation or groups"):
            nn.Conv(4, (1, 1), conv_general_dilated=pointwise_conv_as_matmul, **options).init(
                jax.random.key(0), x)


@pytest.mark.parametrize("one_conv_min_side", [1, 10**6], ids=["one_conv", "four_convs"])
@pytest.mark.parametrize("skip_channels", [0, 5])
@pytest.mark.parametrize("height,width", [(3, 5), (4, 4), (1, 2)])
def test_folded_upsample_conv_matches_upsample_then_conv(skip_channels, height, width,
                                                         one_conv_min_side):
    x = jax.random.normal(jax.random.key(0), (2, height, width, 6))
    skip = (jax.random.normal(jax.random.key(1), (2, 2 * height, 2 * width, skip_channels))
            if skip_channels else None)
    native = UpsampleConcatConv(4)
    folded = FoldedUpsampleConcatConv(4, one_conv_min_side=one_conv_min_side)
    variables = native.init(jax.random.key(2), x, skip)
    projection = jax.random.normal(jax.random.key(7), (2, 2 * height, 2 * width, 4))

    exact, scale = check_against_float64(
        lambda *args: _values_and_grads(UpsampleConcatConv(4, jnp.float64), *args),
        {"native": functools.partial(_values_and_grads, native),
         "folded": functools.partial(_values_and_grads, folded)},
        variables, (x, skip), projection)
    # the upsampled copy is what a plain nn.Conv would see after the concatenation
    upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    plain = nn.Conv(4, (3, 3), padding="SAME", use_bias=False).apply(
        variables, upsampled if skip is None else jnp.concatenate([upsampled, skip], -1))
    assert_within_rounding(plain, exact[0], scale[0], ROUNDING_FACTOR)


@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
@pytest.mark.parametrize("height,width", [(13, 10), (16, 12)])
def test_shifted_depthwise_equals_native_depthwise(kernel_size, stride, height, width):
    x = jax.random.normal(jax.random.key(1), (2, height, width, 6))
    native, shifted = DepthwiseConv(kernel_size, stride), ShiftedDepthwiseConv(kernel_size, stride)
    variables = native.init(jax.random.key(2), x)
    projection = jax.random.normal(jax.random.key(3),
                                   (2, -(-height // stride), -(-width // stride), 6))
    check_against_float64(
        functools.partial(_values_and_grads, DepthwiseConv(kernel_size, stride, jnp.float64)),
        {name: functools.partial(_values_and_grads, layer)
         for name, layer in (("native", native), ("shifted", shifted))},
        variables, (x,), projection)


def test_float64_check_fails_a_depthwise_missing_one_window_term(monkeypatch):
    """The bound is float32 rounding, not a tolerance a real bug fits in: the shifted
    depthwise convolution without its last kernel tap (one of nine window terms) fails."""
    forward = layers._shifted_depthwise_forward
    monkeypatch.setattr(layers, "_shifted_depthwise_forward", lambda x, kernel, stride: forward(
        x, kernel.at[-1, -1].set(0), stride))
    x = jax.random.normal(jax.random.key(1), (2, 13, 10, 6))
    native, broken = DepthwiseConv(3, 1), ShiftedDepthwiseConv(3, 1)
    variables = native.init(jax.random.key(2), x)
    projection = jax.random.normal(jax.random.key(3), x.shape)
    with pytest.raises(AssertionError, match=r"over 10(\.0)? x its float32 rounding scale"):
        check_against_float64(
            functools.partial(_values_and_grads, DepthwiseConv(3, 1, jnp.float64)),
            {"broken": functools.partial(_values_and_grads, broken)}, variables, (x,), projection)


@pytest.mark.parametrize("kernel_size,stride", [(3, 2), (5, 1)])
def test_shifted_depthwise_gradient_in_bfloat16_follows_float32(kernel_size, stride):
    """The hand-written kernel gradient sums bfloat16 products in float32."""
    x = jax.random.normal(jax.random.key(0), (2, 12, 10, 8))
    native = DepthwiseConv(kernel_size, stride)
    variables = native.init(jax.random.key(1), x)
    projection = jax.random.normal(jax.random.key(7), jax.eval_shape(native.apply, variables, x).shape)
    expected = jax.jit(functools.partial(_values_and_grads, native))(variables, (x,), projection)
    half = ShiftedDepthwiseConv(kernel_size, stride, dtype=jnp.bfloat16)
    _assert_close_in_bfloat16(
        jax.jit(functools.partial(_values_and_grads, half))(variables, (x,), projection),
        expected, 2e-2)


def test_shifted_depthwise_gradient_sums_over_devices():
    """Under the data-parallel wrapper a replicated kernel gets the sum of every
    device's gradient, as it does with the native convolution on one device."""
    x = jax.random.normal(jax.random.key(0), (jax.device_count(), 6, 6, 4))
    weights = jax.random.normal(jax.random.key(1), (jax.device_count(), 3, 3, 4))
    native, shifted = DepthwiseConv(3, 2), ShiftedDepthwiseConv(3, 2)
    variables = native.init(jax.random.key(2), x)

    def loss(layer, variables, x, weights):
        return jnp.sum(layer.apply(variables, x) * weights)

    def per_device_grad(variables, x, weights):
        return jax.grad(lambda v: jax.lax.psum(loss(shifted, v, x, weights), parallel.AXIS))(
            variables)

    mesh = parallel.make_mesh()
    step = parallel.data_parallel(per_device_grad, mesh, num_args=3, batch_args=(1, 2))

    batch = parallel.to_global_batch({"x": np.asarray(x), "weights": np.asarray(weights)}, mesh)
    grads = step(parallel.replicate(variables, mesh), batch["x"], batch["weights"])
    exact, scale = exact_and_rounding_scale(
        jax.grad(functools.partial(loss, DepthwiseConv(3, 2, jnp.float64))),
        variables, x, weights)
    assert_within_rounding(jax.device_get(grads), exact, scale, ROUNDING_FACTOR)


_ACTIVATION_FUNCTIONS = {"swish": nn.swish, "relu": nn.relu, None: lambda x: x}


class _FlaxBatchNorm(nn.Module):
    """The reference: Flax's BatchNorm as the native path configures it (Keras' momentum
    and epsilon, two-pass variance), then the activation."""
    activation: str | None
    axis_name: str | None = None
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, use_running_average):
        y = nn.BatchNorm(momentum=0.99, epsilon=1e-3, axis_name=self.axis_name,
                         dtype=self.dtype, use_fast_variance=False, name="bn")(
            x, use_running_average)
        return _ACTIVATION_FUNCTIONS[self.activation](y)


class _Fused(nn.Module):
    activation: str | None
    axis_name: str | None = None
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, use_running_average):
        return FusedBatchNorm(self.activation, self.axis_name, self.dtype, name="bn")(
            x, use_running_average)


def _batch_norm_case(seed: int = 0, shape=(4, 6, 10, 5)):
    """Activations far from zero mean and unit variance, random affine parameters and
    running statistics, and a random projection of the output as the loss."""
    keys = jax.random.split(jax.random.key(seed), 6)
    channels = shape[-1]
    x = 3 * jax.random.normal(keys[0], shape) + jax.random.normal(keys[1], (channels,)) * 4
    variables = {
        "params": {"bn": {"scale": jax.random.uniform(keys[2], (channels,), minval=0.5, maxval=2),
                          "bias": jax.random.normal(keys[3], (channels,))}},
        "batch_stats": {"bn": {"mean": jax.random.normal(keys[4], (channels,)),
                               "var": jax.random.uniform(keys[5], (channels,), minval=0.5,
                                                         maxval=3)}}}
    projection = jax.random.normal(jax.random.key(seed + 1), shape)
    return x, variables, projection


def _train_and_eval(layer: nn.Module, variables: dict, x: jax.Array, projection: jax.Array,
                    total: Callable[[jax.Array], jax.Array] = lambda value: value):
    """Training-mode output, updated statistics and gradients w.r.t. the parameters and
    the input; then the inference-mode output with the updated statistics. The loss
    reads the updated statistics too, so that their gradient is checked as well; `total`
    adds up the per-device parts of the loss."""
    def loss(params, x):
        y, state = layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                               False, mutable=["batch_stats"])
        statistics = state["batch_stats"]["bn"]
        return (total(jnp.sum(y.astype(projection.dtype) * projection))
                + 30 * jnp.sum(statistics["mean"] - statistics["var"]),
                (y, state["batch_stats"]))

    (_, (y, batch_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x)
    inference = layer.apply({"params": variables["params"], "batch_stats": batch_stats}, x, True)
    return y, batch_stats, grads, inference


@pytest.mark.parametrize("activation", ["swish", "relu", None])
def test_fused_batch_norm_equals_flax_batch_norm(activation):
    x, variables, projection = _batch_norm_case()
    # Initialised outside any device mapping, as models are, though the layers name a
    # device axis: both leave the axis out while initialising.
    initial = [jax.tree.map(np.asarray, layer.init(jax.random.key(0), x, False))
               for layer in (_FlaxBatchNorm(activation, parallel.AXIS),
                             _Fused(activation, parallel.AXIS))]
    assert jax.tree.structure(initial[0]) == jax.tree.structure(initial[1])
    jax.tree.map(np.testing.assert_array_equal, *initial)
    check_against_float64(
        functools.partial(_train_and_eval, _FlaxBatchNorm(activation, dtype=jnp.float64)),
        {"flax": functools.partial(_train_and_eval, _FlaxBatchNorm(activation)),
         "fused": functools.partial(_train_and_eval, _Fused(activation))},
        variables, x, projection)


def test_fused_batch_norm_in_bfloat16_equals_flax_in_bfloat16():
    """bfloat16 in and out, statistics and gradient sums in float32, the activation
    applied to the bfloat16 value: what Flax does, to about one bfloat16 rounding."""
    x, variables, projection = _batch_norm_case(seed=3)
    x = x.astype(jnp.bfloat16)
    expected = jax.jit(functools.partial(
        _train_and_eval, _FlaxBatchNorm("swish", dtype=jnp.bfloat16)))(variables, x, projection)
    actual = jax.jit(functools.partial(_train_and_eval, _Fused("swish", dtype=jnp.bfloat16)))(
        variables, x, projection)
    assert actual[0].dtype == actual[3].dtype == jnp.bfloat16
    _assert_close_in_bfloat16(actual, expected, 1e-2)


def test_fused_batch_norm_over_devices_equals_one_device():
    """Synchronised statistics, and an input gradient that flows through the statistics
    of every device's examples: the global batch on one device is the reference."""
    devices = jax.device_count()
    x, variables, projection = _batch_norm_case(seed=5, shape=(devices * 2, 4, 6, 3))
    per_device = functools.partial(_train_and_eval, _Fused("swish", axis_name=parallel.AXIS),
                                   total=lambda value: jax.lax.psum(value, parallel.AXIS))
    mesh = parallel.make_mesh()
    examples = P(parallel.AXIS)
    mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), examples, examples),
                                   out_specs=(examples, P(), (P(), examples), examples)))
    batch = parallel.to_global_batch({"x": np.asarray(x), "projection": np.asarray(projection)},
                                     mesh)
    actual = mapped(parallel.replicate(variables, mesh), batch["x"], batch["projection"])
    exact, scale = exact_and_rounding_scale(
        functools.partial(_train_and_eval, _FlaxBatchNorm("swish", dtype=jnp.float64)),
        variables, x, projection)
    assert_within_rounding(jax.device_get(actual), exact, scale, ROUNDING_FACTOR)


def _train_outputs_and_grads(model: Unet, variables: dict, images: jax.Array,
                             masks: jax.Array) -> tuple:
    """What a train step takes from the model: logits, new BatchNorm statistics, and the
    gradient of a soft-Dice-like loss w.r.t. every parameter."""
    def loss_fn(params):
        logits, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    images, train=True, rngs={"dropout": jax.random.key(0)},
                                    mutable=["batch_stats"])
        probs = jax.nn.sigmoid(logits)
        loss = 1 - 2 * jnp.sum(probs * masks) / (jnp.sum(probs) + jnp.sum(masks))
        return loss, (logits, state["batch_stats"])

    (_, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"])
    return logits, batch_stats, grads


# Slow (about 2 minutes cold); each fast path has its own test above, and
# test_convert.py runs whole Unets with the CPU paths against Keras.
@pytest.mark.slow
def test_unet_with_every_fast_path_equals_native_unet():
    """Without drop-connect: its random draws differ when float64 is enabled."""
    native, fast = (build_model({"backbone": "efficientnetb0", "drop_connect_rate": 0.0, **impl})
                    for impl in (NATIVE, FAST))
    shapes = [jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 64, 64, 3))) for model in (native, fast)]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype),
                                            *shapes)))

    variables = random_variables(native, seed=0, random_affine=True)
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    masks = (rng.random((2, 64, 64, 1)) < 0.3).astype(np.float32)
    reference = native.clone(dtype=jnp.float64, remat=False)
    exact, _ = check_against_float64(
        functools.partial(_train_outputs_and_grads, reference),
        {name: functools.partial(_train_outputs_and_grads, model)
         for name, model in (("native", native), ("fast", fast))},
        variables, images, masks)
    assert 0.1 < np.std(exact[0]) and np.abs(exact[0]).max() < 100, "reference saturates"


def test_auto_picks_the_fast_paths_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("conv_impl", "auto") == "matmul"
    assert resolve_impl("upsample_impl", "auto") == "folded"
    assert resolve_impl("depthwise_impl", "auto") == "shifted"
    assert resolve_impl("batchnorm_impl", "auto") == "fused"
    assert resolve_impl("conv_impl", "native") == "native"


@pytest.mark.parametrize("field", ["conv_impl", "upsample_impl", "batchnorm_impl"])
def test_unknown_impl_is_refused_with_its_name(field):
    with pytest.raises(ValueError, match=f"{field} 'fast' is not one of auto, native"):
        build_model({"backbone": "efficientnetb0", field: "fast"})
