"""What a fold leaves for people to read: history, curves like the recipe's, TensorBoard."""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable, Iterator

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


STEP_PROGRAMS = ("jit(train_step)", "jit(eval_step)", "jit(create_train_state)",
                 "jit(batch_norm_statistics_step)")


def summarize_compiles(compile_seconds: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each step program's compilations (one each for a whole run of folds, two for the
    train step when the encoder is frozen for some epochs), and all other small programs
    together; and the programs read back from the compilation cache."""
    named = (*STEP_PROGRAMS, CACHE_RETRIEVALS)
    summary = {name: compile_seconds[name] for name in named if name in compile_seconds}
    summary["other"] = [round(sum(sum(seconds) for name, seconds in compile_seconds.items()
                                  if name not in named), 2)]
    return summary


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 45s, 12m30s, 3h05m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class RunClock:
    """The pace of the run's epochs so far, for the time left in the fold and the run.

    The first epoch a process runs also compiles the steps, so the pace is the median of
    the later epochs once there are any. Early stopping can end a fold sooner: the
    estimates are what is left at most.
    """

    def __init__(self, epochs_left: int):
        self.epochs_left = epochs_left
        self._epoch_seconds: list[float] = []

    def skip(self, epochs: int) -> None:
        """Epochs that will not run: done by an earlier attempt, or cut by early stopping."""
        self.epochs_left -= epochs

    def epoch_done(self, seconds: float) -> None:
        self._epoch_seconds.append(seconds)
        self.epochs_left -= 1

    def time_left(self, epochs_left_in_fold: int) -> str:
        pace = statistics.median(self._epoch_seconds[1:] or self._epoch_seconds)
        return (f"ETA fold {duration(pace * epochs_left_in_fold)}, "
                f"run {duration(pace * self.epochs_left)}")


class FirstCompile:
    """Says that a step program is compiling before its first call (a minute or more for
    a large model: a silent wait looks like a hang), how long the same program took to
    compile last time, and afterwards how long it took now. The last time is kept beside
    the persistent compilation cache, whose hits take seconds."""

    def __init__(self, what: str, key: str, say: Callable[[str], None], remember: bool):
        self._what, self._key, self._say, self._remember = what, key, say, remember
        self.done = False
        self._untaken_seconds = 0.0

    def compile(self, program: Any, *args: Any) -> None:
        """Compiles `program` for `args` ahead of its first call, which then finds it in
        jit's own cache."""
        if self.done:
            return
        from jaxseg import compile_cache

        last = compile_cache.remembered_seconds(self._key)
        self._say(f"compiling the {self._what}"
                  + (f" (last compile: {duration(last)})" if last else "") + " ...")
        started = time.perf_counter()
        with compile_log() as seconds:
            program.lower(*args).compile()
        took = time.perf_counter() - started
        cached = CACHE_RETRIEVALS in seconds and not any(
            name != CACHE_RETRIEVALS for name in seconds)
        self._say(f"{self._what} ready in {duration(took)}"
                  + (" (read from the compilation cache)" if cached else ""))
        if self._remember and not cached:
            compile_cache.remember_seconds(self._key, took)
        self.done = True
        self._untaken_seconds = took

    def take_seconds(self) -> float:
        """Seconds spent compiling since the last call: an epoch's images/s leaves them out."""
        seconds, self._untaken_seconds = self._untaken_seconds, 0.0
        return seconds


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


class TensorBoardLog:
    """TensorBoard scalars and images, one event file per fold (and per resumed attempt).

    tf.summary writes through TensorFlow's own file systems, whose GCS endpoint cannot
    be changed; for a bucket the events are written to a local temporary directory and
    uploaded whole after every epoch.
    """

    def __init__(self, log_dir: str | os.PathLike):
        import tensorflow as tf
        self._tf = tf
        self._log_dir = paths.path(log_dir)
        self._staging = tempfile.mkdtemp(prefix="jaxseg-events-") if paths.is_remote(
            self._log_dir) else None
        self._writer = tf.summary.create_file_writer(self._staging or os.fspath(log_dir))

    def write(self, epoch: int, scalars: dict[str, float],
              images: dict[str, np.ndarray] | None = None) -> None:
        """Scalars, and (N, H, W, 3) uint8 image batches, under their names."""
        with self._writer.as_default():
            for name, value in scalars.items():
                self._tf.summary.scalar(name, value, step=epoch)
            for name, batch in (images or {}).items():
                if len(batch):
                    self._tf.summary.image(name, batch, step=epoch, max_outputs=len(batch))
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


def prediction_panels(batch: dict[str, jax.Array], probabilities: jax.Array,
                      count: int) -> np.ndarray:
    """Up to `count` real examples of a validation batch, from this process's rows, as
    image | truth | predicted probability strips: uint8 (n, H, 3W, 3) for TensorBoard."""
    images, masks, weights, predicted = (local_rows(array) for array in (
        batch["image"], batch["mask"], batch["weight"], probabilities))
    shown = np.flatnonzero(weights > 0)[:count]
    greys = [np.repeat(grey[shown], 3, axis=-1) for grey in (masks * np.uint8(255), predicted)]
    return np.concatenate([images[shown], *greys], axis=2)


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of an array split along its first axis, in order."""
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data) for shard in shards])
