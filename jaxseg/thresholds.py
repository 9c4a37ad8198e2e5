"""The probability threshold a fold's model segments best at, chosen on its validation tiles.

The recipe cuts probabilities at 0.5. A network trained on soft Dice is not calibrated
around 0.5, and several of the best HuBMAP solutions chose their cut on out-of-fold
predictions instead. After a fold's last epoch its best model predicts the validation
tiles once; each tile's Dice is counted at every threshold of THRESHOLDS, and the one with
the highest mean Dice per tile goes into the fold's `result.json` (`threshold`, with the
whole curve). `jaxseg.predict --threshold=run` cuts at the mean over the folds it averages.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from jaxseg import cli, parallel, processes, reporting

THRESHOLDS = tuple(round(0.2 + 0.05 * step, 2) for step in range(13))   # 0.2 .. 0.8


def dice_sums(probabilities: np.ndarray, masks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per threshold of THRESHOLDS, the sum over real tiles (weight > 0) of each tile's
    Dice (1 when prediction and truth are both empty), as `losses.thresholded_metrics`
    counts it at 0.5. `probabilities`: uint8, probability * 255, as the eval step
    returns them; a pixel is positive when its probability exceeds the threshold."""
    real = weights > 0
    pixels = int(np.prod(probabilities.shape[1:]))   # a batch may be all padding
    probabilities = probabilities[real].reshape(-1, pixels)
    truth = masks[real].reshape(-1, pixels) > 0
    true_pixels = truth.sum(axis=1)
    sums = np.zeros(len(THRESHOLDS))
    for index, threshold in enumerate(THRESHOLDS):
        predicted = probabilities > threshold * 255
        union = predicted.sum(axis=1) + true_pixels
        both = (predicted & truth).sum(axis=1)
        sums[index] = np.where(union > 0, 2 * both / np.maximum(union, 1), 1.0).sum()
    return sums


def choose(variables: dict, eval_fn: Callable, batches: Iterator[dict], mesh,
           prefetch: int) -> dict:
    """{'threshold', 'val_per_image_dice_by_threshold'} of `variables` on the validation
    `batches`, each process counting its own rows, the same on every process."""
    sums, tiles = np.zeros(len(THRESHOLDS)), 0.0
    for batch in parallel.prefetch_to_devices(batches, mesh, prefetch):
        _, probabilities = eval_fn(variables, batch)
        masks, weights, predicted = (reporting.local_rows(array) for array in (
            batch["mask"], batch["weight"], probabilities))
        sums += dice_sums(predicted, masks, weights)
        tiles += float((weights > 0).sum())
    every_process = processes.gathered([sums.tolist(), tiles])
    sums = np.sum([process_sums for process_sums, _ in every_process], axis=0)
    tiles = sum(process_tiles for _, process_tiles in every_process)
    if tiles == 0:
        raise cli.InputError("validation files hold no examples")
    curve = sums / tiles
    return {"threshold": THRESHOLDS[int(np.argmax(curve))],
            "val_per_image_dice_by_threshold": dict(zip(map(str, THRESHOLDS),
                                                        curve.round(6).tolist()))}


def run_threshold(fold_results: list[dict], source: str) -> float:
    """The mean of the folds' chosen thresholds, or one line naming what lacks one."""
    missing = [str(result.get("fold", "?")) for result in fold_results
               if "threshold" not in result]
    if missing:
        raise cli.InputError(f"{source}: fold(s) {', '.join(missing)} chose no threshold "
                             "(trained by an earlier jaxseg); give --threshold as a number")
    return float(np.mean([result["threshold"] for result in fold_results]))

