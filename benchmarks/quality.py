"""Segmentation quality of jaxseg beside the Keras recipe, trained alike (issue 18).

    python benchmarks/quality.py --data=real \\
        --tiles_dir=../shared/data/hubmap-26dc41664-tiles       # the 76 real kidney tiles
    python benchmarks/quality.py --data=synthetic                # jaxseg.synthetic slides
    python benchmarks/quality.py --data=real --variants=jaxseg,precise_bn --seeds=0,1,2

Every variant trains fold 0 of the same record files (the same K-fold split, batches,
augmentation draws, epochs and seed: `config.deterministic`), keeps its best epoch by
val_dice_coe, and predicts held-out images whole with `jaxseg.predict` (sliding window,
flip TTA), scored per image by `jaxseg.evaluate` (the competition's mean Dice):
- `keras` is the recipe: segmentation_models' Unet compiled as the recipe compiles it,
  `model.fit` with its callbacks (ReduceLROnPlateau on val_loss, EarlyStopping and
  ModelCheckpoint on val_dice_coe), fed jaxseg's own training batches (`data.train_batches`
  with the colour jitter applied by `colour.jitter`) so that both see the same pixels;
  its best weights are converted (`jaxseg.convert`) and predicted by the same code;
- every other variant is `python -m jaxseg.train` with the config below plus its
  overrides (VARIANTS), or an earlier variant's run predicted with other predict flags
  (PREDICTED_AGAIN: the threshold the folds chose, `--threshold=run`).

Held-out images: for the real tiles, the tiles left of a vertical line on the slide,
with the tiles that straddle it dropped (the tiles overlap by half; no held-out tissue is
seen in training); masks from the whole-slide annotations (`masks_wsi`, complete). For
synthetic data, the test slides of `jaxseg.synthetic.make_dataset`.

Each (variant, seed) writes `result.json` in its run folder and is skipped when that
exists, so an interrupted harness resumes. The report (`report.md`, `results.json`) gives
held-out Dice mean and spread over seeds, the best epoch's val_dice_coe, how much
val_dice_coe swings between epochs once training Dice has passed 0.5, and the mean
per-epoch validation curves side by side.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

REPO = Path(__file__).resolve().parent.parent
# jaxseg config overrides of each variant; `keras` is the recipe itself.
STAIN_AUGMENTATION = {"augment.hed_prob": 0.5, "augment.hue_prob": 0.5}
# Every op beyond the recipe's, about as often as the top HuBMAP solutions drew them.
STRONG_AUGMENTATION = {**STAIN_AUGMENTATION, "augment.shift_scale_rotate_prob": 0.5,
                       "augment.blur_prob": 0.25, "augment.noise_prob": 0.25}
VARIANTS: dict[str, dict[str, object] | None] = {
    "keras": None,
    "recipe_bn": {"precise_bn_batches": 0},          # the recipe's moving BatchNorm statistics
    "precise_bn": {"precise_bn_batches": 8},         # jaxseg's default
    "ema": {"precise_bn_batches": 8, "ema_decay": 0.99},
    "cosine": {"precise_bn_batches": 8, "lr_schedule": "cosine", "warmup_epochs": 1},
    "bce_dice": {"precise_bn_batches": 8, "loss": "bce_dice"},
    "lovasz": {"precise_bn_batches": 8, "loss": "lovasz"},
    "bce_lovasz": {"precise_bn_batches": 8, "loss": "bce_lovasz"},
    "shift_scale_rotate": {"precise_bn_batches": 8, "augment.shift_scale_rotate_prob": 0.5},
    "strong_aug": {"precise_bn_batches": 8, **STRONG_AUGMENTATION},
    # The fold's validation images predicted whole each epoch choose the best epoch.
    "slide_val": {"precise_bn_batches": 8, "val_images": "{training_images}",
                  "val_truth": "{training_truth}"},
    "stain_aug": {"precise_bn_batches": 8, **STAIN_AUGMENTATION},
    "recipe_bn_stain_aug": {"precise_bn_batches": 0, **STAIN_AUGMENTATION},
}
# Variants that train nothing: another variant's run predicted with other predict flags.
PREDICTED_AGAIN: dict[str, tuple[str, list[str]]] = {
    "recipe_bn_run_threshold": ("recipe_bn", ["--threshold", "run"]),
    "precise_bn_run_threshold": ("precise_bn", ["--threshold", "run"]),
}
# Real tiles: those whose left edge is at or beyond this x (full-resolution slide pixels)
# train; those whose right edge is at or before the line's left neighbour are held out.
_REAL_TRAIN_FROM_X = 13_600.0
_REAL_HELD_OUT_TO_X = 13_616.0

_DATA = flags.DEFINE_enum("data", "real", ["real", "synthetic"], "which data set")
_TILES_DIR = flags.DEFINE_string("tiles_dir", "../shared/data/hubmap-26dc41664-tiles",
                                 "the real tiles (images/, masks_wsi/, tiles.csv)")
_OUT = flags.DEFINE_string("out", None, "results folder; default "
                           "benchmarks/results/quality/<data>")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"some of {list(VARIANTS)}")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (split, initialisation, data)")
_EPOCHS = flags.DEFINE_integer("epochs", 15, "epochs per run")
_TILE_SIZE = flags.DEFINE_integer("tile_size", 128, "model-scale tile side in pixels")
_REDUCTION = flags.DEFINE_integer("reduction", 4, "downscale of the images before tiling")
_CONFIG = flags.DEFINE_string("config", "jaxseg/configs/cpu.py", "jaxseg config all "
                              "variants start from (the Keras side reads it too)")
_SET = flags.DEFINE_multi_string("set", [], "key=value config override for every variant")
_STAIN_SPREAD = flags.DEFINE_float("stain_spread", 0.0, "synthetic: each slide's stain "
                                   "drawn within this fraction per channel")
_TEST_STAIN_SHIFT = flags.DEFINE_list("test_stain_shift", ["1", "1", "1"], "synthetic: the "
                                      "held-out slides' stain times these factors (R,G,B "
                                      "optical density): slides stained elsewhere")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "train nothing: rewrite the report "
                                  "from the runs' result.json")
_KERAS_WORKER = flags.DEFINE_string("keras_worker", None, "internal: train the Keras recipe "
                                    "into this run folder (its run.json says how)")


def main(argv: list[str]) -> None:
    del argv
    if _KERAS_WORKER.value:
        train_keras(Path(_KERAS_WORKER.value))
        return
    known = [*VARIANTS, *PREDICTED_AGAIN]
    unknown = sorted(set(_VARIANTS.value) - set(known))
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; known {known}")
    out = Path(_OUT.value or REPO / "benchmarks" / "results" / "quality" / _DATA.value)
    if _REPORT_ONLY.value:
        write_report(out)
        return
    held_out = prepare_data(out / "data")
    for seed in _SEEDS.value:
        for variant in _VARIANTS.value:
            run_dir = out / "runs" / f"{variant}_seed{seed}"
            if (run_dir / "result.json").exists():
                continue
            started = time.time()
            print(f"== {variant} seed {seed}", flush=True)
            if variant in PREDICTED_AGAIN:
                base, predict_flags = PREDICTED_AGAIN[variant]
                result = predict_again(variant, int(seed), run_dir,
                                       out / "runs" / f"{base}_seed{seed}", predict_flags,
                                       held_out)
            else:
                result = run_variant(variant, int(seed), run_dir, out / "data" / "records",
                                     held_out)
            result["seconds"] = round(time.time() - started)
            (run_dir / "result.json").write_text(json.dumps(result, indent=1))
            print(f"== {variant} seed {seed}: held-out Dice {result['heldout_dice']:.4f}, "
                  f"best val_dice_coe {result['best_val_dice_coe']:.4f} at epoch "
                  f"{result['best_epoch']}, {result['seconds']} s", flush=True)
    write_report(out)


# --- data ------------------------------------------------------------------------------

def prepare_data(data_dir: Path) -> dict:
    """Record files in data_dir/records; where the held-out images and their truth are
    (`images`, `truth`), and the training images and theirs (`training_images`,
    `training_truth`, which variants' overrides may name in braces)."""
    if _DATA.value == "real":
        held_out = _split_real_tiles(Path(_TILES_DIR.value), data_dir)
        source = ["--images", str(data_dir / "train" / "images"),
                  "--masks", str(data_dir / "train" / "masks")]
    else:
        held_out = _synthetic_slides(data_dir)
        source = ["--competition_dir", str(data_dir / "synthetic")]
    if not (data_dir / "records" / "prepare.json").exists():
        _run([sys.executable, "-m", "jaxseg.prepare", *source,
              "--out_dir", str(data_dir / "records"), "--tile_size", str(_TILE_SIZE.value),
              "--reduction", str(_REDUCTION.value), "--overlap", "0"])
    return held_out


def _split_real_tiles(tiles_dir: Path, data_dir: Path) -> dict:
    with open(tiles_dir / "tiles.csv") as f:
        rows = list(csv.DictReader(f))
    sides = {"train": [], "heldout": []}
    for row in rows:
        left = float(row["wsi_x0"])
        if left >= _REAL_TRAIN_FROM_X:
            sides["train"].append(row["tile"])
        elif left + float(row["wsi_w"]) <= _REAL_HELD_OUT_TO_X:
            sides["heldout"].append(row["tile"])
    for side, tiles in sides.items():
        for kind, folder, suffix in (("images", "images", ".jpg"),
                                     ("masks", "masks_wsi", ".png")):
            target = data_dir / side / kind
            target.mkdir(parents=True, exist_ok=True)
            for tile in tiles:
                link = target / f"{tile}{suffix}"
                if not link.exists():
                    link.symlink_to((tiles_dir / folder / f"{tile}{suffix}").resolve())
    print(f"real tiles: {len(sides['train'])} train, {len(sides['heldout'])} held out, "
          f"{len(rows) - len(sides['train']) - len(sides['heldout'])} dropped", flush=True)
    return {"images": str(data_dir / "heldout" / "images" / "*.jpg"),
            "truth": str(data_dir / "heldout" / "masks"),
            "training_images": str(data_dir / "train" / "images" / "*.jpg"),
            "training_truth": str(data_dir / "train" / "masks")}


def _synthetic_slides(data_dir: Path) -> dict:
    from jaxseg import synthetic

    slides_dir = data_dir / "synthetic"
    if not (slides_dir / "test_truth.csv").exists():
        synthetic.make_dataset(slides_dir, num_train=8, num_test=3, height=2400, width=2400,
                               stain_spread=_STAIN_SPREAD.value,
                               test_stain_shift=[float(f) for f in _TEST_STAIN_SHIFT.value])
    return {"images": str(slides_dir / "test" / "*.tiff"),
            "truth": str(slides_dir / "test_truth.csv"),
            "training_images": str(slides_dir / "train" / "*.tiff"),
            "training_truth": str(slides_dir / "train.csv")}


# --- runs ------------------------------------------------------------------------------

def run_variant(variant: str, seed: int, run_dir: Path, records: Path, held_out: dict) -> dict:
    overrides = {"data_dir": str(records), "folds": "0", "epochs": _EPOCHS.value,
                 "seed": seed, "deterministic": True, "image_size": _TILE_SIZE.value,
                 **dict(item.split("=", 1) for item in _SET.value)}
    if VARIANTS[variant] is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps(overrides))
        _run([sys.executable, __file__, f"--keras_worker={run_dir}", f"--config={_CONFIG.value}"])
        _run([sys.executable, "-m", "jaxseg.convert", "--keras_weights",
              str(run_dir / "best.h5"), "--backbone", _config(overrides).backbone,
              "--out", str(run_dir / "converted")])
        history = json.loads((run_dir / "history.json").read_text())
        weights = ["--keras_weights", str(run_dir / "converted")]
    else:
        overrides.update({key: value.format(**held_out) if isinstance(value, str) else value
                          for key, value in VARIANTS[variant].items()})
        _run([sys.executable, "-m", "jaxseg.train", f"--config={_CONFIG.value}",
              f"--workdir={run_dir}", *[f"--config.{k}={v}" for k, v in overrides.items()]])
        history = json.loads((run_dir / "fold_0" / "history.json").read_text())
        weights = ["--workdir", str(run_dir)]
    prediction = _predict(weights, run_dir, held_out)
    return {"variant": variant, "seed": seed, **_scores(history, prediction, held_out)}


