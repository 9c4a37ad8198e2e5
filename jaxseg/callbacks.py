"""Host-side epoch controllers with the decisions of the Keras callbacks the recipe used.

Plain Python on floats, driven once per epoch by the train loop, so tests can script
metric sequences against Keras without a model. What each carries from epoch to epoch
is a small dataclass of its own, which the fold's progress (`progress.FoldProgress`)
holds and its checkpoints save.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class PlateauState:
    best: float = math.inf
    wait: int = 0
    cooldown_counter: int = 0


@dataclasses.dataclass
class ReduceLROnPlateau:
    """tf.keras `ReduceLROnPlateau(mode='min')`: absolute `min_delta`, counter reset on cut."""
    factor: float = 0.1
    patience: int = 8
    min_lr: float = 1e-5
    min_delta: float = 1e-4
    cooldown: int = 0
    state: PlateauState = dataclasses.field(default_factory=PlateauState)

    def update(self, current: float, lr: float) -> float:
        """Returns the learning rate for the next epoch given this epoch's monitored value."""
        state = self.state
        if state.cooldown_counter > 0:
            state.cooldown_counter -= 1
            state.wait = 0
        if current < state.best - self.min_delta:
            state.best = current
            state.wait = 0
        elif state.cooldown_counter == 0:  # Keras checks again after the countdown
            state.wait += 1
            # Keras compares float32 learning rates: a rate already at min_lr stays.
            if state.wait >= self.patience and np.float32(lr) > np.float32(self.min_lr):
                lr = max(lr * self.factor, self.min_lr)
                state.cooldown_counter = self.cooldown
                state.wait = 0
        return lr


@dataclasses.dataclass
class EarlyStoppingState:
    best: float = -math.inf
    best_epoch: int = -1
    wait: int = 0


@dataclasses.dataclass
class EarlyStopping:
    """tf.keras `EarlyStopping(mode='max', min_delta=0)` on the validation Dice.

    `update` answers whether this epoch is the new best (the caller saves the best
    checkpoint, which also serves `restore_best_weights`) and whether to stop.
    Keras counts `wait` before the improvement test and never stops after epoch 0.
    """
    patience: int = 15
    min_delta: float = 0.0
    state: EarlyStoppingState = dataclasses.field(default_factory=EarlyStoppingState)

    def update(self, epoch: int, current: float) -> tuple[bool, bool]:
        """Returns (improved, stop) for 0-based `epoch`."""
        state = self.state
        state.wait += 1
        if current - self.min_delta > state.best:
            state.best = current
            state.best_epoch = epoch
            state.wait = 0
            return True, False
        return False, state.wait >= self.patience and epoch > 0
