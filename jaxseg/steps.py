"""Pure per-device train and eval steps; `parallel.data_parallel` maps them over devices.

Both steps reduce over the device axis *inside* the loss and metrics (sums of
per-device statistics, then the ratio), so with synchronised BatchNorm an N-device step
computes the recipe's global-batch loss and gradient exactly. The gradient of that
replicated loss with respect to the replicated parameters already carries the sum over
devices (shard_map transposes the implicit broadcast of the parameters into a psum), so
no further pmean of the gradients is needed; tests check the result against the same
batch on one device.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxseg import colour, losses, parallel, warp
from jaxseg.parallel import AXIS

ENCODER = "encoder"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict:
        """The model as validation, precise BatchNorm, the best checkpoint and prediction
        use it (`EmaTrainState`'s is the average)."""
        return {"params": self.params, "batch_stats": self.batch_stats}


@flax.struct.dataclass
class EmaTrainState(TrainState):
    """The train state of a run with weight EMA (`config.ema_decay` > 0): the moving
    average of the parameters is what validation scores and the best checkpoint keeps,
    with the BatchNorm statistics training keeps (EMA averages what the optimiser learns;
    the statistics are already moving averages). A subclass rather than an optional
    field, so that the checkpoints of runs without EMA keep the layout of those made
    before it existed, and resume."""
    ema_params: Any

    @property
    def variables(self) -> dict:
        return {"params": self.ema_params, "batch_stats": self.batch_stats}


def make_optimizer() -> optax.GradientTransformation:
    """Adam without the step size: the learning rate is a step argument so the host (the
    plateau controller, or the schedule of `schedules.py`) can change it at any step
    without touching the compiled program.

    epsilon 1e-7 is tf.keras' Adam default (optax's is 1e-8).
    """
    return optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-7)


def create_train_state(variables: dict, tx: optax.GradientTransformation, seed: int,
                       ema: bool = False) -> TrainState:
    """The state before the first step; with `ema` the average starts at the initial
    parameters (as TensorFlow's shadow variables do)."""
    fields = dict(step=jnp.zeros((), jnp.int32), params=variables["params"],
                  batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                  rng=jax.random.PRNGKey(seed))
    if ema:
        return EmaTrainState(**fields, ema_params=variables["params"])
    return TrainState(**fields)


def ema_update(average: Any, params: Any, decay: float, num_updates: jax.Array) -> Any:
    """`average` moved towards `params` as `tf.train.ExponentialMovingAverage(decay,
    num_updates)` moves its shadow variables, `num_updates` being the steps taken so far,
    this one included.

    TensorFlow's warm-up, decay min(decay, (1 + n) / (10 + n)), keeps the average from
    clinging to the random initial weights for hundreds of steps, so that early
    validations, on which the best checkpoint and early stopping already act, score
    trained weights; unlike optax.ema's debiasing it keeps the average itself a usable
    model at every step, with nothing to divide out before validation. The update is
    written as TensorFlow's `average -= (average - params) * (1 - decay)`, which leaves
    a parameter that does not move (a frozen encoder) exactly as it is.
    """
    count = num_updates.astype(jnp.float32)
    rate = 1 - jnp.minimum(jnp.float32(decay), (1 + count) / (10 + count))
    return jax.tree.map(lambda mean, value: mean - (mean - value) * rate, average, params)


def _sum_over_devices(x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, AXIS)


def _zero_encoder(tree: dict) -> dict:
    return {name: jax.tree.map(jnp.zeros_like, sub) if name == ENCODER else sub
            for name, sub in tree.items()}


def model_inputs(batch: dict) -> tuple[jax.Array, jax.Array]:
    """float32 images on 0..255 and 0/1 masks from a batch as it crossed to the device:
    uint8 pixels and masks, and for training each example's shift-scale-rotate and
    colour factors."""
    images, masks = batch["image"].astype(jnp.float32), batch["mask"].astype(jnp.float32)
    if "warp" in batch:
        images, masks = warp.shift_scale_rotate(images, masks, batch["warp"])
    if "colour_factors" in batch:
        images = colour.jitter(images, batch["colour_factors"])
    return images, masks


