"""Host-side epoch controllers with the decisions of the Keras callbacks the recipe used.

Plain Python on floats, driven once per epoch by the train loop, so tests can script
metric sequences against Keras without a model, and the state is a small dict that the
latest checkpoint carries across preemptions.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class ReduceLROnPlateau:
    """tf.keras `ReduceLROnPlateau(mode='min')`: absolute `min_delta`, counter reset on cut."""
    factor: float = 0.1
    patience: int = 8
    min_lr: float = 1e-5
    min_delta: float = 1e-4
    cooldown: int = 0
    best: float = math.inf
    wait: int = 0
    cooldown_counter: int = 0

    def update(self, current: float, lr: float) -> float:
        """Returns the learning rate for the next epoch given this epoch's monitored value."""
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if current < self.best - self.min_delta:
            self.best = current
            self.wait = 0
        elif self.cooldown_counter == 0:  # Keras checks again after the countdown
            self.wait += 1
            # Keras compares float32 learning rates: a rate already at min_lr stays.
            if self.wait >= self.patience and np.float32(lr) > np.float32(self.min_lr):
                lr = max(lr * self.factor, self.min_lr)
                self.cooldown_counter = self.cooldown
                self.wait = 0
        return lr

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best"])
        self.wait = int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])


@dataclasses.dataclass
class EarlyStopping:
    """tf.keras `EarlyStopping(mode='max', min_delta=0)` on the validation Dice.

    `update` answers whether this epoch is the new best (the caller saves the best
    checkpoint, which also serves `restore_best_weights`) and whether to stop.
    Keras counts `wait` before the improvement test and never stops after epoch 0.
    """
    patience: int = 15
    min_delta: float = 0.0
    best: float = -math.inf
    best_epoch: int = -1
    wait: int = 0

    def update(self, epoch: int, current: float) -> tuple[bool, bool]:
        """Returns (improved, stop) for 0-based `epoch`."""
        self.wait += 1
        if current - self.min_delta > self.best:
            self.best = current
            self.best_epoch = epoch
            self.wait = 0
            return True, False
        return False, self.wait >= self.patience and epoch > 0

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.wait = int(state["wait"])
