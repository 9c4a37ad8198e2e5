"""A fold's checkpoints saved as jaxseg.train saves them, and SIGKILLed at a chosen moment
of a save: test_checkpoints runs each killed attempt in a process of its own.

The fake fold trains `len(dices)` epochs; epoch e's "model" is {'w': [e, e, e, e]} and its
validation Dice is dices[e]. Like `train.train_fold`, an epoch saves `best/` when its Dice
improves on the best so far, then `latest/` with the loop state (epochs done, best epoch),
and a rerun resumes from `latest/`.

A kill point is (event, directory, step, moment): event 'commit' (orbax renaming the
step's temporary directory into place) or 'delete' (orbax removing a step), in `best/` or
`latest/`; moment 'before' or 'after' the event, or 'during' a deletion (one file gone).
The moment before an event is the moment after the one before it.
"""
from __future__ import annotations

import functools
import json
import os
import signal
from typing import Callable

import numpy as np
from orbax.checkpoint._src.path import deleter

from jaxseg import checkpoints

WATCHED = ("best", "latest")
KillPoint = tuple[str, str, int, str]


def model_of(epoch: int) -> dict:
    return {"w": np.full(4, float(epoch), np.float32)}


def best_epoch(dices: list[float]) -> int | None:
    """The epoch EarlyStopping calls best: the first to reach the highest Dice."""
    return int(np.argmax(dices)) if dices else None


def run_fold(fold_dir: str, dices: list[float]) -> None:
    """Trains the fake fold from wherever its checkpoints stand to the last epoch."""
    ckpt = checkpoints.FoldCheckpoints(fold_dir)
    restored = ckpt.restore(ckpt.resume_point(), model_of(0))
    loop = restored[1] if restored else {"epochs_done": 0, "best_dice": -1.0,
                                          "best_epoch": None}
    for epoch in range(loop["epochs_done"], len(dices)):
        if dices[epoch] > loop["best_dice"]:
            loop.update(best_dice=dices[epoch], best_epoch=epoch)
            ckpt.save_best(epoch, model_of(epoch), {checkpoints.BEST_METRIC: dices[epoch]})
        loop["epochs_done"] = epoch + 1
        ckpt.save_latest(epoch + 1, model_of(epoch), dict(loop))
    ckpt.close()


def run_watched(fold_dir: str, dices: list[float], kill_at: KillPoint | None = None,
                events_file: str | None = None) -> None:
    """`run_fold` in a process of its own. `kill_at`: SIGKILL the process there.
    `events_file`: where to write the (event, directory, step) of every commit and
    deletion, in order, as JSON, when the run ends."""
    events: list[list] = []
    _watch_saves(functools.partial(_on_event, events=events, kill_at=kill_at))
    run_fold(fold_dir, dices)
    if events_file:
        with open(events_file, "w") as file:
            json.dump(events, file)


def _on_event(event: str, step: tuple[str, int], moment: str, *, events: list,
              kill_at: KillPoint | None) -> None:
    if moment == "before":
        events.append([event, *step])
    if kill_at == (event, *step, moment):
        os.kill(os.getpid(), signal.SIGKILL)


def _watched_step(path: str | os.PathLike) -> tuple[str, int] | None:
    """(directory, step) of a step of `best/` or `latest/`; None for anything else (an
    item inside a step, the preemption checkpoints)."""
    directory, name = os.path.split(os.fspath(path))
    if os.path.basename(directory) in WATCHED and name.isdigit():
        return os.path.basename(directory), int(name)
    return None


def _watch_saves(on_event: Callable[[str, tuple[str, int], str], None]) -> None:
    """Calls `on_event(event, (directory, step), moment)` around orbax's commits and
    deletions of steps of `best/` and `latest/`."""
    rename = os.rename

    def watched_rename(source, destination, *args, **kwargs):
        step = _watched_step(destination)
        if step is None or "orbax-checkpoint-tmp" not in os.fspath(source):
            return rename(source, destination, *args, **kwargs)
        on_event("commit", step, "before")
        rename(source, destination, *args, **kwargs)
        on_event("commit", step, "after")

    delete = deleter.PathDeleter.delete

    def watched_delete(self, path, **kwargs):
        step = _watched_step(path)
        if step is None:
            return delete(self, path, **kwargs)
        on_event("delete", step, "before")
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                       for name in names)
        os.unlink(files[0])
        on_event("delete", step, "during")
        delete(self, path, **kwargs)
        on_event("delete", step, "after")

    os.rename = watched_rename
    deleter.PathDeleter.delete = watched_delete
