"""What a fold leaves for people to read: history, curves like the recipe's, TensorBoard."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def write_json(path: str | Path, payload: dict) -> None:
    """Writes through a temporary file so a reader never sees half a JSON document."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot_curves(history: dict[str, list[float]], path: str | Path, title: str) -> None:
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
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


class ScalarLog:
    """TensorBoard scalars, one event file per fold."""

    def __init__(self, log_dir: str | Path):
        import tensorflow as tf
        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(log_dir))

    def write(self, epoch: int, scalars: dict[str, float]) -> None:
        with self._writer.as_default():
            for name, value in scalars.items():
                self._tf.summary.scalar(name, value, step=epoch)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
