"""The best checkpoint survives a kill at every phase of every save of `best/` and `latest/`.

Each attempt of the fake fold (`checkpoint_kills`) runs in a process forked from a server
that has imported orbax and JAX once, so two dozen killed attempts cost seconds. After
each kill the disk must still hold the best model of the loop state a rerun resumes from,
and after the rerun `best/` must hold exactly the best epoch of the run as it went,
even where the repeated epoch does not improve again (its Dice differs on the rerun, as
it does when the data order is not deterministic).
"""
from __future__ import annotations

import json
import multiprocessing
import signal

import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint import checkpoint_manager

import checkpoint_kills
from jaxseg import checkpoints

FIRST_ATTEMPT = [0.5, 0.6, 0.7]      # every epoch improves: every save deletes its predecessor
RERUN = [0.4, 0.45, 0.55]           # every repeated epoch worse than on the first attempt


@pytest.fixture(scope="module")
def killed_attempt():
    """Runs `checkpoint_kills.run_watched` in a process forked from a server that has
    imported JAX and orbax once; returns its exit status."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["jax", "orbax.checkpoint"])

    def attempt(*args) -> int:
        process = context.Process(target=checkpoint_kills.run_watched, args=args)
        process.start()
        process.join()
        return process.exitcode

    return attempt


@pytest.fixture(scope="module")
def save_events(killed_attempt, tmp_path_factory) -> list[tuple[str, str, int]]:
    """Every commit and deletion of an uninterrupted run, in order."""
    root = tmp_path_factory.mktemp("reference")
    assert killed_attempt(str(root / "fold"), FIRST_ATTEMPT, None,
                          str(root / "events.json")) == 0
    events = [tuple(event) for event in json.loads((root / "events.json").read_text())]
    for directory in ("best", "latest"):
        assert [step for event, where, step in events
                if (event, where) == ("commit", directory)] == [1, 2, 3]
        assert [step for event, where, step in events
                if (event, where) == ("delete", directory)] == [1, 2]
    return events


def _steps(directory) -> list[int]:
    return sorted(ocp.utils.checkpoint_steps(directory)) if directory.exists() else []


def _variables(best_dir, step: int) -> dict:
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(best_dir / str(step) / checkpoint_manager.DEFAULT_ITEM_NAME)


def test_best_is_never_lost_or_regressed_by_a_kill_at_any_save_phase(killed_attempt,
                                                                    save_events, tmp_path):
    kill_points = [(*save_events[0], "before")] + [
        (*event, moment) for event in save_events
        for moment in ("during", "after")[event[0] == "commit":]]
    assert len(kill_points) == 1 + len(save_events) + 4
    for number, kill_at in enumerate(kill_points):
        fold = tmp_path / str(number)
        assert killed_attempt(str(fold), FIRST_ATTEMPT, kill_at) == -signal.SIGKILL, kill_at
        epochs_done = max(_steps(fold / "latest"), default=0)
        resumed_best = checkpoint_kills.best_epoch(FIRST_ATTEMPT[:epochs_done])
        if resumed_best is not None:      # the best model the resumed loop state names
            assert resumed_best + 1 in _steps(fold / "best"), kill_at
            assert _variables(fold / "best", resumed_best + 1)["w"].tolist() == \
                [resumed_best] * 4, kill_at

        checkpoint_kills.run_fold(str(fold), RERUN)
        final_best = checkpoint_kills.best_epoch(FIRST_ATTEMPT[:epochs_done]
                                                 + RERUN[epochs_done:])
        assert _steps(fold / "best") == [final_best + 1], kill_at
        assert checkpoints.load_best_variables(fold)["w"].tolist() == [final_best] * 4, kill_at
