"""Whole-slide glomerulus masks from trained models: a Kaggle submission CSV.

`python -m jaxseg.predict --workdir=RUN --images='test/*.tiff' --out=submission.csv`

Each slide is seen at the training scale: reduced by the whole factor that brings its
pixel size nearest to the training tiles' micrometres per pixel (`--target_mpp`), read
from the pyramid level nearest that scale, or, for a slide that records no pixel size,
reduced by the factor the tiles were made with (`--reduction`). It is cut into
overlapping windows of the training tile size and predicted in batches over all
devices: every finished fold's best model and, with flip TTA, the four flips of each
window, averaged as probabilities. The windows are blended by `jaxseg.stitch` and
thresholded strip by strip, so the only slide-sized array is the bool mask at model
scale; the full-resolution RLE is computed from it directly.
When the run's tiles were stain-normalised (RUN/prepare.json, `jaxseg.stain`), each
slide's tissue colour statistics are measured at the scale it is predicted at, and every
window is moved onto the tiles' target before the models see it.
Several processes (the hosts of a pod slice) each predict their share of the slides
on their own devices, and process 0 writes the submission. With `--out_dir`, each slide
also gets the files `jaxseg.outputs` writes (polygons, a mask pyramid, statistics), and a
rerun skips the slides whose files all exist.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxseg import (cli, compile_cache, host_memory, models, outputs, parallel, paths, processes,
                    slides, stain, stitch)
from jaxseg.ensembles import SEED_REDUCTION, SEED_TILE_SIZE, Ensemble, load_ensemble

TTA_MODES = ("none", "flips")
STAIN_MODES = ("auto", "none")
_RLE_BLOCK_PIXELS = 1 << 25
# A slide read further than this from --target_mpp (its pixel size times a whole
# reduction) is named, with the scale it is read at.
_MPP_TOLERANCE = 0.03


@dataclasses.dataclass(frozen=True)
class SlideOptions:
    tile: int
    reduction: int
    overlap: int          # pixels at model scale
    blend: str
    batch_size: int       # windows per call of the predictor
    threshold: float
    continue_on_nan: bool = False
    # Micrometres per model pixel to read slides at, when they record their pixel size;
    # None: every slide at `reduction`.
    target_mpp: float | None = None
    # The training tiles' stain normalisation, applied to every window; None: none.
    stain_normalisation: stain.Normalisation | None = None


def _unchanged(x: jax.Array) -> jax.Array:
    return x


def flips_of(tta: str) -> list[Callable[[jax.Array], jax.Array]]:
    """The TTA flips of (N, H, W, ...) arrays; each flip is its own inverse."""
    if tta == "none":
        return [_unchanged]
    if tta == "flips":
        return [_unchanged, lambda x: jnp.flip(x, 2), lambda x: jnp.flip(x, 1),
                lambda x: jnp.flip(x, (1, 2))]
    raise ValueError(f"--tta must be one of {TTA_MODES}, got {tta!r}")


def ensemble_probabilities(stacked_variables: dict, images: jax.Array, *, model: models.Unet,
                           tta: str) -> jax.Array:
    """Mean probability over folds (stacked on a leading axis) and flips: (N, H, W).

    The flipped copies ride in one batch, and `lax.map` runs the folds one after the
    other through a single compiled model.
    """
    flips = flips_of(tta)
    batch = jnp.concatenate([flip(images) for flip in flips])

    def fold_probabilities(variables: dict) -> jax.Array:
        return jax.nn.sigmoid(model.apply(variables, batch, train=False)[..., 0])

    probabilities = jax.lax.map(fold_probabilities, stacked_variables).mean(axis=0)
    views = jnp.split(probabilities, len(flips))
    return sum(flip(view) for flip, view in zip(flips, views)) / len(flips)


class BatchPredictor:
    """uint8 windows -> probabilities on this process's devices, for stitch.

    Every call gets the full batch of this process's devices (a short last batch is
    padded, and the padding's rows come back for stitch to ignore), so the program
    compiles once, and once for any number of variable sets given to `use` (training
    gives it each epoch's weights). The result is returned before it is computed:
    stitch reads the next windows while the devices work.
    """

    def __init__(self, model: models.Unet, tta: str, per_device_batch: int):
        if per_device_batch < 1:
            raise cli.InputError(f"--batch_size must be >= 1, got {per_device_batch}")
        if tta not in TTA_MODES:
            raise ValueError(f"--tta must be one of {TTA_MODES}, got {tta!r}")
        self._mesh = parallel.make_mesh(jax.local_devices())
        self._step = parallel.data_parallel(
            functools.partial(ensemble_probabilities, model=model, tta=tta), self._mesh,
            num_args=2, batch_args=(1,), shard_outputs=True)
        self.global_batch = per_device_batch * jax.local_device_count()
        self._stacked = None

    def use(self, variables: list[dict]) -> None:
        """Averages these models (host or replicated arrays) from the next call on."""
        stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *jax.device_get(variables))
        self._stacked = parallel.replicate(stacked, self._mesh)

    def __call__(self, windows: np.ndarray) -> jax.Array:
        if len(windows) < self.global_batch:
            padding = np.zeros((self.global_batch - len(windows), *windows.shape[1:]),
                               windows.dtype)
            windows = np.concatenate([windows, padding])
        images = parallel.to_global_batch({"image": windows}, self._mesh)["image"]
        return self._step(self._stacked, images)


def make_batch_predictor(ensemble: Ensemble, tta: str, per_device_batch: int
                         ) -> tuple[Callable[[np.ndarray], jax.Array], int]:
    """(predict_fn for stitch, windows per call) of the ensemble's models."""
    predictor = BatchPredictor(ensemble.model, tta, per_device_batch)
    predictor.use(ensemble.variables)
    return predictor, predictor.global_batch


def predict_slide(slide: slides.Slide, predict_fn: stitch.PredictFn, options: SlideOptions,
                  description: str = "", probabilities: np.ndarray | None = None) -> np.ndarray:
    """Bool mask of the slide at model scale, (ceil(H / reduction), ceil(W / reduction)),
    and, into `probabilities` when given, the uint8 probabilities (see stitch.predict_mask).

    NaN or infinite probabilities stop with the slide and window named, or, with
    `options.continue_on_nan`, count as background and the windows are named in one
    warning line per slide.
    """
    height, width = slides.model_scale_shape(slide.height, slide.width, options.reduction)
    grid = stitch.plan_windows(height, width, options.tile, options.overlap)
    read = slides.scaled_reader(slide, options.reduction)
    if options.stain_normalisation is not None:
        transfer = options.stain_normalisation.transfer(slide, options.reduction)
        if transfer is None:
            print(f"note: {slide.path}: no tissue pixels to measure the stain of; predicted "
                  "without stain normalisation", file=sys.stderr, flush=True)
        else:
            read = transfer.reader(read)
    not_finite: list[str] = []
    with tqdm(total=grid.num_windows, desc=description, unit="window", leave=False,
              disable=not processes.is_main()) as bar:
        try:
            mask = stitch.predict_mask(
                grid, read, predict_fn, options.threshold,
                probabilities, blend=options.blend, batch_size=options.batch_size,
                progress=bar.update,
                on_not_finite=not_finite.append if options.continue_on_nan else None)
        except FloatingPointError as error:
            raise cli.Diverged(f"{slide.path}: {error} (pixels at 1/{options.reduction} "
                               "scale); stopped") from None
    if not_finite:
        print(f"warning: {slide.path}: {len(not_finite)} of {grid.num_windows} windows had "
              f"NaN or infinite probabilities, counted as background (pixels at "
              f"1/{options.reduction} scale): {'; '.join(not_finite[:3])}"
              f"{'; ...' if len(not_finite) > 3 else ''}", file=sys.stderr, flush=True)
    return mask


def describe_stain(normalisation: stain.Normalisation, source: str) -> str:
    """The line a command prints once when it stain-normalises the slides it predicts."""
    target = normalisation.target
    return (f"stain: each slide's tissue colours are normalised (Reinhard) to the target of "
            f"{source} (L*a*b* mean {', '.join(f'{v:.1f}' for v in target.mean)}, std "
            f"{', '.join(f'{v:.1f}' for v in target.std)})")


def slide_reduction(slide: slides.Slide, options: SlideOptions, said: set[str]) -> int:
    """The slide's reduction: the whole number nearest `options.target_mpp` by its pixel
    size, else `options.reduction`. A slide read at a scale more than _MPP_TOLERANCE
    from the target is named with that scale; of the slides without a pixel size, the
    first is named (`said` remembers it across slides)."""
    reduction = slides.reduction_for(slide, options.target_mpp, options.reduction)
    if options.target_mpp is None:
        return reduction
    if slide.mpp is None:
        if "no pixel size" not in said:
            said.add("no pixel size")
            print(f"note: {slide.path} records no pixel size: it and other slides without "
                  f"one are read at 1/{reduction} (--reduction)", file=sys.stderr, flush=True)
    elif abs(reduction * slide.mpp / options.target_mpp - 1) > _MPP_TOLERANCE:
        print(f"note: {slide.path}: {slide.mpp:.4g} \u00b5m/px, read at 1/{reduction}: "
              f"{reduction * slide.mpp:.4g} \u00b5m/px, the nearest whole reduction to "
              f"{options.target_mpp:g} \u00b5m/px", file=sys.stderr, flush=True)
    return reduction


def encode_upsampled(mask: np.ndarray, reduction: int, shape: tuple[int, int]) -> str:
    """Competition RLE of `mask` upsampled `reduction` times (nearest) and cropped to shape.

    Computed from the runs of the small mask: each run down a model-scale column
    becomes a run in each of the `reduction` full-resolution columns it covers, and
    a run reaching the bottom of a column joins one starting at the top of the next.
    The full-resolution mask (up to 2 G pixels) is never built.
    """
    height, width = shape
    if mask.shape != slides.model_scale_shape(height, width, reduction):
        raise ValueError(f"mask shape {mask.shape} is not {shape} reduced {reduction} times")
    starts, ends = [], []
    cols_per_block = max(1, _RLE_BLOCK_PIXELS // (mask.shape[0] + 1))
    for c0 in range(0, mask.shape[1], cols_per_block):
        block = mask[:, c0:c0 + cols_per_block].T.astype(np.int8)
        edges = np.diff(block, axis=1, prepend=0, append=0)
        run_cols, run_rows = np.nonzero(edges)  # per column: start, end, start, end, ...
        col = run_cols[0::2].astype(np.int64) + c0
        top = run_rows[0::2].astype(np.int64) * reduction
        bottom = np.minimum(run_rows[1::2].astype(np.int64) * reduction, height)
        copies = np.minimum(reduction, width - col * reduction)
        first_copy = np.cumsum(copies) - copies
        offset = np.arange(copies.sum()) - np.repeat(first_copy, copies)
        full_col = np.repeat(col * reduction, copies) + offset
        order = np.argsort(full_col * height + np.repeat(top, copies), kind="stable")
        starts.append((full_col * height + np.repeat(top, copies))[order])
        ends.append((full_col * height + np.repeat(bottom, copies))[order])
    starts, ends = np.concatenate(starts), np.concatenate(ends)
    if not len(starts):
        return ""
    separate = starts[1:] != ends[:-1]
    run_starts = starts[np.r_[True, separate]]
    run_ends = ends[np.r_[separate, True]]
    pairs = np.stack([run_starts + 1, run_ends - run_starts], axis=1).ravel()
    return " ".join(map(str, pairs.tolist()))


def find_images(pattern: str) -> list[paths.Path]:
    found = paths.glob(pattern)
    if not found:
        raise cli.MissingInput(f"--images {pattern!r}: no files match")
    ids = [slides.image_id(path) for path in found]
    duplicates = sorted({image_id for image_id in ids if ids.count(image_id) > 1})
    if duplicates:
        raise cli.InputError(f"--images {pattern!r}: several files share the id "
                             f"{duplicates[0]!r} (ids are file names without extension)")
    return found


def check_readable(images: list[paths.Path]) -> None:
    """Opens every image before hours of prediction: a bad file fails now, not last."""
    for path in images:
        with slides.open_slide(path):
            pass


def predict_to_csv(images: list[paths.Path], predict_fn: stitch.PredictFn,
                   options: SlideOptions, out: str | os.PathLike,
                   slide_outputs: outputs.SlideOutputs = outputs.SlideOutputs()) -> None:
    """Writes `id,predicted` rows to `out`: whole, or nothing if any slide fails; and each
    slide's `slide_outputs`, a slide whose files all exist being read back, not predicted.

    With several processes each predicts every `process_count`-th image and writes its
    files, and process 0 writes all rows in the order of `images`.
    """
    share = images[jax.process_index()::jax.process_count()]
    rows, stats = {}, {}
    said: set[str] = set()
    for number, path in enumerate(tqdm(share, desc="slides", unit="slide",
                                       disable=not processes.is_main())):
        image_id = slides.image_id(path)
        if slide_outputs.finished(image_id):
            rows[image_id], stats[image_id] = slide_outputs.reuse(image_id)
            continue
        with slides.open_slide(path) as slide:
            reduction = slide_reduction(slide, options, said)
            probabilities = slide_outputs.probability_buffer(slide, reduction)
            mask = predict_slide(slide, predict_fn,
                                 dataclasses.replace(options, reduction=reduction),
                                 f"{image_id} ({number + 1}/{len(share)})", probabilities)
            rows[image_id] = encode_upsampled(mask, reduction, (slide.height, slide.width))
            stats[image_id] = slide_outputs.write(slide, image_id, mask, probabilities,
                                                  reduction, rows[image_id])
        del mask, probabilities
        host_memory.fall_back_if_crowded()
        host_memory.release_freed_memory()
    for process_rows, process_stats in processes.gathered([rows, stats]):
        rows.update(process_rows)
        stats.update(process_stats)
    if processes.is_main():
        paths.make_parent(out)
        with paths.atomic_open(out) as file:
            writer = csv.writer(file)
            writer.writerow(["id", "predicted"])
            writer.writerows([slides.image_id(path), rows[slides.image_id(path)]]
                             for path in images)
        slide_outputs.write_table([stats[slides.image_id(path)] for path in images])


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training run directory (config.json, fold_K/best).")
    flags.DEFINE_string("checkpoint", None, "One fold directory (RUN/fold_K) instead of all "
                        "folds of --workdir.")
    flags.DEFINE_bool("allow_unfinished_folds", False, "Also predict with folds whose "
                      "training has not ended (no result.json): their best model so far.")
    flags.DEFINE_string("keras_weights", None, "Directory written by jaxseg.convert "
                        "(converted Keras weights) instead of checkpoints.")
    flags.DEFINE_string("images", None, "Glob of slides or tiles (TIFF, SVS, NDPI, SCN, "
                        "OME-TIFF; MRXS and other OpenSlide formats with the extra wsi; "
                        "PNG, JPEG).", required=True)
    flags.DEFINE_string("out", "submission.csv", "Submission CSV to write (id,predicted).")
    cli.define_tiling_flags(
        tile_size=None, reduction=None, overlap=0.25,
        tile_size_note=f" Default: the run's image_size, else {SEED_TILE_SIZE}.",
        reduction_note=f" Slides that record their pixel size are reduced to --target_mpp "
                       f"instead. Default: the training tiles' (RUN/prepare.json), else "
                       f"{SEED_REDUCTION} (the seed's).")
    flags.DEFINE_float("target_mpp", None, "Micrometres per pixel at model scale: a slide "
                       "that records its pixel size is reduced by the whole factor nearest "
                       "this, read from the pyramid level nearest it. Default: the training "
                       "tiles' (the slides' pixel size in RUN/prepare.json times the "
                       f"reduction, else {slides.RECIPE_SLIDE_MPP} \u00b5m/px times it, the "
                       "HuBMAP slides').")
    flags.DEFINE_enum("blend", "center", list(stitch.BLENDS), "How overlapping windows "
                      "combine: keep each window's centre, or Gaussian weights.")
    flags.DEFINE_enum("tta", "flips", list(TTA_MODES), "Test-time augmentation: none, or "
                      "the mean over identity, left-right, up-down and both flips.")
    flags.DEFINE_string("threshold", "0.5", "Probability above which a pixel is glomerulus, "
                        "or 'run': the mean of the thresholds the run's folds chose on their "
                        "validation tiles (result.json).")
    flags.DEFINE_enum("stain_normalisation", "auto", list(STAIN_MODES), "auto: normalise "
                      "each slide's stain as the training tiles were (the target in "
                      "RUN/prepare.json, when jaxseg.prepare --stain_normalisation made "
                      "them); none: predict the slides' own colours.")
    flags.DEFINE_integer("batch_size", 4, "Windows per device per step (times 4 with "
                         "flip TTA).")
    flags.DEFINE_bool("continue_on_nan", False, "Go on when a window's predicted "
                      "probabilities are NaN or infinite: those pixels count as background "
                      "and the windows are named in a warning per slide (default: stop, "
                      "naming slide and window).")
    flags.DEFINE_string("overlays", None, "Directory for downscaled PNG overlays of the "
                        "prediction on each image (<id>.png).")
    flags.DEFINE_string("out_dir", None, "Directory for per-slide files (--outputs) and each "
                        "slide's RLE; a slide whose files all exist is not predicted again.")
    flags.DEFINE_list("outputs", list(outputs.DEFAULT_KINDS), "Per-slide files in --out_dir: "
                      "geojson (QuPath polygons), mask_tiff (pyramidal OME-TIFF), stats "
                      "(CSV row; all in stats.csv), overlay (PNG).")
    flags.DEFINE_string("truth", None, "RLE CSV (id,encoding, as train.csv): overlays show "
                        "true positives green, false positives red, false negatives blue.")
    flags.DEFINE_bool("overwrite", False, "Predict and write slides already finished in "
                      "--out_dir again.")
    processes.define_flags()
    compile_cache.define_flags()


def target_scale(target_mpp: float | None, ensemble: Ensemble) -> tuple[float, str]:
    """(--target_mpp, where it comes from): given, else the training tiles' scale."""
    if target_mpp is not None:
        if target_mpp <= 0:
            raise cli.InputError(f"--target_mpp must be positive, got {target_mpp:g}")
        return target_mpp, "--target_mpp"
    if ensemble.mpp is not None:
        return ensemble.mpp, "the training tiles'"
    return (slides.RECIPE_SLIDE_MPP * ensemble.reduction,
            f"the training tiles', assuming {slides.RECIPE_SLIDE_MPP:g} \u00b5m/px slides")


def chosen_threshold(flag: str, ensemble: Ensemble) -> float:
    """--threshold: a probability in (0, 1), or 'run', the folds' own choice."""
    if flag == "run":
        if ensemble.threshold is None:
            raise cli.InputError(f"--threshold=run: {ensemble.no_threshold_because}")
        return ensemble.threshold
    try:
        threshold = float(flag)
    except ValueError:
        threshold = -1.0
    if not 0 < threshold < 1:
        raise cli.InputError(f"--threshold must be a probability in (0, 1) or 'run', "
                             f"got {flag!r}")
    return threshold


def main() -> None:
    from absl import flags

    host_memory.use_fast_allocator()
    compile_cache.enable_from_flags()  # first: joining turns it off where it must
    processes.join_from_flags()
    config = flags.FLAGS
    overlap = cli.overlap_fraction(config.overlap)
    images = find_images(config.images)
    slide_outputs = outputs.from_flags(config, [slides.image_id(path) for path in images])
    check_readable(images[jax.process_index()::jax.process_count()])
    ensemble = load_ensemble(config.workdir, config.checkpoint, config.keras_weights,
                             config.tile_size, config.reduction, config.allow_unfinished_folds)
    target_mpp, mpp_source = target_scale(config.target_mpp, ensemble)
    predict_fn, global_batch = make_batch_predictor(ensemble, config.tta, config.batch_size)
    if host_memory.keeps_freed_memory():
        # One batch first (it compiles the program): with its buffers allocated once, the
        # process knows whether it has room to keep them.
        jax.block_until_ready(predict_fn(
            np.zeros((global_batch, ensemble.tile, ensemble.tile, 3), np.uint8)))
        host_memory.fall_back_if_crowded()
    options = SlideOptions(tile=ensemble.tile, reduction=ensemble.reduction,
                           overlap=round(overlap * ensemble.tile), blend=config.blend,
                           batch_size=global_batch,
                           threshold=chosen_threshold(config.threshold, ensemble),
                           continue_on_nan=config.continue_on_nan, target_mpp=target_mpp,
                           stain_normalisation=(ensemble.stain_normalisation
                                                if config.stain_normalisation == "auto"
                                                else None))
    if processes.is_main():
        print(f"{len(images)} images; {len(ensemble.variables)} model(s) from "
              f"{ensemble.source}; {ensemble.tile} px windows at {target_mpp:g} \u00b5m/px "
              f"({mpp_source}; 1/{ensemble.reduction} scale for slides without a pixel size), "
              f"overlap {options.overlap} px, {config.blend} blend, TTA {config.tta}, "
              f"threshold {options.threshold:g}, "
              f"{jax.device_count()} devices in {jax.process_count()} process(es)",
              file=sys.stderr, flush=True)
        if options.stain_normalisation is not None:
            print(describe_stain(options.stain_normalisation, "the training tiles (RUN/"
                                 "prepare.json)") + "; --stain_normalisation=none turns it off",
                  file=sys.stderr, flush=True)
    predict_to_csv(images, predict_fn, options, config.out, slide_outputs)
    if processes.is_main():
        print(f"wrote {config.out}", file=sys.stderr)


def run() -> None:
    """Where `python -m jaxseg.predict` and the console script `jaxseg-predict` start, so
    both parse the same flags and report errors alike."""
    define_flags()
    cli.run_main(main)


if __name__ == "__main__":
    run()
