"""The fold loop's state survives its checkpoint's JSON, including one saved before
`FoldProgress` existed; a loop state this version cannot read is one line of error."""
import dataclasses
import math

import pytest

from jaxseg import cli
from jaxseg.callbacks import EarlyStopping, ReduceLROnPlateau
from jaxseg.progress import HISTORY_KEYS, FoldProgress

# The loop state train.py checkpointed as a dict before FoldProgress.
EARLIER_LOOP_STATE = {
    "epochs_done": 2, "history": {key: [1.0, 2.0] for key in HISTORY_KEYS}, "lr": 1e-4,
    "stopped": False, "elapsed_s": 12.5,
    "plateau": {"best": 0.4, "wait": 1, "cooldown_counter": 0},
    "early_stopping": {"best": 0.7, "best_epoch": 1, "wait": 0},
    "num_val_examples": 16, "epoch_steps_done": 3,
    "epoch_totals": {"loss": 1.5, "dice_coe": 0.9, "accuracy": 2.7},
}


def test_progress_round_trips_and_reads_what_earlier_versions_saved():
    progress = FoldProgress.from_json(EARLIER_LOOP_STATE, "fold_0/latest")
    assert progress.to_json() == EARLIER_LOOP_STATE
    assert (progress.plateau.wait, progress.early_stopping.best_epoch) == (1, 1)
    assert progress.epoch.steps_done == 3


def test_the_callbacks_update_the_progress_they_are_given():
    progress = FoldProgress(lr=1e-3)
    plateau = ReduceLROnPlateau(patience=1, state=progress.plateau)
    early_stopping = EarlyStopping(patience=1, state=progress.early_stopping)
    plateau.update(0.5, progress.lr)
    early_stopping.update(0, 0.8)
    resumed = FoldProgress.from_json(progress.to_json(), "fold_0/latest")
    assert dataclasses.asdict(resumed.plateau) == {"best": 0.5, "wait": 0,
                                                   "cooldown_counter": 0}
    assert resumed.early_stopping.best == 0.8 and not math.isinf(resumed.plateau.best)


def test_a_loop_state_this_version_cannot_read_names_the_checkpoint():
    unreadable = {key: value for key, value in EARLIER_LOOP_STATE.items() if key != "plateau"}
    with pytest.raises(cli.InputError, match="^fold_0/latest: its loop state is not one"):
        FoldProgress.from_json(unreadable, "fold_0/latest")

