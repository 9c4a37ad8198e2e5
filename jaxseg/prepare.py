"""Cuts slides into the recipe's TFRecord tiles.

    python -m jaxseg.prepare --competition_dir=COMPETITION_DIR --out_dir=TILES_DIR
    python -m jaxseg.prepare --images=DIR --masks=DIR --out_dir=TILES_DIR

Competition mode reads `train/<id>.tiff` and the full-resolution RLE masks of
`train.csv` (id,encoding); image mode pairs PNG/JPEG/TIFF images (or any slide format
jaxseg.slides reads, at full resolution) with binary PNG/JPEG/TIFF masks of the same id
(the file name without its image extension; nonzero = glomerulus), any size. Each slide
or image becomes `<id>-<count>.tfrec` (jaxseg.records) and `OUT_DIR/prepare.json`
records {tile_size, reduction, overlap, thresholds, padding, slide_mpp, slides: {id:
count}, skipped_slides: [id]}: training checks its files against it, and prediction
reads the reduction and the tiles' scale (slide_mpp * reduction micrometres per pixel)
from it. slide_mpp is the slides' pixel size in micrometres (their median), null unless
every slide records one. A slide none of whose tiles passes the background filter is
skipped with a warning: it has no record file.

Stain normalisation (--stain_normalisation=reinhard, `jaxseg.stain`): before any tile is
cut, every slide's tissue colour statistics are measured; their mean is the target, and
each kept tile is moved from its slide's statistics onto it (the background filter sees
the slide's own colours, so the same tiles are kept). prepare.json then records
`stain_normalisation: {method, target: {mean, std}, slides: {id: {mean, std}}}` (L*a*b*),
and predict normalises the slides it predicts to the same target. A slide without
tissue pixels has no statistics: it is named and its tiles are left as they are.

Tiling: --tile_size is the tile at model scale, as in predict (512, the recipe's); a
grid of full-resolution windows of tile_size * reduction pixels, overlapping by the
fraction --overlap, covers every pixel; the slide is padded with zeros split evenly on
both sides (as iafoss's HuBMAP tiling notebook, which the seed's dataset follows,
does). Each window is shrunk --reduction times by area averaging (the mask: True where
at least half of the block is). prepare.json records the full-resolution sizes.

Background filter (the same rule as that notebook, applied to the reduced tile):
a tile is kept only if more than --min_pixels of its pixels have an 8-bit HSV
saturation, round(255 * (max - min) / max), above --saturation_threshold (40), and
its pixel sum exceeds --min_pixels too (drops black padding). The notebook uses
1000 * (size // 256)**2 for 256-px tiles: 1000 for 256, 4000 for the seed's 512. The
default here is 1000 * (size / 256)**2, rounded: identical for multiples of 256, and
still proportional to the area for smaller tiles, where the notebook's integer
division would give 0 and keep blank glass.

Memory: slides are read window by window (jaxseg.slides) and masks decoded only per
window from the parsed RLE runs (jaxseg.rle.RleMask), never as a whole-slide array;
a worker holds about one full-resolution window. Slides run in parallel across
--workers processes. All inputs are checked before anything is written; one prepare
at a time holds OUT_DIR (jaxseg.locking). Tiles are written to a hidden staging
directory and moved into OUT_DIR only when every slide has succeeded, so a failed run
leaves no .tfrec or prepare.json behind; the same command run again (after a kill, a
failure or a fix of one bad slide) reuses the slides the staging directory holds
finished and tiles the rest. A rerun replaces the records of the slides it writes; an
OUT_DIR holding records of other slides is refused: training would mix the two tilings.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from absl import flags
from tqdm import tqdm

from jaxseg import cli, locking, paths, records, rle, stain
from jaxseg.rle import RleMask
from jaxseg.slides import IMAGE_SUFFIXES, RECIPE_REDUCTION, RECIPE_TILE_SIZE, SLIDE_SUFFIXES, \
    TIFF_SUFFIXES, MaskImage, Slide, downscale_area, image_id, open_mask, open_slide

PREPARE_JSON = "prepare.json"
_STAGING_PREFIX = ".prepare-staging-"
_DONE_SUFFIX = ".done.json"
PADDING = "zeros, split evenly before and after"


@dataclass(frozen=True)
class TilingConfig:
    tile_size: int = RECIPE_TILE_SIZE   # full-resolution pixels
    reduction: int = RECIPE_REDUCTION
    overlap: int = 0                    # full-resolution pixels
    saturation_threshold: int = 40
    min_pixels: int | None = None       # None: default_min_pixels of the reduced size
    stain_normalisation: str = "none"   # one of stain.METHODS

    def __post_init__(self):
        if self.stain_normalisation not in stain.METHODS:
            raise cli.InputError(f"--stain_normalisation must be one of "
                                 f"{', '.join(stain.METHODS)}, got {self.stain_normalisation!r}")
        if self.tile_size < 1 or self.reduction < 1:
            raise cli.InputError("tile_size and reduction must be positive")
        if self.tile_size % self.reduction:
            raise cli.InputError(f"tile_size {self.tile_size} is not divisible by reduction "
                                 f"{self.reduction}")
        if not 0 <= self.overlap < self.tile_size:
            raise cli.InputError(f"overlap {self.overlap} must be >= 0 and below tile_size "
                                 f"{self.tile_size}")
        if self.min_pixels is None:
            object.__setattr__(self, "min_pixels",
                               default_min_pixels(self.tile_size // self.reduction))


def default_min_pixels(reduced_size: int) -> int:
    """The notebook's 1000 * (size // 256)**2, made proportional to the tile area."""
    return round(1000 * (reduced_size / 256) ** 2)


