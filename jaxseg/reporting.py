"""What a fold leaves for people to read: history, curves like the recipe's, TensorBoard."""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import Iterator

import jax
import numpy as np

from jaxseg import paths

# What jax.monitoring calls one XLA compilation (jax._src.dispatch.BACKEND_COMPILE_EVENT);
# its listeners get the program's name as `fun_name`.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# A program read back from the persistent compilation cache instead (no name given).
CACHE_RETRIEVAL_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"
CACHE_RETRIEVALS = "read from the compilation cache"


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Written whole or not at all, so a reader never sees half a JSON document."""
    paths.atomic_write(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def compile_log() -> Iterator[dict[str, list[float]]]:
    """Seconds of each XLA compilation inside the block, by program name: a run reports
    them so that compile time is known and a program compiling again (per fold, after a
    shape change) shows instead of silently costing minutes. A program read back from
    the persistent compilation cache counts its reading time, and is listed under
    CACHE_RETRIEVALS as well."""
    seconds: dict[str, list[float]] = collections.defaultdict(list)

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            seconds[str(kwargs.get("fun_name", "unnamed"))].append(round(duration, 2))
        elif event == CACHE_RETRIEVAL_EVENT:
            seconds[CACHE_RETRIEVALS].append(round(duration, 2))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seconds
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


STEP_PROGRAMS = ("jit(train_step)", "jit(eval_step)", "jit(create_train_state)")


def summarize_compiles(compile_seconds: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each step program's compilations (one each for a whole run of folds, two for the
    train step when the encoder is frozen for some epochs), and all other small programs
    together; and the programs read back from the compilation cache."""
    named = (*STEP_PROGRAMS, CACHE_RETRIEVALS)
    summary = {name: compile_seconds[name] for name in named if name in compile_seconds}
    summary["other"] = [round(sum(sum(seconds) for name, seconds in compile_seconds.items()
                                  if name not in named), 2)]
    return summary


def plot_curves(history: dict[str, list[float]], path: str | os.PathLike, title: str) -> None:
    """The recipe's figure: train/val Dice on the left axis, losses on the right, with the
    best validation Dice and the lowest validation loss marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.asarray(history["epoch"])
    fig, dice_axis = plt.subplots(figsize=(15, 5))
    dice_axis.plot(epochs, history["dice_coe"], "-o", label="Train dice_coe", color="#ff7f0e")
    dice_axis.plot(epochs, history["val_dice_coe"], "-o", label="Val dice_coe", color="#1f77b4")
    best = int(np.argmax(history["val_dice_coe"]))
    dice_axis.scatter(epochs[best], history["val_dice_coe"][best], s=200, color="#1f77b4")
    dice_axis.annotate(f"max val dice_coe\n{history['val_dice_coe'][best]:.3f}",
                       (epochs[best], history["val_dice_coe"][best]),
                       textcoords="offset points", xytext=(-20, -45), size=12)
    dice_axis.set_xlabel("Epoch", size=14)
    dice_axis.set_ylabel("dice_coe", size=14)
    dice_axis.legend(loc=2)
    loss_axis = dice_axis.twinx()
    loss_axis.plot(epochs, history["loss"], "-o", label="Train loss", color="#2ca02c")
    loss_axis.plot(epochs, history["val_loss"], "-o", label="Val loss", color="#d62728")
    lowest = int(np.argmin(history["val_loss"]))
    loss_axis.scatter(epochs[lowest], history["val_loss"][lowest], s=200, color="#d62728")
    loss_axis.set_ylabel("Loss", size=14)
    loss_axis.legend(loc=3)
    plt.title(title)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    paths.atomic_write(path, png.getvalue())


class ScalarLog:
    """TensorBoard scalars, one event file per fold (and per resumed attempt).

    tf.summary writes through TensorFlow's own file systems, whose GCS endpoint cannot
    be changed; for a bucket the events are written to a local temporary directory and
    uploaded whole after every epoch (a few hundred bytes each).
    """

    def __init__(self, log_dir: str | os.PathLike):
        import tensorflow as tf
        self._tf = tf
        self._log_dir = paths.path(log_dir)
        self._staging = tempfile.mkdtemp(prefix="jaxseg-events-") if paths.is_remote(
            self._log_dir) else None
        self._writer = tf.summary.create_file_writer(self._staging or os.fspath(log_dir))

    def write(self, epoch: int, scalars: dict[str, float]) -> None:
        with self._writer.as_default():
            for name, value in scalars.items():
                self._tf.summary.scalar(name, value, step=epoch)
        self._writer.flush()
        self._upload()

    def close(self) -> None:
        self._writer.close()
        self._upload()
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)

    def _upload(self) -> None:
        if self._staging:
            for name in os.listdir(self._staging):
                paths.publish(os.path.join(self._staging, name), self._log_dir / name)
