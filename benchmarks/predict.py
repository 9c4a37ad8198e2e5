"""Whole-slide prediction throughput and peak memory, beside the Keras model's `predict`.

    python benchmarks/predict.py --size=20000 --work_dir=/tmp/predict_bench

1. Writes (or reuses, or takes from --slide) a size x size synthetic slide, a
   JPEG-tiled TIFF, rendered window by window.
2. In a fresh process with TensorFlow: builds the recipe's Keras model,
   segmentation_models Unet(--backbone) with random weights, saves them, reads the
   slide's windows exactly as jaxseg.predict plans them, and times `model.predict`
   on those windows (batch --batch_size).
3. In a fresh process with JAX only: converts the same weights (jaxseg.convert) and
   times jaxseg.predict's whole pipeline on the slide (read, downscale, predict,
   stitch, threshold, RLE, CSV), then the compiled predictor alone on the same
   windows, and compares its probabilities with Keras'.

Each process reports its own peak RSS. Same machine, same run, same windows and
weights; TTA is off by default so that both sides evaluate each window once.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import resource
import shutil
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from jaxseg import host_memory

_SIZE = flags.DEFINE_integer("size", 20000, "slide height and width, full-res pixels")
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/predict_bench",
                                "where the slide, weights and outputs go; reused")
_SLIDE = flags.DEFINE_string("slide", None, "an existing slide to use instead of a "
                             "synthetic one")
_BACKBONE = flags.DEFINE_string("backbone", "efficientnetb0", "EfficientNet variant")
_TILE = flags.DEFINE_integer("tile", 512, "window size at model scale")
_REDUCTION = flags.DEFINE_integer("reduction", 4, "full-res pixels per model pixel")
_OVERLAP = flags.DEFINE_float("overlap", 0.25, "window overlap, fraction of the window")
_TTA = flags.DEFINE_enum("tta", "none", ["none", "flips"], "jaxseg.predict's TTA")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "windows per batch (per device "
                                   "for JAX)")
_PIPELINE_ONLY = flags.DEFINE_bool("pipeline_only", False, "Only jaxseg.predict's whole "
                                   "pipeline and its peak RSS (no Keras, no model-only "
                                   "timing, no window held in memory): for slides too big "
                                   "to compare cheaply")
_COMPARED_WINDOWS = 16


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _make_slide(path: Path, size: int) -> None:
    from jaxseg import synthetic

    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    synthetic.write_slide(partial, synthetic.make_scene(size, size, seed=0), "tiled-jpeg")
    partial.rename(path)
    print(f"slide {size} x {size} written in {time.perf_counter() - start:.0f} s", flush=True)


def _windows(slide_path: Path, tile: int, reduction: int, overlap: float
             ) -> tuple[np.ndarray, float]:
    """Every window jaxseg.predict would read, and the seconds reading them took."""
    from jaxseg import slides, stitch

    with slides.open_slide(slide_path) as slide:
        height, width = slides.model_scale_shape(slide.height, slide.width, reduction)
        grid = stitch.plan_windows(height, width, tile, round(overlap * tile))
        read = slides.scaled_reader(slide, reduction)
        start = time.perf_counter()
        windows = np.stack([stitch.pad_to_tile(read(y, min(y + tile, height), x,
                                                     min(x + tile, width)), tile)
                            for y, x in grid.windows()])
    return windows, time.perf_counter() - start


def _keras_model(settings: dict):
    """The recipe's model with seeded random weights, saved for the JAX stage."""
    import os
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import segmentation_models as sm
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    model = sm.Unet(settings["backbone"], encoder_weights=None, input_shape=(None, None, 3))
    model.save_weights(settings["weights"])
    return model


def _weights_stage(settings: dict, results: multiprocessing.Queue) -> None:
    _keras_model(settings)
    results.put({})