def overlap_pixels(overlap: float, tile_size: int) -> int:
    """--overlap (a fraction of the tile) as full-resolution pixels."""
    return round(cli.overlap_fraction(overlap) * tile_size)


def grid_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Tile origins covering [0, length), the padding split evenly on both sides."""
    stride = tile_size - overlap
    count = 1 if length <= tile_size else -(-(length - tile_size) // stride) + 1
    padding = (count - 1) * stride + tile_size - length
    return [i * stride - padding // 2 for i in range(count)]


def tissue_pixel_count(tile: np.ndarray, saturation_threshold: int) -> int:
    """Pixels whose OpenCV 8-bit HSV saturation exceeds the threshold (the rule is
    `stain.tissue_pixels`, which the stain statistics measure too)."""
    return int(np.count_nonzero(stain.tissue_pixels(tile, saturation_threshold)))


def is_tissue(tile: np.ndarray, config: TilingConfig) -> bool:
    """The background filter on a reduced uint8 tile (see the module docstring)."""
    return (tissue_pixel_count(tile, config.saturation_threshold) > config.min_pixels
            and int(tile.sum(dtype=np.int64)) > config.min_pixels)


def cut_tiles(slide: Slide, mask: RleMask | MaskImage, config: TilingConfig,
              progress: Callable[[int], None] = lambda done: None,
              transfer: stain.Transfer | None = None,
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Reduced (image, mask) tiles of a slide that pass the background filter, the
    images stain-normalised by `transfer` when given (after the filter)."""
    _check_same_size(f"mask of {slide.path}", mask, slide)
    size = config.tile_size
    columns = grid_starts(slide.width, size, config.overlap)
    for y in grid_starts(slide.height, size, config.overlap):
        for x in columns:
            y0, y1 = max(0, y), min(slide.height, y + size)
            x0, x1 = max(0, x), min(slide.width, x + size)
            inside = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
            image = np.zeros((size, size, 3), np.uint8)
            image[inside] = slide.read(y0, y1, x0, x1)
            small_image = downscale_area(image, config.reduction)
            if not is_tissue(small_image, config):
                continue
            if transfer is not None:
                small_image = transfer(small_image)
            truth = np.zeros((size, size), bool)
            truth[inside] = mask.read(y0, y1, x0, x1)
            yield small_image, downscale_area(truth, config.reduction)
        progress(len(columns))


