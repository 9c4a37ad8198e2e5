"""Validation on whole slides (`config.val_images`, `config.val_truth`).

Validation tiles score a model on the tissue-rich crops the tiler kept, with the Dice of
whole batches; users are judged by Dice per whole image, empty areas and tile borders
included. With the slides the records were cut from, every epoch also predicts each of
the fold's validation slides as `jaxseg.predict` does (sliding window at the training
tiles' scale, centre blend, no flips, threshold 0.5) and scores it as `jaxseg.evaluate`
does (Dice per image at full resolution, averaged): `val_slide_dice`, which
`config.monitor` can make the metric that chooses the best epoch and stops training.
Slides are stain-normalised when the records were (their prepare.json), as predict does.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import jax
import ml_collections
import numpy as np

from jaxseg import cli, ensembles, evaluate, models, paths, predict, processes, records, slides

METRIC = "val_slide_dice"
TILE_METRIC = "val_dice_coe"
MONITORS = ("auto", TILE_METRIC, METRIC)
# Of each window's side, the share it overlaps its neighbours by (predict's default).
_OVERLAP = 0.25


def monitored_metric(config: ml_collections.ConfigDict) -> str:
    """The validation metric that chooses the best epoch and stops training early."""
    if config.monitor == "auto":
        return METRIC if config.val_images else TILE_METRIC
    return config.monitor


def check_config(config: ml_collections.ConfigDict) -> None:
    if config.monitor not in MONITORS:
        raise cli.InputError(f"config.monitor: unknown {config.monitor!r}, expected one of "
                             f"{', '.join(MONITORS)}")
    if config.monitor == METRIC and not config.val_images:
        raise cli.InputError(f"config.monitor={METRIC} needs config.val_images (the whole "
                             "slides the records were cut from) and config.val_truth")
    if bool(config.val_images) != bool(config.val_truth):
        raise cli.InputError("config.val_images and config.val_truth go together: the "
                             "slides and their truth (RLE CSV or folder of <id>.png masks)")


def slide_ids(record_files: list[str]) -> list[str]:
    """The slides `<id>-<count>.tfrec` files were cut from, in file order."""
    ids = []
    for path in record_files:
        slide_id = records.slide_of_record(os.path.basename(path))
        if slide_id is None:
            raise cli.InputError(f"{path}: not named <slide id>-<count>.tfrec, so its slide "
                                 "cannot be found for whole-slide validation")
        ids.append(slide_id)
    return ids


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where each slide and its truth are."""
    images: dict[str, str]
    truth: str

    @classmethod
    def find(cls, config: ml_collections.ConfigDict, val_files: list[list[str]]) -> Sources:
        """Every validation slide of the planned folds with its image and its truth, or
        one line naming the first slide without."""
        found = {slides.image_id(path): str(path) for path in paths.glob(config.val_images)}
        if not found:
            raise cli.MissingInput(f"config.val_images {config.val_images!r}: no files match")
        truth_ids = set(evaluate.Truth(config.val_truth).ids)
        for files in val_files:
            for slide_id in slide_ids(files):
                if slide_id not in found:
                    raise cli.MissingInput(f"config.val_images {config.val_images!r}: no "
                                           f"image of validation slide {slide_id}")
                if slide_id not in truth_ids:
                    raise cli.MissingInput(f"config.val_truth {config.val_truth}: no truth "
                                           f"for validation slide {slide_id}")
        return cls(found, config.val_truth)


class SlideValidation:
    """Scores a model's variables on whole slides, each process predicting its share of
    the slides on its own devices with one program compiled for the whole run."""

    def __init__(self, config: ml_collections.ConfigDict, model: models.Unet,
                 sources: Sources):
        self._images = sources.images
        self._truth = evaluate.Truth(sources.truth)
        data_dir = paths.path(config.data_dir)
        reduction = ensembles.run_reduction(data_dir) or ensembles.SEED_REDUCTION
        slide_mpp = ensembles.run_slide_mpp(data_dir)
        self._predictor = predict.BatchPredictor(model, "none", config.per_device_batch_size)
        self._options = predict.SlideOptions(
            tile=config.image_size, reduction=reduction,
            overlap=round(_OVERLAP * config.image_size), blend="center",
            batch_size=self._predictor.global_batch, threshold=0.5,
            target_mpp=(slide_mpp or slides.RECIPE_SLIDE_MPP) * reduction,
            stain_normalisation=ensembles.run_stain_normalisation(data_dir))
        if self._options.stain_normalisation is not None and processes.is_main():
            print(predict.describe_stain(self._options.stain_normalisation, "the records "
                                         f"({data_dir / 'prepare.json'})"),
                  file=sys.stderr, flush=True)
        self._said: set[str] = set()   # scale notes already printed, once per run

    def score(self, variables: dict, ids: list[str]) -> float:
        """Mean Dice per slide of `ids`, the same on every process."""
        self._predictor.use([variables])
        dice = {}
        for slide_id in ids[jax.process_index()::jax.process_count()]:
            path = self._images[slide_id]
            with slides.open_slide(path) as slide:
                reduction = predict.slide_reduction(slide, self._options, self._said)
                options = dataclasses.replace(self._options, reduction=reduction)
                mask = predict.predict_slide(slide, self._predictor, options,
                                             f"whole-slide validation {slide_id}")
                shape = (slide.height, slide.width)
            dice[slide_id] = self._truth.dice(
                slide_id, predict.encode_upsampled(mask, reduction, shape), shape, path)
        for process_dice in processes.gathered(dice):
            dice.update(process_dice)
        return float(np.mean([dice[slide_id] for slide_id in ids]))