def _keras_stage(settings: dict, results: multiprocessing.Queue) -> None:
    model = _keras_model(settings)
    windows, read_seconds = _windows(settings["slide"], settings["tile"],
                                     settings["reduction"], settings["overlap"])
    batch = settings["batch_size"]
    model.predict(windows[:batch].astype(np.float32), batch_size=batch, verbose=0)
    start = time.perf_counter()
    probabilities = model.predict(windows.astype(np.float32), batch_size=batch, verbose=0)
    seconds = time.perf_counter() - start
    np.save(settings["keras_probabilities"], probabilities[:_COMPARED_WINDOWS, ..., 0])
    results.put({"windows": len(windows), "read_seconds": read_seconds,
                 "predict_seconds": seconds, "peak_rss_mib": _peak_rss_mib()})


def _jax_stage(settings: dict, results: multiprocessing.Queue) -> None:
    from jaxseg import host_memory

    allocator = host_memory.use_fast_allocator()  # as `jaxseg.predict` does (preloaded: _run)
    import jax

    from jaxseg import convert, ensembles, predict, slides, stitch

    converted = Path(settings["converted"])
    shutil.rmtree(converted, ignore_errors=True)  # the Keras stage wrote new weights
    convert.convert_to_dir(settings["weights"], settings["backbone"], converted)
    ensemble = ensembles.load_ensemble(None, keras_weights=str(converted),
                                       tile_size=settings["tile"],
                                       reduction=settings["reduction"])
    predict_fn, global_batch = predict.make_batch_predictor(ensemble, settings["tta"],
                                                            settings["batch_size"])
    start = time.perf_counter()
    empty = np.zeros((global_batch, ensemble.tile, ensemble.tile, 3), np.uint8)
    jax.block_until_ready(predict_fn(empty))
    compile_seconds = time.perf_counter() - start
    rss_before = _peak_rss_mib()
    options = predict.SlideOptions(
        tile=ensemble.tile, reduction=ensemble.reduction,
        overlap=round(settings["overlap"] * ensemble.tile), blend="center",
        batch_size=global_batch, threshold=0.5)
    start = time.perf_counter()
    predict.predict_to_csv([Path(settings["slide"])], predict_fn, options,
                           settings["submission"])
    pipeline_seconds = time.perf_counter() - start
    pipeline_rss = _peak_rss_mib()
    summary = {"devices": jax.device_count(), "platform": jax.devices()[0].platform,
               "compile_seconds": compile_seconds, "allocator": allocator,
               "pipeline_seconds": pipeline_seconds, "rss_after_compile_mib": rss_before,
               "pipeline_peak_rss_mib": pipeline_rss,
               "windows": stitch.plan_windows(
                   *slides.model_scale_shape(*_slide_shape(settings["slide"]),
                                              ensemble.reduction),
                   ensemble.tile, options.overlap).num_windows}
    if settings["pipeline_only"]:
        results.put(summary)
        return

    windows, _ = _windows(settings["slide"], settings["tile"], settings["reduction"],
                          settings["overlap"])
    start = time.perf_counter()
    outputs = [predict_fn(windows[i:i + global_batch])
               for i in range(0, len(windows), global_batch)]
    jax.block_until_ready(outputs)
    model_seconds = time.perf_counter() - start
    ours = np.concatenate([np.asarray(output) for output in outputs])[:len(windows)]
    ours = ours[:_COMPARED_WINDOWS]
    theirs = np.load(settings["keras_probabilities"])
    results.put({**summary, "model_seconds": model_seconds,
                 "max_probability_difference": float(np.abs(ours - theirs).max()),
                 "mask_agreement": float(np.mean((ours > 0.5) == (theirs > 0.5)))})


def _slide_shape(path: str) -> tuple[int, int]:
    from jaxseg import slides

    with slides.open_slide(path) as slide:
        return slide.height, slide.width