def train_step(state: TrainState, batch: dict, learning_rate: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, loss_name: str, freeze_encoder: bool,
               ema_decay: float = 0.0) -> tuple[TrainState, dict]:
    """One Adam step on the global batch; with `ema_decay` > 0 (on an `EmaTrainState`)
    also the parameters' moving average, on the devices like the step itself.

    With `freeze_encoder` the encoder neither learns nor updates its BatchNorm statistics
    (segmentation_models' `encoder_freeze`): its gradients are zero from the first step,
    so Adam's moments and updates for it stay exactly zero.
    """
    dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                     jax.lax.axis_index(AXIS))
    images, masks = model_inputs(batch)
    weights = jnp.ones(images.shape[:1], jnp.float32)

    def loss_fn(params):
        logits, new_model_state = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            freeze_encoder=freeze_encoder, rngs={"dropout": dropout_rng},
            mutable=["batch_stats"])
        loss = losses.loss_from_logits(loss_name, logits, masks, weights, _sum_over_devices)
        return loss, (logits, new_model_state["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    if freeze_encoder:
        grads = _zero_encoder(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: -learning_rate * u, updates)
    params = optax.apply_updates(state.params, updates)
    metrics = losses.thresholded_metrics(jax.nn.sigmoid(logits), masks, weights,
                                         _sum_over_devices)
    metrics = {"loss": loss, "dice_coe": metrics["dice_coe"], "accuracy": metrics["accuracy"]}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    if ema_decay:
        new_state = new_state.replace(
            ema_params=ema_update(state.ema_params, params, ema_decay, new_state.step))
    return new_state, metrics


def eval_step(variables: dict, batch: dict, *, model: nn.Module,
              loss_name: str) -> tuple[dict, jax.Array]:
    """Metrics of one validation batch (padded examples carry weight 0 and count
    nowhere), and its examples' probabilities as uint8 (probability * 255): they stay
    on the devices unless the host reads a sample of them for TensorBoard."""
    images, masks = model_inputs(batch)
    logits = model.apply(variables, images, train=False)
    weights = batch["weight"]
    probabilities = jax.nn.sigmoid(logits)
    loss = losses.loss_from_logits(loss_name, logits, masks, weights, _sum_over_devices)
    metrics = losses.thresholded_metrics(probabilities, masks, weights, _sum_over_devices)
    return {"loss": loss, **metrics}, jnp.round(probabilities * 255).astype(jnp.uint8)


def batch_norm_statistics_step(variables: dict, batch: dict, accumulated: dict,
                               batch_index: jax.Array, share: jax.Array, *, model: nn.Module,
                               freeze_encoder: bool) -> dict:
    """`accumulated` plus `share` times the BatchNorm statistics of one training batch over
    all devices, as the training forward pass sees them (drop-connect included).

    `model` has momentum 0, so the statistics it stores are the batch's own; the sum over
    a few batches with share 1/K is precise BatchNorm's population estimate (the mean of
    the batch means and of the batch variances).
    """
    images, _ = model_inputs(batch)
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), batch_index),
                             jax.lax.axis_index(AXIS))
    _, new_state = model.apply(variables, images, train=True, freeze_encoder=freeze_encoder,
                               rngs={"dropout": rng}, mutable=["batch_stats"])
    return jax.tree.map(lambda total, new: total + share * new, accumulated,
                        new_state["batch_stats"])


class CompiledSteps:
    """The data-parallel train and eval programs, compiled once and shared by all folds
    (and by the benchmarks, which must time the program training runs); with
    `ema_decay` > 0 their states keep a moving average of the parameters."""

    def __init__(self, model: nn.Module, loss_name: str, mesh: jax.sharding.Mesh,
                 ema_decay: float = 0.0):
        self.tx = make_optimizer()
        self._ema_decay = ema_decay
        self._train: dict[bool, Callable] = {}
        self._statistics: dict[bool, Callable] = {}
        self._model, self._loss_name, self._mesh = model, loss_name, mesh
        self.eval = parallel.data_parallel(
            functools.partial(eval_step, model=model, loss_name=loss_name),
            mesh, num_args=2, batch_args=(1,), shard_outputs=(False, True))
        # One program instead of an eagerly dispatched (and compiled) op per parameter
        # shape for Adam's zero moments, which is slow on CPU.
        self.create_state = jax.jit(functools.partial(create_train_state, tx=self.tx,
                                                      ema=ema_decay > 0))

    def batch_norm_statistics(self, freeze_encoder: bool) -> Callable:
        """`batch_norm_statistics_step` for all devices (compiled on first use: only
        precise BatchNorm needs it)."""
        if freeze_encoder not in self._statistics:
            model = self._model.clone(norm=functools.partial(self._model.norm, momentum=0.0))
            self._statistics[freeze_encoder] = parallel.data_parallel(
                functools.partial(batch_norm_statistics_step, model=model,
                                  freeze_encoder=freeze_encoder),
                self._mesh, num_args=5, batch_args=(1,), donate_args=(2,))
        return self._statistics[freeze_encoder]

    def train(self, freeze_encoder: bool) -> Callable:
        if freeze_encoder not in self._train:
            step = functools.partial(train_step, model=self._model, tx=self.tx,
                                     loss_name=self._loss_name, freeze_encoder=freeze_encoder,
                                     ema_decay=self._ema_decay)
            self._train[freeze_encoder] = parallel.data_parallel(
                step, self._mesh, num_args=3, batch_args=(1,), donate_args=(0,))
        return self._train[freeze_encoder]
