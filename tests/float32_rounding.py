"""How far float32 rounding alone can move each value of a computation, and the exact value.

A float32 result differs from the exact one by the rounding of every operation on the
way, amplified by what follows; how much depends on the computation, and the order of
the rounding (which XLA:CPU kernel runs, how it blocks its sums) on the machine. Tests of
a float32 path therefore compare it with the float64 evaluation of the same function
(exact for this purpose), within a bound that follows from float32 rounding of that
computation: the float64 evaluation is repeated with each arithmetic operation's result
perturbed as the standard model of floating point arithmetic perturbs it,
fl(a op b) = (a op b)(1 + d) with |d| <= u = 2**-24, and the largest change that this
makes to a value over a few random draws is its rounding scale. For sums (reductions,
matrix products, convolutions) the perturbation is u times the sum of the magnitudes of
the terms, the size of the error of one rounding per term: a gradient that is an exactly
cancelling sum (the bias of a layer that a BatchNorm follows) then gets the rounding
scale its float32 value really shows, not zero.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

UNIT_ROUNDOFF = 2.0 ** -24
# A float32 path may sit this many rounding scales from the exact value: the model rounds
# each operation once, while a kernel also rounds the partial sums it keeps (blocked sums,
# fused multiply-adds) in an order that depends on the CPU.
ROUNDING_FACTOR = 10.0

# Operations whose float32 result is rounded; the rest (moves, selections, comparisons,
# negation, max) are exact.
_ROUNDED_ELEMENTWISE = {"add", "sub", "mul", "div", "exp", "exp2", "log", "log1p", "expm1",
                        "logistic", "tanh", "rsqrt", "sqrt", "pow", "integer_pow", "square",
                        "erf", "erf_inv", "sin", "cos", "atan2", "add_any"}
# Bilinear sums: the magnitude of their terms is the same operation on magnitudes.
_BILINEAR_SUMS = {"dot_general", "conv_general_dilated"}
_SUMS = {"reduce_sum", "cumsum"}
# Call-like operations whose body is evaluated (and perturbed) operation by operation.
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}


def _sum_term_magnitudes(primitive: core.Primitive, inputs: list, params: dict) -> jax.Array:
    if primitive.name in _BILINEAR_SUMS:
        return primitive.bind(jnp.abs(inputs[0]), jnp.abs(inputs[1]), **params)
    return primitive.bind(jnp.abs(inputs[0]), **params)


def _evaluate(jaxpr: core.Jaxpr, consts: list, args: list, noise: Callable) -> list:
    env: dict = {}

    def read(var: Any) -> Any:
        return var.val if isinstance(var, core.Literal) else env[var]

    for var, value in itertools.chain(zip(jaxpr.constvars, consts), zip(jaxpr.invars, args)):
        env[var] = value
    for eqn in jaxpr.eqns:
        inputs = [read(var) for var in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS:
            body = eqn.params[_CALLS[name]]
            closed = body if isinstance(body, core.ClosedJaxpr) else core.ClosedJaxpr(body, [])
            outputs = _evaluate(closed.jaxpr, closed.consts, inputs, noise)
        else:
            outputs = eqn.primitive.bind(*inputs, **eqn.params)
            outputs = outputs if eqn.primitive.multiple_results else [outputs]
            if name in _ROUNDED_ELEMENTWISE | _BILINEAR_SUMS | _SUMS:
                magnitude = (jnp.abs(outputs[0]) if name in _ROUNDED_ELEMENTWISE
                             else _sum_term_magnitudes(eqn.primitive, inputs, eqn.params))
                outputs = [outputs[0] + noise(outputs[0].shape) * magnitude]
        for var, value in zip(eqn.outvars, outputs):
            env[var] = value
    return [read(var) for var in jaxpr.outvars]


def _pseudo_random_signs(shape: tuple, seed: jax.Array) -> jax.Array:
    """Uniform-looking values in [-1, 1) from an integer hash of the element index and
    `seed`: a few fused integer operations, where a random generator (or a sine) per
    operation would make the program too slow to compile."""
    index = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape)
    hashed = (index + seed) * jnp.uint32(0x9E3779B1)
    hashed = (hashed ^ (hashed >> 15)) * jnp.uint32(0x85EBCA77)
    hashed = hashed ^ (hashed >> 13)
    return hashed.astype(jnp.float64) * (2.0 / 2 ** 32) - 1


def exact_and_rounding_scale(fn: Callable, *args: Any, draws: int = 2) -> tuple[Any, Any]:
    """`fn(*args)` in float64, and per output leaf the largest absolute change that the
    float32 rounding model makes to it over `draws` perturbations.

    `fn` must compute in the dtype of its inputs (float64 inputs here) and be free of
    randomness; remat and other call-like wrappers are evaluated through.
    """
    with jax.enable_x64(True):
        args64 = jax.tree.map(lambda a: np.asarray(a, np.float64)
                              if np.issubdtype(np.asarray(a).dtype, np.floating) else a, args)
        closed = jax.make_jaxpr(fn)(*args64)
        _, out_tree = jax.tree.flatten(jax.eval_shape(fn, *args64))

        @jax.jit
        def run(flat_args: list, draw: jax.Array, amplitude: jax.Array) -> list:
            operations = itertools.count()

            def noise(shape: tuple) -> jax.Array:
                seed = draw * jnp.uint32(1_000_003) + jnp.uint32(next(operations) * 7919)
                return amplitude * _pseudo_random_signs(shape, seed)
            return _evaluate(closed.jaxpr, closed.consts, flat_args, noise)

        flat_args = jax.tree.leaves(args64)
        exact = jax.device_get(run(flat_args, np.uint32(0), 0.0))
        scale = [np.zeros_like(leaf) for leaf in exact]
        for draw in range(draws):
            perturbed = jax.device_get(run(flat_args, np.uint32(draw), UNIT_ROUNDOFF))
            scale = [np.maximum(s, np.abs(p - e)) for s, p, e in zip(scale, perturbed, exact)]
    return jax.tree.unflatten(out_tree, exact), jax.tree.unflatten(out_tree, scale)


def assert_within_rounding(actual: Any, exact: Any, scale: Any, factor: float) -> None:
    """Each leaf of `actual` within `factor` times its leaf's rounding scale (the largest
    over the leaf, as rounding is not elementwise-comparable) of the exact value."""
    def check(path, a, e, s) -> None:
        error = float(np.max(np.abs(np.asarray(a, np.float64) - e)))
        bound = factor * float(np.max(s))
        assert error <= bound, (f"{jax.tree_util.keystr(path)}: {error:.2e} from float64, "
                                f"over {factor} x its float32 rounding scale {np.max(s):.2e}")
    jax.tree_util.tree_map_with_path(check, actual, exact, scale)


def worst_ratio(actual: Any, exact: Any, scale: Any) -> float:
    """The largest distance from the exact value over all leaves, in rounding scales."""
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - e))) / max(float(np.max(s)), 1e-300)
               for a, e, s in zip(jax.tree.leaves(actual), jax.tree.leaves(exact),
                                  jax.tree.leaves(scale)))


def check_against_float64(reference: Callable, paths: dict[str, Callable], *args: Any,
                          factor: float = ROUNDING_FACTOR) -> tuple[Any, Any]:
    """Each float32 path within `factor` x float32's rounding scale of `reference`
    evaluated in float64 (the same function, computing in the dtype of its inputs);
    returns the exact values and their rounding scales for further checks."""
    exact, scale = exact_and_rounding_scale(reference, *args)
    for name, path in paths.items():
        actual = jax.device_get(jax.jit(path)(*args))
        print(f"{name}: {worst_ratio(actual, exact, scale):.2f} x the rounding scale at most")
        assert_within_rounding(actual, exact, scale, factor)
    return exact, scale
