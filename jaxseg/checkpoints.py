"""Per-fold orbax checkpoints: the best model by validation Dice, and the latest state.

`best/` holds only the model variables of the best epoch (the recipe's ModelCheckpoint
with save_best_only, and what EarlyStopping's restore_best_weights restores); `latest/`
holds the whole train state plus the fold loop's state (`progress.FoldProgress` as
JSON), so a killed run resumes at the next epoch; `preempted/` holds the same at the
step where a preemption notice stopped the run, so a preempted run resumes at the next
step. Orbax writes each step into a temporary directory and renames it when complete,
so a kill during a save leaves the previous checkpoint usable; the temporary
directories such a kill leaves are removed when the fold resumes.

A best checkpoint is deleted only once a newer one is covered by a committed latest
checkpoint. A run killed between a new best and its epoch's latest resumes from the
previous latest, whose loop state names the previous best: that one must still be on
disk, since the repeated epoch may not improve again.

Checkpoints hold host (numpy) copies of the replicated state: orbax would otherwise
slice every replicated array across the devices to write the replicas in parallel,
which compiles one small program per array shape, slowly on CPU.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_manager

from jaxseg import cli, paths

BEST_METRIC = "val_dice_coe"
# Written by jaxseg.train as a fold's last file, once its training has ended.
FOLD_RESULT = "result.json"


class FoldCheckpoints:
    def __init__(self, fold_dir: str | os.PathLike):
        self.fold_dir = fold_dir = paths.absolute(fold_dir)
        # No max_to_keep: orbax would delete the previous best as soon as the new one is
        # written (see _drop_superseded_best). best_fn makes it store the metrics.
        self._best = ocp.CheckpointManager(
            fold_dir / "best",
            options=ocp.CheckpointManagerOptions(
                best_fn=lambda metrics: metrics[BEST_METRIC], best_mode="max",
                cleanup_tmp_directories=True))
        self._latest, self._preempted = (
            ocp.CheckpointManager(fold_dir / name, options=ocp.CheckpointManagerOptions(
                max_to_keep=1, cleanup_tmp_directories=True))
            for name in ("latest", "preempted"))

    def save_best(self, epoch: int, variables: dict, metrics: dict[str, float]) -> None:
        self._drop_superseded_best()
        self._best.save(epoch + 1, args=ocp.args.StandardSave(jax.device_get(variables)),
                        metrics={k: float(v) for k, v in metrics.items()})

    def save_latest(self, epochs_done: int, state: Any, host_state: dict) -> None:
        """`host_state` is the fold's progress as JSON (`progress.FoldProgress.to_json`).

        A preemption checkpoint, older than this epoch's end once it is on disk, goes.
        """
        self._best.wait_until_finished()
        self._latest.save(epochs_done, args=_state_args(state, host_state))
        if self._preempted.all_steps():
            self._latest.wait_until_finished()
            for step in self._preempted.all_steps():
                self._preempted.delete(step)

    def save_preempted(self, train_step: int, state: Any, host_state: dict) -> None:
        """The state at a step inside an epoch; `host_state` also says how far the epoch
        got. Finished before returning: the process exits next."""
        self._best.wait_until_finished()
        self._latest.wait_until_finished()
        self._preempted.save(train_step, args=_state_args(state, host_state))
        self._preempted.wait_until_finished()

    def resume_point(self) -> ResumePoint:
        """Where a resumed fold starts, read from the files (by process 0, which decides
        for all): the preemption checkpoint when one was saved after the latest epoch's
        end, else the latest.

        A best checkpoint newer than the latest state was written by an epoch that was
        killed before its latest save; the resumed run repeats that epoch, so the stale
        best is dropped rather than left to clash with (or outrank) the repeated one.
        """
        epochs_done = self._latest.latest_step()
        stale = [step for step in self._best.all_steps() if step > (epochs_done or 0)]
        preempted_step = self._preempted.latest_step()
        if preempted_step is not None:
            return ResumePoint("preempted", preempted_step, stale)
        return ResumePoint("latest" if epochs_done is not None else None, epochs_done, stale)

    def restore(self, point: ResumePoint, host_template: Any) -> tuple[Any, dict] | None:
        """The state at `point` as host arrays shaped like `host_template`, and the host
        loop state; None on a fresh fold. Every process calls it (orbax synchronises
        them)."""
        for step in point.stale_best_steps:
            self._best.delete(step)
        self._drop_superseded_best()
        if point.kind is None:
            return None
        manager = self._preempted if point.kind == "preempted" else self._latest
        restored = manager.restore(point.step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(host_template), host=ocp.args.JsonRestore()))
        return restored.state, restored.host

    def _drop_superseded_best(self) -> None:
        """Deletes the best checkpoints older than the newest one at or before the
        committed latest epoch; newer ones are kept until a latest checkpoint covers
        them (or a resume finds them stale)."""
        self._latest.wait_until_finished()
        epochs_done = self._latest.latest_step() or 0
        covered = sorted(step for step in self._best.all_steps() if step <= epochs_done)
        for step in covered[:-1]:
            self._best.delete(step)

    def close(self) -> None:
        self._best.wait_until_finished()
        self._drop_superseded_best()
        for manager in (self._best, self._latest, self._preempted):
            manager.wait_until_finished()
            manager.close()


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a fold resumes from (`kind` 'latest' or 'preempted', None on a
    fresh fold) and the best checkpoints to drop first."""
    kind: str | None
    step: int | None
    stale_best_steps: list[int]


def _state_args(state: Any, host_state: dict) -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.StandardSave(jax.device_get(state)),
                              host=ocp.args.JsonSave(host_state))


def has_latest(fold_dir: str | os.PathLike) -> bool:
    """Whether the fold holds a complete latest or preemption checkpoint (what a kill
    mid-save leaves does not count)."""
    return any(ocp.utils.checkpoint_steps(paths.absolute(fold_dir) / name)
               for name in ("latest", "preempted"))


def fold_finished(fold_dir: str | os.PathLike) -> bool:
    """Whether the fold's training ended; until then its best checkpoint is a model
    still being trained (or left by a run that stopped)."""
    return (paths.path(fold_dir) / FOLD_RESULT).exists()


def load_best_variables(fold_dir: str | os.PathLike) -> dict:
    """The best model variables of a finished fold, as host arrays (for prediction).

    The newest step is the best: one is only saved when the validation Dice improves
    (an older one lingers where a kill cut the fold's last clean-up short). Read without
    a CheckpointManager, whose read-only mode logs three warnings per fold.
    """
    best_dir = paths.absolute(fold_dir) / "best"
    if not best_dir.is_dir():
        raise cli.MissingInput(f"{fold_dir}: no best checkpoint (expected {best_dir})")
    saved_steps = ocp.utils.checkpoint_steps(best_dir)
    if not saved_steps:
        raise cli.MissingInput(f"{best_dir}: holds no finished checkpoint")
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(
            best_dir / str(max(saved_steps)) / checkpoint_manager.DEFAULT_ITEM_NAME)
    return jax.tree.map(jax.device_get, variables)