@dataclass(frozen=True)
class SlideJob:
    """One slide to tile: its mask is parsed RLE runs or a mask image path."""
    slide_id: str
    image_path: paths.Path
    mask: RleMask | paths.Path
    height: int
    width: int
    # What a resumed run compares before it reuses this slide's staged records.
    fingerprint: str = ""
    mpp: float | None = None    # micrometres per pixel, when the slide records it
    # Moves the slide's tiles onto the stain target (--stain_normalisation); None: as read.
    transfer: stain.Transfer | None = None


def competition_jobs(data_dir: str | os.PathLike) -> list[SlideJob]:
    """Checked jobs for `train/<id>.tiff` + `train.csv`; CSV rows without a slide are
    skipped so that a subset of the slides can be prepared."""
    data_dir = paths.path(data_dir)
    slide_paths = _images_by_id(data_dir / "train", TIFF_SUFFIXES)
    if not slide_paths:
        raise cli.MissingInput(f"{data_dir / 'train'}: no .tiff slides found")
    encodings = _read_encodings(data_dir / "train.csv")
    jobs = []
    for slide_id, path in slide_paths.items():
        if slide_id not in encodings:
            raise cli.InputError(f"{data_dir / 'train.csv'}: no row for slide {slide_id} "
                                 f"({path})")
        with open_slide(path) as slide:
            height, width, mpp = slide.height, slide.width, slide.mpp
        mask = rle.parse_named(encodings[slide_id], (height, width), data_dir / "train.csv",
                               slide_id)
        jobs.append(SlideJob(slide_id, path, mask, height, width, _fingerprint(
            path, hashlib.sha256(encodings[slide_id].encode()).hexdigest()), mpp))
    return jobs


def image_jobs(images_dir: str | os.PathLike, masks_dir: str | os.PathLike) -> list[SlideJob]:
    """Checked jobs pairing images with the masks of the same id."""
    images = _images_by_id(paths.path(images_dir), SLIDE_SUFFIXES)
    masks = _images_by_id(paths.path(masks_dir), IMAGE_SUFFIXES)
    if not images:
        raise cli.MissingInput(f"{images_dir}: no {'/'.join(SLIDE_SUFFIXES)} images found")
    jobs = []
    for slide_id, path in images.items():
        if slide_id not in masks:
            raise cli.MissingInput(f"{masks_dir}: no mask for image {path.name}")
        with open_slide(path) as slide, open_mask(masks[slide_id]) as mask:
            _check_same_size(str(masks[slide_id]), mask, slide)
        jobs.append(SlideJob(slide_id, path, masks[slide_id], slide.height, slide.width,
                             _fingerprint(path, _fingerprint(masks[slide_id], "")), slide.mpp))
    return jobs


def _fingerprint(path: paths.Path, mask: str) -> str:
    """The image file as it is now (name, size, modification time) and its mask."""
    stat = path.stat()
    return f"{path}|{stat.length}|{stat.mtime}|{mask}"


