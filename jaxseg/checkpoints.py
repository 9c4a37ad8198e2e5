"""Per-fold orbax checkpoints: the best model by validation Dice, and the latest state.

`best/` holds only the model variables of the best epoch (the recipe's ModelCheckpoint
with save_best_only, and what EarlyStopping's restore_best_weights restores); `latest/`
holds the whole train state plus the host-side loop state, so a preempted run resumes
at the next epoch. Orbax writes each step into a temporary directory and renames it
when complete, so a kill during a save leaves the previous checkpoint usable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

BEST_METRIC = "val_dice_coe"


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class FoldCheckpoints:
    def __init__(self, fold_dir: str | Path):
        fold_dir = Path(fold_dir).absolute()
        self._best = ocp.CheckpointManager(
            fold_dir / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda metrics: metrics[BEST_METRIC], best_mode="max"))
        self._latest = ocp.CheckpointManager(
            fold_dir / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=1))

    def save_best(self, epoch: int, variables: dict, metrics: dict[str, float]) -> None:
        self._best.save(epoch + 1, args=ocp.args.StandardSave(variables),
                        metrics={k: float(v) for k, v in metrics.items()})

    def save_latest(self, epochs_done: int, state: Any, host_state: dict) -> None:
        """`host_state` is JSON: history, callback states, learning rate, elapsed time."""
        self._best.wait_until_finished()
        self._latest.save(epochs_done, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state)))

    def restore_latest(self, state_template: Any) -> tuple[Any, dict] | None:
        """The last saved state, placed like `state_template`, or None on a fresh fold."""
        step = self._latest.latest_step()
        if step is None:
            return None
        restored = self._latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state_template)),
            host=ocp.args.JsonRestore()))
        return restored.state, restored.host

    def restore_best(self, variables_template: dict) -> dict:
        self._best.wait_until_finished()
        return self._best.restore(self._best.best_step(),
                                  args=ocp.args.StandardRestore(_abstract(variables_template)))

    def close(self) -> None:
        self._best.wait_until_finished()
        self._latest.wait_until_finished()
        self._best.close()
        self._latest.close()


def load_best_variables(fold_dir: str | Path) -> dict:
    """The best model variables of a finished fold, as host arrays (for prediction)."""
    best_dir = Path(fold_dir).absolute() / "best"
    if not best_dir.is_dir():
        raise FileNotFoundError(f"{fold_dir}: no best checkpoint (expected {best_dir})")
    manager = ocp.CheckpointManager(
        best_dir, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{best_dir}: holds no finished checkpoint")
    variables = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    return jax.tree.map(jax.device_get, variables)
