"""Input pipeline throughput: read + decode + augment + batch, in images per second.

The pipeline must outpace the accelerator, or training waits on the host CPU; this
measures it on random tiles written to a temporary directory, so no data set is needed.

    python benchmarks/input_pipeline.py --image_size=512 --batch_size=8
    taskset -c 0 python benchmarks/input_pipeline.py     # one core: images/s per core

It also reports what one example costs on its way to the device (the batch's bytes).
"""
from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags
import numpy as np

from jaxseg.augment import default_augment_config
from jaxseg.data import list_record_files, train_batches
from jaxseg.records import write_records

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "tile side in pixels")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "host batch size")
_NUM_TILES = flags.DEFINE_integer("num_tiles", 64, "random tiles written to disk")
_NUM_FILES = flags.DEFINE_integer("num_files", 2, "record files the tiles are split into")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 10, "batches read before timing")
_TIMED_BATCHES = flags.DEFINE_integer("timed_batches", 50, "batches timed")
_DETERMINISTIC = flags.DEFINE_boolean("deterministic", False, "reproducible order")
_XLA_COMPILE = flags.DEFINE_boolean("xla_compile", True, "compile the augmentation with XLA")


def _write_random_tiles(directory: str) -> list[str]:
    rng = np.random.default_rng(0)
    side = _IMAGE_SIZE.value
    per_file = _NUM_TILES.value // _NUM_FILES.value
    for file_index in range(_NUM_FILES.value):
        write_records(directory, f"random{file_index}",
                      ((rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
                        rng.random((side, side)) > 0.5) for _ in range(per_file)))
    return list_record_files(directory)


def main(argv: list[str]) -> None:
    del argv
    with tempfile.TemporaryDirectory() as directory:
        files = _write_random_tiles(directory)
        augment_config = default_augment_config()
        augment_config.xla_compile = _XLA_COMPILE.value
        batches = train_batches(
            files, image_size=_IMAGE_SIZE.value, batch_size=_BATCH_SIZE.value,
            steps=_WARMUP_BATCHES.value + _TIMED_BATCHES.value, seed=0, epoch=0,
            augment_config=augment_config, deterministic=_DETERMINISTIC.value)
        for _ in range(_WARMUP_BATCHES.value):
            batch = next(batches)
        start = time.perf_counter()
        for _ in batches:
            pass
        seconds = time.perf_counter() - start
    images = _TIMED_BATCHES.value * _BATCH_SIZE.value
    cores = len(os.sched_getaffinity(0))
    bytes_per_example = sum(value.nbytes for value in batch.values()) / _BATCH_SIZE.value
    print(f"input pipeline {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value} batch {_BATCH_SIZE.value} "
          f"(deterministic={_DETERMINISTIC.value}, xla_compile={_XLA_COMPILE.value}, "
          f"{cores} cores): {images / seconds:.0f} images/s over {images} images, "
          f"{images / seconds / cores:.0f} per core; {bytes_per_example:,.0f} bytes per "
          f"example to the device ({', '.join(f'{k} {v.dtype}' for k, v in batch.items())})")


if __name__ == "__main__":
    app.run(main)