def prepare(jobs: list[SlideJob], out_dir: str | os.PathLike, config: TilingConfig,
            workers: int = 0) -> dict:
    """Tiles every job into OUT_DIR; returns what prepare.json records.

    workers <= 0 means one per slide up to the number of usable cores. Tiles are staged
    on a local disk (TensorFlow writes the records), beside OUT_DIR when it is local so
    that they move in by renaming. The staging folder is named for OUT_DIR and the
    tiling, and each finished slide leaves a note there: a run that was killed or failed
    is resumed by the same command, which tiles only the slides not yet done (or whose
    image or mask changed since).
    """
    out_dir = paths.path(out_dir)
    with locking.hold(out_dir, "a prepare"):
        _check_no_other_slides(out_dir, jobs)
        jobs, stain_record = _plan_stain(jobs, config, workers)
        staging = _staging_dir(out_dir, config, stain_record)
        done = _finished_slides(staging, out_dir, jobs)
        todo = [job for job in jobs if job.slide_id not in done]
        if done:
            print(f"resuming: {len(done)} of {len(jobs)} slides were tiled by an earlier run "
                  f"({staging})", file=sys.stderr, flush=True)
        counts = dict(done)
        try:
            counts.update(_tile_all(todo, config, staging, workers))
            summary = _publish(jobs, counts, out_dir, config, staging, stain_record)
        except BaseException:
            kept = sum(map(bool, _finished_slides(staging, out_dir, jobs).values()))
            if kept:
                print(f"note: the records of {kept} slides stay in {staging}: the same "
                      "command resumes from there", file=sys.stderr, flush=True)
            else:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _tile_all(jobs: list[SlideJob], config: TilingConfig, staging: str,
              workers: int) -> dict[str, int]:
    if not jobs:
        return {}
    workers = _worker_count(workers, len(jobs))
    total = sum(len(grid_starts(job.height, config.tile_size, config.overlap))
                * len(grid_starts(job.width, config.tile_size, config.overlap))
                for job in jobs)
    with tqdm(total=total, desc="tiles", unit="tile") as bar:
        if workers <= 1:
            return dict(_tile_slide(job, config, staging, bar.update) for job in jobs)
        return _tile_in_processes(jobs, config, staging, workers, bar)


def _worker_count(workers: int, num_jobs: int) -> int:
    """--workers (<= 0: the usable cores), at most one per slide."""
    return min(workers if workers > 0 else len(os.sched_getaffinity(0)), num_jobs)


def _plan_stain(jobs: list[SlideJob], config: TilingConfig, workers: int
                ) -> tuple[list[SlideJob], dict | None]:
    """(the jobs, each with its slide's stain transfer, and prepare.json's
    stain_normalisation record) with --stain_normalisation=reinhard; (jobs, None) without.

    Every slide is measured before any is tiled, since the target is their mean.
    """
    if config.stain_normalisation == "none":
        return jobs, None
    count = _worker_count(workers, len(jobs))
    measure = functools.partial(_measure_stain, config=config)
    measured = []
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(jobs), desc="stain statistics", unit="slide"))
        # spawn, not fork, as for tiling: TensorFlow is not fork-safe.
        results = (map(measure, jobs) if count <= 1 else stack.enter_context(
            multiprocessing.get_context("spawn").Pool(
                count, initializer=paths.setup_emulator_env)).imap(measure, jobs))
        for statistics in results:
            measured.append(statistics)
            bar.update()
    found = [statistics for statistics in measured if statistics is not None]
    if not found:
        raise cli.InputError(f"--stain_normalisation={config.stain_normalisation}: no slide "
                             f"has a pixel of saturation above {config.saturation_threshold} "
                             "to measure its stain on")
    target = stain.mean_statistics(found)
    for job, statistics in zip(jobs, measured):
        if statistics is None:
            print(f"warning: {job.image_path}: no tissue pixels to measure the stain of; "
                  f"slide {job.slide_id}'s tiles are not stain-normalised", file=sys.stderr,
                  flush=True)
    planned = [dataclasses.replace(job, transfer=None if statistics is None else stain.Transfer(
        statistics, target, config.saturation_threshold))
        for job, statistics in zip(jobs, measured)]
    return planned, {"method": config.stain_normalisation, "target": target.to_json(),
                     "slides": {job.slide_id: None if statistics is None else statistics.to_json()
                                for job, statistics in zip(jobs, measured)}}


def _measure_stain(job: SlideJob, config: TilingConfig) -> stain.StainStatistics | None:
    with open_slide(job.image_path) as slide:
        return stain.slide_statistics(slide, config.reduction, config.saturation_threshold)


