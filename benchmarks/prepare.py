"""Tiling throughput and peak memory of jaxseg.prepare on one large synthetic slide.

    python benchmarks/prepare.py --size=20000 --work_dir=/tmp/prepare_bench

First writes (or reuses) a size x size synthetic slide in the competition layout:
rendered window by window and streamed into a JPEG-tiled TIFF (--layout), so even
20,000 x 20,000 px never exists as float; the truth is RLE-encoded from a bool mask.
Then tiles it in a fresh process, so that the peak RSS reported is the tiling's alone
(it includes TensorFlow, imported to write the records; its baseline is printed).
"""
from __future__ import annotations

import csv
import multiprocessing
import shutil
import time
from pathlib import Path

from absl import app, flags

from jaxseg import prepare, rle, synthetic

_SIZE = flags.DEFINE_integer("size", 20000, "slide height and width, full-res pixels")
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/prepare_bench",
                                "where the slide and tiles go; the slide is reused")
_LAYOUT = flags.DEFINE_enum("layout", "tiled-jpeg", synthetic.LAYOUTS, "TIFF layout")
_TILE_SIZE = flags.DEFINE_integer("tile_size", 2048, "tile size, full-res pixels")
_REDUCTION = flags.DEFINE_integer("reduction", 4, "downscale factor")


def _make_slide(data_dir: Path, size: int, layout: str) -> None:
    start = time.perf_counter()
    scene = synthetic.make_scene(size, size, seed=0)
    (data_dir / "train").mkdir(parents=True, exist_ok=True)
    synthetic.write_slide(data_dir / "train" / "bench.tiff", scene, layout)
    rendered = time.perf_counter() - start
    encoding = rle.encode(synthetic.glomerulus_mask(scene))
    with open(data_dir / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("id", "encoding"), ("bench", encoding)])
    print(f"slide {size} x {size} ({layout}, {len(scene.glomeruli.cy)} glomeruli): "
          f"rendered and written in {rendered:.0f} s, mask encoded in "
          f"{time.perf_counter() - start - rendered:.0f} s, generator peak RSS "
          f"{_peak_rss_mib():.0f} MiB")


def _tile(data_dir: Path, out_dir: Path, config: prepare.TilingConfig,
          results: multiprocessing.Queue) -> None:
    baseline = _peak_rss_mib()
    jobs = prepare.competition_jobs(data_dir)
    grid = (len(prepare.grid_starts(jobs[0].height, config.tile_size, config.overlap))
            * len(prepare.grid_starts(jobs[0].width, config.tile_size, config.overlap)))
    start = time.perf_counter()
    summary = prepare.prepare(jobs, out_dir, config, workers=1)
    seconds = time.perf_counter() - start
    results.put((grid, summary["slides"]["bench"], seconds, baseline, _peak_rss_mib()))


def _peak_rss_mib() -> float:
    """This process's peak RSS. Not getrusage: Linux carries ru_maxrss over fork+exec,
    so a spawned child would report its parent's peak."""
    status = Path("/proc/self/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) / 1024


def main(argv: list[str]) -> None:
    del argv
    work_dir = Path(_WORK_DIR.value)
    data_dir = work_dir / f"data-{_SIZE.value}-{_LAYOUT.value}"
    if not (data_dir / "train.csv").is_file():
        _make_slide(data_dir, _SIZE.value, _LAYOUT.value)
    out_dir = work_dir / "tiles"
    shutil.rmtree(out_dir, ignore_errors=True)
    config = prepare.TilingConfig(tile_size=_TILE_SIZE.value, reduction=_REDUCTION.value)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_tile, args=(data_dir, out_dir, config, results))
    child.start()
    grid, kept, seconds, baseline, peak = results.get()
    child.join()
    print(f"tiling {_SIZE.value} x {_SIZE.value} ({_LAYOUT.value}) into {config.tile_size} px "
          f"/ {config.reduction}: {grid} tiles read, {kept} kept, {seconds:.1f} s, "
          f"{grid / seconds:.2f} tiles/s ({grid * config.tile_size ** 2 / seconds / 1e6:.0f} "
          f"Mpx/s); peak RSS {peak:.0f} MiB "
          f"(after imports: {baseline:.0f} MiB)")


if __name__ == "__main__":
    app.run(main)
