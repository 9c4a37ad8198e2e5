"""The models a prediction averages: every finished fold of a training run, one fold,
or converted Keras weights, with the tile size and scale they were trained at.

What a run directory says is checked before any slide is read: a missing or unfinished
fold, a config without a backbone, or variables of another model stop the command
with one line naming the file.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import (checkpoints, cli, config_checks, convert, models, paths, slides, stain,
                    thresholds)

# The seed's TFRecords: the recipe's tiles.
SEED_REDUCTION = slides.RECIPE_REDUCTION
SEED_TILE_SIZE = slides.RECIPE_TILE_SIZE // slides.RECIPE_REDUCTION


@dataclasses.dataclass
class Ensemble:
    """The models to average, and the scale and tile size they were trained at."""
    model: models.Unet
    variables: list[dict]
    tile: int
    reduction: int
    source: str
    # Micrometres per pixel of the training tiles, when the run's prepare.json records
    # the slides' pixel size; None: unknown.
    mpp: float | None = None
    # The probability threshold the folds chose on their validation tiles (their mean;
    # jaxseg/thresholds.py), or why there is none.
    threshold: float | None = None
    no_threshold_because: str = "converted Keras weights chose no threshold"
    # The stain normalisation of the training tiles (RUN/prepare.json); None: none.
    stain_normalisation: stain.Normalisation | None = None


def read_run_config(run_dir: paths.Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise cli.MissingInput(f"{run_dir}: no config.json (not a jaxseg.train run "
                               "directory)")
    return paths.read_json(path)


def run_reduction(run_dir: paths.Path | None) -> int | None:
    """The reduction of the run's tiles, from the prepare.json that jaxseg.train keeps.

    A run trained on records made elsewhere has none; the guess that follows is said,
    since a wrong reduction predicts every slide at the wrong scale.
    """
    if run_dir is None:
        return None
    if not (run_dir / "prepare.json").is_file():
        print(f"warning: {run_dir / 'prepare.json'} not found, so the tiles' reduction is "
              f"unknown; assuming {SEED_REDUCTION} (the seed's). Give --reduction if the "
              "run's tiles were made otherwise.", file=sys.stderr, flush=True)
        return None
    record = paths.read_json(run_dir / "prepare.json")
    if "reduction" not in record:
        raise cli.InputError(f"{run_dir / 'prepare.json'}: has no 'reduction' field")
    return int(record["reduction"])


def run_slide_mpp(run_dir: paths.Path | None) -> float | None:
    """The pixel size (micrometres) of the slides the run's tiles were cut from, when
    its prepare.json records one (prepare records it when every slide says it)."""
    if run_dir is None or not (run_dir / "prepare.json").is_file():
        return None
    slide_mpp = paths.read_json(run_dir / "prepare.json").get("slide_mpp")
    return None if slide_mpp is None else float(slide_mpp)


def run_stain_normalisation(run_dir: paths.Path | None) -> stain.Normalisation | None:
    """The stain normalisation the run's tiles were made with (prepare.json), which
    prediction applies to every slide; None if there was none."""
    if run_dir is None or not (run_dir / "prepare.json").is_file():
        return None
    return stain.Normalisation.from_prepare_record(
        paths.read_json(run_dir / "prepare.json"), str(run_dir / "prepare.json"))


def find_fold_dirs(run_dir: paths.Path, allow_unfinished: bool = False) -> list[paths.Path]:
    """Folds with a best checkpoint, in fold order; a run may hold only some folds.

    A fold whose training has not ended (a run in progress, or one that crashed) holds
    a half-trained best model: mixed in, it would change the ensemble without a word.
    It is left out, and named, unless `allow_unfinished`.
    """
    folds = {int(path.name.removeprefix("fold_")): path for path in run_dir.glob("fold_*")
             if path.name.removeprefix("fold_").isdigit() and (path / "best").is_dir()}
    if not folds:
        raise cli.MissingInput(f"{run_dir}: no fold_K/best checkpoints")
    fold_dirs = [folds[fold] for fold in sorted(folds)]
    unfinished = [path for path in fold_dirs if not checkpoints.fold_finished(path)]
    if not unfinished or allow_unfinished:
        return fold_dirs
    names = ", ".join(path.name for path in unfinished)
    if len(unfinished) == len(fold_dirs):
        raise cli.InputError(f"{run_dir}: no fold has finished training ({names} have no "
                             f"{checkpoints.FOLD_RESULT}); --allow_unfinished_folds predicts "
                             "from their best checkpoints so far")
    print(f"warning: leaving out {names} of {run_dir}: training unfinished (no "
          f"{checkpoints.FOLD_RESULT}); --allow_unfinished_folds includes them",
          file=sys.stderr, flush=True)
    return [path for path in fold_dirs if path not in unfinished]


def describe_folds(fold_dirs: list[paths.Path]) -> str:
    """The folds an ensemble averages, an unfinished one marked as such."""
    return ", ".join(str(path) if checkpoints.fold_finished(path) else
                     f"{path} (unfinished)" for path in fold_dirs)


def check_variables(model: models.Unet, variables: dict, tile: int, source: str) -> None:
    """A checkpoint of another backbone would fail deep inside XLA; say so up front."""
    expected = jax.eval_shape(functools.partial(model.init, train=False),
                              jax.random.PRNGKey(0), jnp.zeros((1, tile, tile, 3)))
    if _leaf_shapes(variables) != _leaf_shapes(expected):
        raise cli.InputError(f"{source}: variables do not fit a Unet-{model.backbone} "
                             "(another backbone or model?)")


def _leaf_shapes(tree: dict) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def load_ensemble(workdir: str | None, checkpoint: str | None = None,
                  keras_weights: str | None = None, tile_size: int | None = None,
                  reduction: int | None = None,
                  allow_unfinished_folds: bool = False) -> Ensemble:
    """The models named by the flags; tile size and reduction from the run unless given.

    `workdir` alone: every finished fold's best checkpoint. `checkpoint`: one fold
    directory (its run directory is its parent unless `workdir` says otherwise).
    `allow_unfinished_folds` takes folds whose training has not ended too.
    `keras_weights`: weights converted by jaxseg.convert; without a run directory the
    seed's 512 px tiles at 4x reduction are assumed.
    """
    if checkpoint and keras_weights:
        raise cli.InputError("give --checkpoint or --keras_weights, not both")
    run_dir = (paths.path(workdir) if workdir else
               paths.path(checkpoint).parent if checkpoint else None)
    if run_dir is None and not keras_weights:
        raise cli.InputError("give --workdir (a training run), --checkpoint or --keras_weights")
    if run_dir is not None and not run_dir.is_dir():
        raise cli.MissingInput(f"{run_dir}: no such run directory")
    config = read_run_config(run_dir) if run_dir is not None else {}
    if keras_weights:
        variables, meta = convert.load_converted(keras_weights)
        variables_list, source = [variables], f"Keras weights {keras_weights}"
        # normalize_input is true only for keras.applications weights, which normalised
        # inside the model.
        config = {**config, "backbone": meta["backbone"], "half_precision": False,
                  "normalize_input": meta.get("normalize_input", False)}
    else:
        if checkpoint:
            fold_dirs = [paths.path(checkpoint)]
            if not (allow_unfinished_folds or checkpoints.fold_finished(checkpoint)):
                raise cli.InputError(f"--checkpoint {checkpoint}: training of this fold has not "
                                     f"finished (no {checkpoints.FOLD_RESULT}); "
                                     "--allow_unfinished_folds predicts from its best so far")
        else:
            fold_dirs = find_fold_dirs(run_dir, allow_unfinished_folds)
        variables_list = [checkpoints.load_best_variables(path) for path in fold_dirs]
        source = describe_folds(fold_dirs)
        if "backbone" not in config:
            raise cli.InputError(f"{run_dir / 'config.json'}: has no 'backbone' field")
    config_checks.check_model_config(config)
    model = models.build_model(config)
    tile = tile_size if tile_size is not None else config.get("image_size", SEED_TILE_SIZE)
    if tile < models.INPUT_MULTIPLE or tile % models.INPUT_MULTIPLE:
        raise cli.InputError(f"--tile_size must be a positive multiple of "
                             f"{models.INPUT_MULTIPLE}, got {tile}")
    if reduction is None:
        reduction = run_reduction(run_dir) or SEED_REDUCTION
    if reduction < 1:
        raise cli.InputError(f"--reduction must be >= 1, got {reduction}")
    for variables in variables_list:
        check_variables(model, variables, tile, source)
    slide_mpp = run_slide_mpp(run_dir)
    ensemble = Ensemble(model, variables_list, tile, reduction, source,
                        None if slide_mpp is None else slide_mpp * reduction,
                        stain_normalisation=run_stain_normalisation(run_dir))
    if not keras_weights:
        try:
            ensemble.threshold = thresholds.run_threshold(
                [paths.read_json(path / checkpoints.FOLD_RESULT)
                 if checkpoints.fold_finished(path) else {"fold": path.name}
                 for path in fold_dirs], source)
        except cli.InputError as error:
            ensemble.no_threshold_because = str(error)
    return ensemble