def _publish(jobs: list[SlideJob], counts: dict[str, int], out_dir: paths.Path,
             config: TilingConfig, staging: str, stain_record: dict | None) -> dict:
    """Writes prepare.json, then moves the staged records into OUT_DIR."""
    # A slide without tissue would make an empty record file, which training rejects.
    skipped = [job for job in jobs if not counts[job.slide_id]]
    if len(skipped) == len(jobs):
        raise cli.InputError(f"no tile of any slide passes the background filter "
                             f"(saturation > {config.saturation_threshold} on more than "
                             f"{config.min_pixels} pixels): nothing to train on")
    for job in skipped:
        print(f"warning: {job.image_path}: no tile passes the background filter; slide "
              f"{job.slide_id} is skipped (no record file)", file=sys.stderr, flush=True)
    summary = {"tile_size": config.tile_size, "reduction": config.reduction,
               "overlap": config.overlap,
               "thresholds": {"saturation": config.saturation_threshold,
                              "min_pixels": config.min_pixels},
               "padding": PADDING,
               "slide_mpp": _slide_mpp([job for job in jobs if counts[job.slide_id]]),
               "slides": {job.slide_id: counts[job.slide_id] for job in jobs
                          if counts[job.slide_id]},
               "skipped_slides": [job.slide_id for job in skipped]}
    if stain_record is not None:
        summary["stain_normalisation"] = stain_record
    # prepare.json goes first: a run killed while moving records in leaves files that
    # disagree with it, which training refuses, rather than a folder that looks whole;
    # the same command then finishes the moves from the staging folder.
    paths.atomic_write(out_dir / PREPARE_JSON, json.dumps(summary, indent=2) + "\n")
    for job in jobs:
        _replace_records(out_dir, job.slide_id, os.path.join(
            staging, records.record_name(job.slide_id, counts[job.slide_id]))
            if counts[job.slide_id] else None)
    return summary


def _slide_mpp(jobs: list[SlideJob]) -> float | None:
    """The slides' pixel size (micrometres, their median), which predict aims at times
    the reduction; None unless every slide records one, as a guess would mislead it."""
    sizes = [job.mpp for job in jobs]
    return None if None in sizes else float(np.median(sizes))


def _tile_slide(job: SlideJob, config: TilingConfig, staging: str,
                progress: Callable[[int], None]) -> tuple[str, int]:
    mask_source = (contextlib.nullcontext(job.mask) if isinstance(job.mask, RleMask)
                   else open_mask(job.mask))
    with open_slide(job.image_path) as slide, mask_source as mask:
        path = records.write_records(staging, job.slide_id,
                                     cut_tiles(slide, mask, config, progress, job.transfer))
    count = 0 if path is None else records.count_from_name(path)
    paths.atomic_write(os.path.join(staging, job.slide_id + _DONE_SUFFIX),
                       json.dumps({"fingerprint": job.fingerprint, "count": count}))
    return job.slide_id, count


_progress_queue = None


def _init_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    paths.setup_emulator_env()  # a spawned worker runs no command's start-up


def _tile_in_worker(job: SlideJob, config: TilingConfig, out_dir: str) -> tuple[str, int]:
    return _tile_slide(job, config, out_dir, _progress_queue.put)


def _tile_in_processes(jobs: list[SlideJob], config: TilingConfig, out_dir: str,
                       workers: int, bar: tqdm) -> dict[str, int]:
    # spawn, not fork: TensorFlow (imported by records) is not fork-safe.
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    counts = {}
    with context.Pool(workers, initializer=_init_worker, initargs=(progress_queue,)) as pool:
        pending = [pool.apply_async(_tile_in_worker, (job, config, out_dir)) for job in jobs]
        while pending:
            try:
                bar.update(progress_queue.get(timeout=0.2))
            except queue.Empty:
                pass
            for result in [r for r in pending if r.ready()]:
                pending.remove(result)
                slide_id, count = result.get()   # re-raises a worker's error
                counts[slide_id] = count
    return counts


