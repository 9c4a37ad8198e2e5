"""Every check of a config's values, in one place, before anything is built or written.

A config comes from a config file with `--config.FIELD=...` overrides (training) or
from a run's config.json (prediction). A bad value found here stops the command with
one line naming the field; the modules that later use a value take it as checked, and
a bad value that still reaches them is a bug of ours.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import ml_collections

from jaxseg import cli, paths
from jaxseg.losses import LOSSES
from jaxseg.models import BACKBONES, IMPL_FIELDS, INPUT_MULTIPLE
from jaxseg.models.build import LAYER_VARIANTS
from jaxseg.schedules import SCHEDULES

Config = Mapping[str, Any] | ml_collections.ConfigDict
# Fields a resumed run may change: extending training, choosing other folds, how layers are
# computed and how the host feeds the devices (never what they compute; absent from runs
# made before these fields).
RESUMABLE_CHANGES = ("epochs", "folds", *IMPL_FIELDS, "remat", "prefetch_batches",
                     "metrics_every_steps", "tensorboard_images")
# Options added after runs were made, and the value that gives what those runs did: a
# run whose config.json lacks one resumes with that value.
ADDED_OPTIONS = {"precise_bn_batches": 0, "ema_decay": 0.0, "lr_schedule": "plateau",
                 "warmup_epochs": 0.0, "val_images": "", "val_truth": "", "monitor": "auto",
                 "augment": {"hed_prob": 0.0, "hed_scale": 0.05, "hed_shift": 0.05,
                             "hue_prob": 0.0, "hue_max_delta": 0.05,
                             "shift_scale_rotate_prob": 0.0, "shift_limit": 0.0625,
                             "scale_limit": 0.1, "rotate_limit": 45.0, "blur_prob": 0.0,
                             "blur_max_sigma": 1.0, "noise_prob": 0.0,
                             "noise_max_std": 7.0}}


def check_model_config(config: Config) -> None:
    """The fields `models.build_model` reads: the backbone, and how layers are computed."""
    backbone = config.get("backbone")
    if backbone not in BACKBONES:
        raise cli.InputError(f"config.backbone: unknown {backbone!r}, "
                             f"expected one of {', '.join(BACKBONES)}")
    for field, variants in LAYER_VARIANTS.items():
        choice = config.get(field, "auto")
        if choice not in ("auto", *variants):
            raise cli.InputError(f"config.{field}: {choice!r} is not one of "
                                 f"{', '.join(['auto', *variants])}")


def check_train_config(config: ml_collections.ConfigDict) -> None:
    if not config.data_dir:
        raise cli.InputError("config.data_dir is empty: give --config.data_dir=DIR of "
                             ".tfrec files")
    check_model_config(config)
    if config.image_size <= 0 or config.image_size % INPUT_MULTIPLE:
        raise cli.InputError(f"config.image_size: {config.image_size} is not a positive "
                             f"multiple of {INPUT_MULTIPLE} (the Unet halves it five times)")
    if config.epochs < 1:
        raise cli.InputError(f"config.epochs must be >= 1, got {config.epochs}")
    if config.loss not in LOSSES:
        raise cli.InputError(f"config.loss: unknown {config.loss!r}, expected one of "
                             f"{', '.join(LOSSES)}")
    if config.num_folds < 2:
        raise cli.InputError(f"config.num_folds must be >= 2 (K-fold), got {config.num_folds}")
    chosen_folds(config)
    if config.per_device_batch_size < 1:
        raise cli.InputError(f"config.per_device_batch_size must be >= 1, "
                             f"got {config.per_device_batch_size}")
    for field in ("prefetch_batches", "metrics_every_steps", "shuffle_buffer"):
        if config[field] < 1:
            raise cli.InputError(f"config.{field} must be >= 1, got {config[field]}")
    for field in ("tensorboard_images", "precise_bn_batches"):
        if config[field] < 0:
            raise cli.InputError(f"config.{field} must be >= 0, got {config[field]}")
    if not 0 < config.plateau_factor < 1:  # Keras' ReduceLROnPlateau refuses it too
        raise cli.InputError(f"config.plateau_factor must be in (0, 1), "
                             f"got {config.plateau_factor}")
    if config.lr_schedule not in SCHEDULES:
        raise cli.InputError(f"config.lr_schedule: unknown {config.lr_schedule!r}, expected "
                             f"one of {', '.join(SCHEDULES)}")
    if not 0 <= config.warmup_epochs < config.epochs:
        raise cli.InputError(f"config.warmup_epochs must be in [0, epochs={config.epochs}), "
                             f"got {config.warmup_epochs}")
    if config.lr_schedule == "cosine" and not 0 <= config.min_learning_rate <= config.learning_rate:
        raise cli.InputError(f"config.min_learning_rate must be in [0, learning_rate="
                             f"{config.learning_rate}] for the cosine schedule, got "
                             f"{config.min_learning_rate}")
    if not 0 <= config.ema_decay < 1:
        raise cli.InputError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
    # Here rather than at the top: prediction checks model configs without TensorFlow,
    # and whole-slide validation is built on prediction.
    from jaxseg import slide_validation
    from jaxseg.augment import check_augment_config
    check_augment_config(config.augment)
    slide_validation.check_config(config)


def chosen_folds(config: ml_collections.ConfigDict) -> list[int]:
    """The folds `config.folds` names: 'all', or a comma-separated list."""
    folds, num_folds = config.folds, config.num_folds
    if str(folds).strip().lower() == "all":
        return list(range(num_folds))
    try:
        chosen = [int(part) for part in str(folds).split(",") if part.strip()]
    except ValueError:
        raise cli.InputError(f"config.folds: expected 'all' or a list like '0,2', "
                             f"got {folds!r}") from None
    if not chosen or any(not 0 <= fold < num_folds for fold in chosen):
        raise cli.InputError(f"config.folds: {folds!r} is not a list of folds in "
                             f"0..{num_folds - 1}")
    return chosen


def check_workdir_config(config: ml_collections.ConfigDict, workdir: paths.Path) -> None:
    """A workdir holding an earlier run's progress must have been made with the same
    settings; one that an attempt left before its first checkpoint (killed while
    compiling, say) is taken over. A cosine schedule's rates depend on the number of
    epochs, so a run under it cannot be extended."""
    from jaxseg import run_files  # orbax, for the checkpoints: only where a run is resumed

    path = workdir / "config.json"
    if not (path.exists() and run_files.holds_progress(workdir)):
        return
    previous, current = paths.read_json(path), json.loads(config.to_json_best_effort())
    resumable = [field for field in RESUMABLE_CHANGES
                 if field != "epochs" or current.get("lr_schedule") != "cosine"]
    for key in sorted(set(previous) | set(current)):
        before = previous.get(key, ADDED_OPTIONS.get(key))
        if isinstance(before, dict) and isinstance(ADDED_OPTIONS.get(key), dict):
            before = {**ADDED_OPTIONS[key], **before}
        if key not in resumable and before != current.get(key):
            raise cli.InputError(f"{workdir}: holds a run with config.{key}="
                                 f"{before!r}, this one has {current.get(key)!r}; "
                                 "use another --workdir")
