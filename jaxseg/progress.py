"""How far a fold's training got: what its checkpoints carry besides the train state.

`FoldProgress` is the fold loop's state (epochs done, learning rate, history, the
plateau and early-stopping counters, how far the current epoch got); the loop reads and
updates it, and `latest/` and `preempted/` checkpoints save it as JSON, so a resumed
fold continues exactly where the saved one stood.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from jaxseg import cli
from jaxseg.callbacks import EarlyStoppingState, PlateauState

TRAIN_METRICS = ("loss", "dice_coe", "accuracy")
HISTORY_KEYS = ("epoch", "loss", "dice_coe", "accuracy", "val_loss", "val_dice_coe",
                "val_accuracy", "val_per_image_dice", "lr")


@dataclasses.dataclass
class EpochProgress:
    """How far an epoch got: what a preemption checkpoint keeps to resume inside it."""
    steps_done: int = 0
    totals: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(TRAIN_METRICS, 0.0))

    def means(self, steps_per_epoch: int) -> dict[str, float]:
        return {name: total / max(steps_per_epoch, 1) for name, total in self.totals.items()}


@dataclasses.dataclass
class FoldProgress:
    lr: float
    epochs_done: int = 0
    stopped: bool = False
    elapsed_s: float = 0.0
    num_val_examples: int = 0
    history: dict[str, list] = dataclasses.field(
        default_factory=lambda: {key: [] for key in HISTORY_KEYS})
    plateau: PlateauState = dataclasses.field(default_factory=PlateauState)
    early_stopping: EarlyStoppingState = dataclasses.field(default_factory=EarlyStoppingState)
    epoch: EpochProgress = dataclasses.field(default_factory=EpochProgress)

    def to_json(self) -> dict[str, Any]:
        """The checkpointed form, in the layout checkpoints had before this class, so
        that a run saved by an earlier version resumes."""
        return {"epochs_done": self.epochs_done, "history": self.history, "lr": self.lr,
                "stopped": self.stopped, "elapsed_s": self.elapsed_s,
                "num_val_examples": self.num_val_examples,
                "plateau": dataclasses.asdict(self.plateau),
                "early_stopping": dataclasses.asdict(self.early_stopping),
                "epoch_steps_done": self.epoch.steps_done, "epoch_totals": self.epoch.totals}

    @classmethod
    def from_json(cls, saved: dict[str, Any], checkpoint: str | os.PathLike) -> FoldProgress:
        """The progress `to_json` saved in `checkpoint`; a checkpoint without the fields
        this version reads is refused by name rather than resumed half-understood."""
        try:
            return cls(lr=float(saved["lr"]), epochs_done=int(saved["epochs_done"]),
                       stopped=bool(saved["stopped"]), elapsed_s=float(saved["elapsed_s"]),
                       num_val_examples=int(saved["num_val_examples"]),
                       history={**{key: list(saved["history"][key]) for key in HISTORY_KEYS},
                                **{key: list(values) for key, values
                                   in saved["history"].items()}},
                       plateau=PlateauState(**saved["plateau"]),
                       early_stopping=EarlyStoppingState(**saved["early_stopping"]),
                       epoch=EpochProgress(int(saved.get("epoch_steps_done", 0)),
                                           saved.get("epoch_totals")
                                           or dict.fromkeys(TRAIN_METRICS, 0.0)))
        except (KeyError, TypeError, ValueError) as error:
            raise cli.InputError(f"{checkpoint}: its loop state is not one this version of "
                                 f"jaxseg reads ({type(error).__name__}: {error}); resume it "
                                 "with the version that wrote it, or use another --workdir"
                                 ) from None