def _staging_dir(out_dir: paths.Path, config: TilingConfig, stain_record: dict | None) -> str:
    """The staging folder of this OUT_DIR and tiling (resumed if an earlier run left
    it); those of other tilings, which no run can resume now, are removed. Only the
    holder of OUT_DIR's lock gets here, so no live run uses them. A stain target is part
    of the tiling: other slides make another target, and tiles normalised to the old one
    are not reused."""
    stain_key = "" if stain_record is None else f"|{stain_record['target']}"
    key = hashlib.sha256(f"{out_dir}|{config}{stain_key}".encode()).hexdigest()[:16]
    parent = tempfile.gettempdir() if paths.is_remote(out_dir) else os.fspath(out_dir)
    ours = os.path.join(parent, _STAGING_PREFIX + key)
    if not paths.is_remote(out_dir):
        for name in os.listdir(parent):
            if name.startswith(_STAGING_PREFIX) and name != os.path.basename(ours):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    os.makedirs(ours, exist_ok=True)
    return ours


def _finished_slides(staging: str, out_dir: paths.Path, jobs: list[SlideJob]
                     ) -> dict[str, int]:
    """{slide id: record count} of the jobs an earlier run finished in `staging`: the
    note matches the job's inputs, and its records are staged or were already moved
    into OUT_DIR."""
    finished = {}
    for job in jobs:
        try:
            with open(os.path.join(staging, job.slide_id + _DONE_SUFFIX)) as file:
                note = json.load(file)
        except (OSError, json.JSONDecodeError):
            continue
        if note.get("fingerprint") != job.fingerprint:
            continue
        count = int(note["count"])
        name = records.record_name(job.slide_id, count)
        if (count == 0 or os.path.exists(os.path.join(staging, name))
                or (out_dir / name).exists()):
            finished[job.slide_id] = count
    return finished


def _check_no_other_slides(out_dir: paths.Path, jobs: list[SlideJob]) -> None:
    """Training reads every record file of a folder: records of slides this run does not
    prepare would be mixed with its tiling under a prepare.json that does not list them."""
    slide_ids = {job.slide_id for job in jobs}
    others = sorted(path.name for path in out_dir.iterdir()
                    if path.name.endswith(records.RECORD_SUFFIX)
                    and records.slide_of_record(path.name) not in slide_ids)
    if others:
        raise cli.InputError(f"{out_dir}: holds records of slides this run does not prepare "
                             f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                             "training would mix them with this tiling: give an empty "
                             "--out_dir, or prepare those slides too")


def _replace_records(out_dir: paths.Path, slide_id: str, staged: str | None) -> None:
    """Moves a slide's records in (None: the slide has none now), removing older
    `<id>-<count>.tfrec` of that slide."""
    name = None if staged is None else os.path.basename(staged)
    for old in out_dir.iterdir():
        if records.slide_of_record(old.name) == slide_id and old.name != name:
            old.unlink()
    # Not staged any more: a killed run moved it in already.
    if staged is not None and os.path.exists(staged):
        paths.publish(staged, out_dir / name)


def _read_encodings(csv_path: paths.Path) -> dict[str, str]:
    if not csv_path.is_file():
        raise cli.MissingInput(f"{csv_path}: no such file")
    csv.field_size_limit(2 ** 31 - 1)   # whole-slide RLEs are tens of megabytes
    with paths.open_text(csv_path) as handle:
        reader = csv.DictReader(handle)
        if not {"id", "encoding"} <= set(reader.fieldnames or ()):
            raise cli.InputError(f"{csv_path}: expected columns id,encoding, got "
                                 f"{','.join(reader.fieldnames or ())}")
        encodings = {}
        for row in reader:
            if row["id"] in encodings:
                raise cli.InputError(f"{csv_path}: id {row['id']} appears twice")
            encodings[row["id"]] = row["encoding"] or ""
    return encodings