def _run(stage, settings: dict) -> dict:
    """Runs `stage` in a fresh interpreter; jaxseg's stage under the allocator that
    `jaxseg.predict` puts in force (its re-execution cannot work in a spawned child)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=stage, args=(settings, results))
    preloads = host_memory.preload_environment() if stage is _jax_stage else {}
    saved = {name: os.environ.get(name) for name in preloads}
    os.environ.update(preloads)
    try:
        child.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    while True:
        try:
            result = results.get(timeout=1)
            break
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(f"{stage.__name__} failed (exit code {child.exitcode}); "
                                   "its traceback is above") from None
    child.join()
    return result


def main(argv: list[str]) -> None:
    del argv
    work_dir = Path(_WORK_DIR.value)
    slide = Path(_SLIDE.value) if _SLIDE.value else work_dir / f"slide-{_SIZE.value}.tiff"
    if not slide.exists():
        _make_slide(slide, _SIZE.value)
    tag = f"{_BACKBONE.value}-{_TILE.value}"
    settings = {"slide": str(slide), "backbone": _BACKBONE.value, "tile": _TILE.value,
                "reduction": _REDUCTION.value, "overlap": _OVERLAP.value, "tta": _TTA.value,
                "batch_size": _BATCH_SIZE.value,
                "weights": str(work_dir / f"keras-{_BACKBONE.value}.h5"),
                "converted": str(work_dir / f"converted-{_BACKBONE.value}"),
                "keras_probabilities": str(work_dir / f"keras-{tag}.npy"),
                "submission": str(work_dir / f"submission-{tag}.csv"),
                "pipeline_only": _PIPELINE_ONLY.value}
    if _PIPELINE_ONLY.value:
        _run(_weights_stage, settings)
        ours = _run(_jax_stage, settings)
        print(f"slide {slide} at 1/{_REDUCTION.value}: {ours['windows']} windows of "
              f"{_TILE.value} px (overlap {_OVERLAP.value}), Unet-{_BACKBONE.value}, batch "
              f"{_BATCH_SIZE.value}, TTA {_TTA.value}; allocator: "
              f"{ours['allocator']}")
        print(f"  jaxseg.predict whole pipeline: {ours['pipeline_seconds']:.0f} s; peak RSS "
              f"{ours['pipeline_peak_rss_mib']:.0f} MiB ({ours['rss_after_compile_mib']:.0f} "
              "MiB after imports + compile)")
        return
    keras = _run(_keras_stage, settings)
    ours = _run(_jax_stage, settings)
    views = 4 if _TTA.value == "flips" else 1
    windows = ours["windows"]
    print(f"slide {slide} at 1/{_REDUCTION.value}: {windows} windows of {_TILE.value} px "
          f"(overlap {_OVERLAP.value}), Unet-{_BACKBONE.value}, batch {_BATCH_SIZE.value}")
    print(f"  reading + downscaling windows:  {windows / keras['read_seconds']:7.2f} windows/s")
    print(f"  Keras model.predict:            {windows / keras['predict_seconds']:7.2f} "
          f"windows/s  (peak RSS {keras['peak_rss_mib']:.0f} MiB, windows held in memory)")
    print(f"  jaxseg predictor, model only:   {windows * views / ours['model_seconds']:7.2f} "
          f"model evaluations/s on {ours['devices']} {ours['platform']} device(s), TTA "
          f"{_TTA.value}; compile {ours['compile_seconds']:.0f} s")
    print(f"  jaxseg.predict whole pipeline:  {windows / ours['pipeline_seconds']:7.2f} "
          f"windows/s ({ours['pipeline_seconds']:.0f} s for the slide incl. RLE + CSV); "
          f"peak RSS {ours['pipeline_peak_rss_mib']:.0f} MiB "
          f"({ours['rss_after_compile_mib']:.0f} MiB after imports + compile)")
    print(f"  JAX (TTA {_TTA.value}) vs Keras on the first {_COMPARED_WINDOWS} windows: "
          f"max |p_jax - p_keras| "
          f"{ours['max_probability_difference']:.2e}, thresholded agreement "
          f"{ours['mask_agreement']:.6f}")


if __name__ == "__main__":
    app.run(main)
