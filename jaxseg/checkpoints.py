"""Per-fold orbax checkpoints: the best model by validation Dice, and the latest state.

`best/` holds only the model variables of the best epoch (the recipe's ModelCheckpoint
with save_best_only, and what EarlyStopping's restore_best_weights restores); `latest/`
holds the whole train state plus the host-side loop state, so a preempted run resumes
at the next epoch. Orbax writes each step into a temporary directory and renames it
when complete, so a kill during a save leaves the previous checkpoint usable; the
temporary directories such a kill leaves are removed when the fold resumes.

Checkpoints hold host (numpy) copies of the replicated state: orbax would otherwise
slice every replicated array across the devices to write the replicas in parallel,
which compiles one small program per array shape (a minute per process on CPU).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_manager

from jaxseg import paths

BEST_METRIC = "val_dice_coe"


class FoldCheckpoints:
    def __init__(self, fold_dir: str | os.PathLike):
        fold_dir = paths.absolute(fold_dir)
        self._best = ocp.CheckpointManager(
            fold_dir / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda metrics: metrics[BEST_METRIC], best_mode="max",
                cleanup_tmp_directories=True))
        self._latest = ocp.CheckpointManager(
            fold_dir / "latest",
            options=ocp.CheckpointManagerOptions(max_to_keep=1, cleanup_tmp_directories=True))

    def save_best(self, epoch: int, variables: dict, metrics: dict[str, float]) -> None:
        self._best.save(epoch + 1, args=ocp.args.StandardSave(jax.device_get(variables)),
                        metrics={k: float(v) for k, v in metrics.items()})

    def save_latest(self, epochs_done: int, state: Any, host_state: dict) -> None:
        """`host_state` is JSON: history, callback states, learning rate, elapsed time."""
        self._best.wait_until_finished()
        self._latest.save(epochs_done, args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.device_get(state)),
            host=ocp.args.JsonSave(host_state)))

    def restore_latest(self, host_template: Any) -> tuple[Any, dict] | None:
        """The last saved state as host arrays shaped like `host_template`, and the host
        loop state; None on a fresh fold.

        A best checkpoint newer than the latest state was written by an epoch that was
        killed before its latest save; the resumed run repeats that epoch, so the stale
        best is dropped rather than left to clash with (or outrank) the repeated one.
        """
        step = self._latest.latest_step()
        for best_step in self._best.all_steps():
            if best_step > (step or 0):
                self._best.delete(best_step)
        if step is None:
            return None
        restored = self._latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(host_template), host=ocp.args.JsonRestore()))
        return restored.state, restored.host

    def close(self) -> None:
        self._best.wait_until_finished()
        self._latest.wait_until_finished()
        self._best.close()
        self._latest.close()


def has_latest(fold_dir: str | os.PathLike) -> bool:
    """Whether the fold holds a complete latest checkpoint (what a kill mid-save leaves
    does not count)."""
    return bool(ocp.utils.checkpoint_steps(paths.absolute(fold_dir) / "latest"))


def load_best_variables(fold_dir: str | os.PathLike) -> dict:
    """The best model variables of a finished fold, as host arrays (for prediction).

    The newest step is the best: one is only saved when the validation Dice improves
    (an older one may linger if a kill cut its deletion short). Read without a
    CheckpointManager, whose read-only mode logs three warnings per fold.
    """
    best_dir = paths.absolute(fold_dir) / "best"
    if not best_dir.is_dir():
        raise FileNotFoundError(f"{fold_dir}: no best checkpoint (expected {best_dir})")
    saved_steps = ocp.utils.checkpoint_steps(best_dir)
    if not saved_steps:
        raise FileNotFoundError(f"{best_dir}: holds no finished checkpoint")
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(
            best_dir / str(max(saved_steps)) / checkpoint_manager.DEFAULT_ITEM_NAME)
    return jax.tree.map(jax.device_get, variables)
