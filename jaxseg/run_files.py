"""The files of a training run's workdir besides checkpoints, written by process 0.

    WORKDIR/config.json, prepare.json (the tiling, copied from the record folder),
            summary.json
    WORKDIR/fold_K/train_files.txt, val_files.txt, history.json, curves.png,
            result.json (last: the fold's training has ended), tensorboard/

A fold's files are written as its training starts and ends, so that what a run left
can be read without the code that trained it.
"""
from __future__ import annotations

import json

import ml_collections
import numpy as np

from jaxseg import checkpoints, paths, reporting


def holds_progress(workdir: paths.Path) -> bool:
    """Whether an earlier attempt finished a fold or saved a fold's state."""
    return any(checkpoints.fold_finished(fold_dir) or checkpoints.has_latest(fold_dir)
               for fold_dir in workdir.glob("fold_*"))


def write_run_files(workdir: paths.Path, config: ml_collections.ConfigDict) -> None:
    """The config, and the tiling the records were made with, which prediction reads
    to see slides at the training scale."""
    reporting.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    prepare_record = paths.path(config.data_dir) / "prepare.json"
    if prepare_record.exists():
        paths.atomic_write(workdir / "prepare.json", prepare_record.read_bytes())


def write_fold_files(fold_dir: paths.Path, train_files: list[str],
                     val_files: list[str]) -> None:
    fold_dir.mkdir(parents=True, exist_ok=True)
    paths.atomic_write(fold_dir / "train_files.txt", "\n".join(train_files) + "\n")
    paths.atomic_write(fold_dir / "val_files.txt", "\n".join(val_files) + "\n")


def write_fold_history(fold_dir: paths.Path, history: dict[str, list], fold: int) -> None:
    """The history and its curves so far, rewritten after every epoch."""
    reporting.write_json(fold_dir / "history.json", history)
    reporting.plot_curves(history, fold_dir / "curves.png", title=f"fold {fold}")


def write_fold_result(fold_dir: paths.Path, history: dict[str, list], result: dict) -> None:
    """History and curves, then the result, whose presence says the fold is finished."""
    write_fold_history(fold_dir, history, result["fold"])
    reporting.write_json(fold_dir / checkpoints.FOLD_RESULT, result)


def run_summary(results: dict[int, dict], total_time_s: float,
                compile_seconds: dict[str, list[float]]) -> dict:
    """summary.json: each fold's result without its file lists, the means over folds,
    and what compiling cost."""
    return {
        "folds": {str(fold): {key: value for key, value in result.items()
                              if key not in ("train_files", "val_files")}
                  for fold, result in results.items()},
        "mean_best_val_dice_coe": float(np.mean([r["best_val_dice_coe"]
                                                 for r in results.values()])),
        "mean_val_per_image_dice": float(np.mean([r["val_per_image_dice"]
                                                  for r in results.values()])),
        "total_time_s": round(total_time_s, 1),
        "compile_seconds": reporting.summarize_compiles(compile_seconds),
    }


def summary_line(summary: dict, path: paths.Path) -> str:
    """The run's last words: its scores and what the train step's compile cost."""
    compiles = summary["compile_seconds"]
    cached = compiles.get(reporting.CACHE_RETRIEVALS, [])
    return (f"done in {summary['total_time_s']:.0f}s: mean best val_dice_coe "
            f"{summary['mean_best_val_dice_coe']:.4f}, mean per-image val Dice "
            f"{summary['mean_val_per_image_dice']:.4f}; train step ready in "
            f"{sum(compiles.get('jit(train_step)', [0])):.0f}s"
            + (f" ({len(cached)} programs read from the compilation cache)" if cached else "")
            + f" -> {path}")


def finished_fold_result(fold_dir: paths.Path) -> dict | None:
    """The result of a fold an earlier attempt finished; None when it has not."""
    path = fold_dir / checkpoints.FOLD_RESULT
    return paths.read_json(path) if path.exists() else None