def predict_again(variant: str, seed: int, run_dir: Path, base_dir: Path,
                  predict_flags: list[str], held_out: dict) -> dict:
    """The trained run in `base_dir` predicted with `predict_flags` (run it first)."""
    if not (base_dir / "result.json").exists():
        raise app.UsageError(f"{variant}: run {base_dir.name} first (list it earlier in "
                             "--variants)")
    run_dir.mkdir(parents=True, exist_ok=True)
    prediction = _predict(["--workdir", str(base_dir), *predict_flags], run_dir, held_out)
    history = json.loads((base_dir / "fold_0" / "history.json").read_text())
    return {"variant": variant, "seed": seed, **_scores(history, prediction, held_out)}


def _predict(weights: list[str], run_dir: Path, held_out: dict) -> Path:
    prediction = run_dir / "heldout.csv"
    _run([sys.executable, "-m", "jaxseg.predict", *weights, "--images", held_out["images"],
          "--out", str(prediction), "--tile_size", str(_TILE_SIZE.value),
          "--reduction", str(_REDUCTION.value)])
    return prediction


def _scores(history: dict, prediction: Path, held_out: dict) -> dict:
    from jaxseg import evaluate

    shapes = evaluate.image_shapes(held_out["images"])
    scored = evaluate.evaluate(prediction, held_out["truth"], shapes)
    val = history["val_dice_coe"]
    best = int(np.argmax(val))
    trained = [i for i, dice in enumerate(history["dice_coe"]) if dice > 0.5]
    swings = [abs(val[i] - val[i - 1]) for i in trained if i > trained[0]] if trained else []
    return {"heldout_dice": scored["mean_dice"],
            "heldout_per_image": {row["id"]: row["dice"] for row in scored["images"]},
            "best_epoch": best + 1, "best_val_dice_coe": val[best],
            "max_val_swing_after_train_dice_0.5": max(swings) if swings else None,
            "history": {key: history[key] for key in ("dice_coe", "val_dice_coe", "val_loss",
                                                      "lr")}}