def _images_by_id(directory: paths.Path, suffixes: tuple[str, ...]
                    ) -> dict[str, paths.Path]:
    """{id: path}, sorted; two files of one id would write the same records."""
    if not directory.is_dir():
        raise cli.MissingInput(f"{directory}: no such directory")
    found = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in suffixes:
            continue
        slide_id = image_id(path)
        if slide_id in found:
            raise cli.InputError(f"{directory}: two files named {slide_id} "
                                 f"({found[slide_id].name}, {path.name})")
        found[slide_id] = path
    return found


def _check_same_size(mask_name: str, mask: RleMask | MaskImage, slide: Slide) -> None:
    if (mask.height, mask.width) != (slide.height, slide.width):
        raise cli.InputError(f"{mask_name}: mask is {mask.height} x {mask.width} but the image "
                             f"{slide.path.name} is {slide.height} x {slide.width}")


def define_flags() -> None:
    flags.DEFINE_string("competition_dir", None, "Competition directory with train/ and "
                        "train.csv.")
    flags.DEFINE_string("images", None, "Directory of images (instead of --competition_dir).")
    flags.DEFINE_string("masks", None, "Directory of binary masks named like --images.")
    flags.DEFINE_string("out_dir", None, "Directory for <id>-<count>.tfrec and prepare.json.")
    cli.define_tiling_flags(tile_size=RECIPE_TILE_SIZE // RECIPE_REDUCTION,
                            reduction=RECIPE_REDUCTION, overlap=0)
    flags.DEFINE_integer("saturation_threshold", 40, "A pixel is tissue when its HSV "
                         "saturation (0-255) exceeds this.")
    flags.DEFINE_integer("min_pixels", -1, "Keep a tile only if it has more tissue pixels "
                         "than this, and a larger pixel sum; -1: 1000 * (reduced size / "
                         "256)**2, i.e. 4000 for 512-px tiles.")
    flags.DEFINE_enum("stain_normalisation", "none", list(stain.METHODS), "reinhard: move "
                      "every slide's tissue colour statistics (CIELAB mean and std) onto "
                      "their mean, recorded in prepare.json for predict to normalise to.")
    flags.DEFINE_integer("workers", 0, "Slides tiled in parallel processes; 0: one per "
                         "slide up to the number of cores.")


def main() -> None:
    options = flags.FLAGS
    if not options.out_dir:
        raise cli.InputError("--out_dir is required")
    if bool(options.competition_dir) == bool(options.images):
        raise cli.InputError("give either --competition_dir or --images (with --masks)")
    if options.images and not options.masks:
        raise cli.InputError("--images needs --masks")
    if options.tile_size < 1 or options.reduction < 1:
        raise cli.InputError("--tile_size and --reduction must be positive")
    full_tile = options.tile_size * options.reduction
    config = TilingConfig(
        tile_size=full_tile, reduction=options.reduction,
        overlap=overlap_pixels(options.overlap, full_tile),
        saturation_threshold=options.saturation_threshold,
        min_pixels=options.min_pixels if options.min_pixels >= 0 else None,
        stain_normalisation=options.stain_normalisation)
    jobs = (competition_jobs(options.competition_dir) if options.competition_dir
            else image_jobs(options.images, options.masks))
    summary = prepare(jobs, options.out_dir, config, options.workers)
    print(f"{sum(summary['slides'].values())} tiles of "
          f"{config.tile_size // config.reduction} px from "
          f"{len(summary['slides'])} slides in {options.out_dir}")


def run() -> None:
    """Where `python -m jaxseg.prepare` and the console script `jaxseg-prepare` start, so
    both parse the same flags and report errors alike."""
    define_flags()
    cli.run_main(main)


if __name__ == "__main__":
    run()
