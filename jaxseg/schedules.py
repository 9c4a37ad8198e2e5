"""The learning rate of each train step.

'plateau' is the recipe's: one rate an epoch, which ReduceLROnPlateau cuts when the
validation loss stalls. 'cosine' (`config.lr_schedule`) is a linear warm-up from 0 to
`config.learning_rate` over `config.warmup_epochs`, then half a cosine down to
`config.min_learning_rate` at the end of `config.epochs`, as several of the best HuBMAP
solutions trained; the plateau controller then stays out of it.

The host works out every step's rate and hands it to the step as an argument, so one
compiled program serves every rate. A cosine rate depends only on the step's place in
the run, so a resumed run continues the schedule exactly where it stopped.
"""
from __future__ import annotations

import math

import ml_collections
import numpy as np

SCHEDULES = ("plateau", "cosine")


def warmup_cosine(step: int, *, peak: float, end: float, warmup_steps: int,
                  total_steps: int) -> float:
    """optax.warmup_cosine_decay_schedule(0, peak, warmup_steps, total_steps, end) at
    `step`, in host arithmetic: a call per step costs no device dispatch."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    if step >= total_steps:
        return end
    done = (step - warmup_steps) / (total_steps - warmup_steps)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * done))


def cosine_rate(config: ml_collections.ConfigDict, step: int, steps_per_epoch: int) -> float:
    """The 'cosine' schedule's rate at `step` of the run (0-based, over all epochs)."""
    return warmup_cosine(step, peak=config.learning_rate, end=config.min_learning_rate,
                         warmup_steps=round(config.warmup_epochs * steps_per_epoch),
                         total_steps=config.epochs * steps_per_epoch)


def epoch_learning_rates(config: ml_collections.ConfigDict, epoch: int, steps_per_epoch: int,
                         plateau_lr: float) -> np.ndarray:
    """The rate of each step of 0-based `epoch`: `plateau_lr`, the rate ReduceLROnPlateau
    left, throughout under 'plateau'; the schedule's under 'cosine'."""
    if config.lr_schedule == "plateau":
        return np.full(steps_per_epoch, plateau_lr)
    first = epoch * steps_per_epoch
    return np.array([cosine_rate(config, step, steps_per_epoch)
                     for step in range(first, first + steps_per_epoch)])