def _config(overrides: dict):
    """The harness config with `overrides` (dotted keys reach into groups), as the
    command-line flags would set them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("harness_config", REPO / _CONFIG.value)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        *groups, field = key.split(".")
        group = config
        for name in groups:
            group = group[name]
        kind = type(group[field])
        group[field] = (str(value).lower() in ("1", "true")) if kind is bool else kind(value)
    return config


def _run(command: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(command, check=True, cwd=REPO, env=env)


# --- the Keras recipe ------------------------------------------------------------------

def train_keras(run_dir: Path) -> None:
    """The recipe's fit on jaxseg's batches: history.json and best.h5 in run_dir."""
    import jax
    import tf_keras

    import keras_recipe
    from jaxseg import colour, data, train

    config = _config(json.loads((run_dir / "run.json").read_text()))
    files = data.list_record_files(config.data_dir)
    counts = data.checked_counts(files, config.data_dir)
    plan = data.fold_plan(config, 0, *data.kfold_splits(files, config.num_folds,
                                                         config.seed)[0], counts)
    batch = config.per_device_batch_size * jax.device_count()
    jitter = jax.jit(colour.jitter)

    def training_batches():
        for epoch in range(config.epochs):
            for host in data.train_batches(
                    plan.train_files, image_size=config.image_size, batch_size=batch,
                    steps=plan.steps_per_epoch, seed=train.fold_seed(config, 0), epoch=epoch,
                    augment_config=config.augment, shuffle_buffer=config.shuffle_buffer,
                    deterministic=True):
                yield (np.asarray(jitter(host["image"], host["colour_factors"])),
                       host["mask"].astype(np.float32))

    val_images, val_masks = [], []
    for host in data.validation_batches(plan.val_files, image_size=config.image_size,
                                        batch_size=batch):
        real = host["weight"] > 0
        val_images.append(host["image"][real].astype(np.float32))
        val_masks.append(host["mask"][real].astype(np.float32))
    model = keras_recipe.compiled_unet(config.backbone, config.seed, config.learning_rate,
                                       config.loss)
    callbacks = [
        tf_keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=config.plateau_factor, patience=config.plateau_patience,
            min_lr=config.min_learning_rate, min_delta=config.plateau_min_delta),
        tf_keras.callbacks.EarlyStopping(monitor="val_dice_coe", mode="max",
                                         patience=config.early_stopping_patience,
                                         restore_best_weights=True),
        tf_keras.callbacks.ModelCheckpoint(str(run_dir / "best.h5"), monitor="val_dice_coe",
                                           mode="max", save_best_only=True,
                                           save_weights_only=True)]
    fit = model.fit(training_batches(), steps_per_epoch=plan.steps_per_epoch,
                    epochs=config.epochs, validation_data=(np.concatenate(val_images),
                                                           np.concatenate(val_masks)),
                    validation_batch_size=batch, callbacks=callbacks, verbose=2)
    history = {key: [float(v) for v in values] for key, values in fit.history.items()}
    (run_dir / "history.json").write_text(json.dumps(history))


# --- report ----------------------------------------------------------------------------

def write_report(out: Path) -> None:
    results: dict[str, list[dict]] = {}
    for path in sorted((out / "runs").glob("*/result.json")):
        result = json.loads(path.read_text())
        results.setdefault(result["variant"], []).append(result)
    order = [*VARIANTS, *PREDICTED_AGAIN]
    results = {variant: results[variant] for variant in order if variant in results}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    trained = [variant for variant in results if variant in VARIANTS]   # own histories
    lines = [f"# Quality harness: {_DATA.value} data", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
             f"`python benchmarks/quality.py {' '.join(sys.argv[1:])}`.", "",
             "| variant | seeds | held-out Dice mean | spread (sd) | per seed | best "
             "val_dice_coe | best epoch | max val swing after train Dice 0.5 |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, runs in results.items():
        heldout = [r["heldout_dice"] for r in runs]
        swings = [r["max_val_swing_after_train_dice_0.5"] for r in runs
                  if r["max_val_swing_after_train_dice_0.5"] is not None]
        swing = f"{max(swings):.3f}" if swings else "n/a"
        lines.append(
            f"| {variant} | {len(runs)} | {statistics.mean(heldout):.4f} | "
            f"{statistics.stdev(heldout) if len(runs) > 1 else 0:.4f} | "
            f"{', '.join(f'{d:.3f}' for d in heldout)} | "
            f"{statistics.mean(r['best_val_dice_coe'] for r in runs):.4f} | "
            f"{', '.join(str(r['best_epoch']) for r in runs)} | {swing} |")
    lines += ["", "val_dice_coe per epoch, mean \u00b1 sd over the seeds that ran it:", "",
              "| epoch | " + " | ".join(trained) + " |",
              "|---|" + "---|" * len(trained)]
    longest = max(len(r["history"]["val_dice_coe"]) for runs in results.values() for r in runs)
    for epoch in range(longest):
        cells = []
        for runs in (results[variant] for variant in trained):
            values = [r["history"]["val_dice_coe"][epoch] for r in runs
                      if len(r["history"]["val_dice_coe"]) > epoch]
            spread = f" \u00b1 {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{spread}" if values else "")
        lines.append(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
