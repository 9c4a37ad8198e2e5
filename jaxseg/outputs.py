"""Per-slide files a person opens, beside the submission: glomerulus polygons for QuPath
(GeoJSON), the mask as a tiled pyramidal OME-TIFF (QuPath, napari), a statistics row, and
a PNG overlay (true/false positives and false negatives when a truth is given).

Everything is made from what `predict_slide` keeps, the bool mask at model scale and,
for polygons' probabilities, uint8 probabilities at the same scale: the full-resolution
mask (up to 2 G pixels) is never built. Outlines are traced by GDAL
(`rasterio.features.shapes`) with 4-connectivity, so pixels meeting only at a corner are
separate glomeruli: an 8-connected outline would touch itself there, a ring shapely and
QuPath reject. Coordinates follow the pixel-corner convention, model pixel (r, c)
covering full-resolution x in [c * reduction, (c + 1) * reduction) and y likewise, and
outlines are clipped to the slide, as the submission's RLE crops its upsampled mask; so a
polygon's area is its glomerulus' pixel count in the submission.

A slide is finished when every file asked for exists. Each is written whole or not at
all (`paths.staged_file`), and the slide's RLE is kept as `<id>.rle`, so that a rerun
which skips the slide still writes its submission row.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from typing import Any, Iterator, Sequence

import numpy as np
import shapely
import shapely.affinity
import shapely.geometry
import tifffile
from rasterio import features
from rasterio.transform import Affine

from jaxseg import cli, evaluate, paths, rle, slides

KINDS = ("geojson", "mask_tiff", "stats", "overlay")
DEFAULT_KINDS = ("geojson", "mask_tiff", "stats")
SUFFIXES = {"rle": ".rle", "geojson": ".geojson", "mask_tiff": ".mask.ome.tif",
            "stats": ".stats.csv", "overlay": ".overlay.png"}
STATS_TABLE = "stats.csv"
STATS_COLUMNS = ("id", "glomeruli", "area_px", "median_area_px", "area_um2",
                 "median_area_um2", "mean_probability")
CLASS_NAME = "glomerulus"
_CLASS_COLOUR = [255, 0, 0]
MASK_TILE = 256
OVERLAY_MAX_SIDE = 2048
_PREDICTED = np.array([255, 0, 0], np.float32)
_TRUE_POSITIVE = np.array([0, 200, 0], np.float32)
_FALSE_POSITIVE = np.array([255, 0, 0], np.float32)
_FALSE_NEGATIVE = np.array([0, 80, 255], np.float32)
_OVERLAY_OPACITY = 0.45
_STRIP_PIXELS = 1 << 24


@dataclasses.dataclass(frozen=True)
class Glomerulus:
    """One 4-connected component of the mask."""
    polygon: shapely.Polygon    # full-resolution slide pixels
    model_pixels: int           # its pixels at model scale
    probability: float          # mean probability over those pixels


def find_glomeruli(mask: np.ndarray, probabilities: np.ndarray, reduction: int,
                   shape: tuple[int, int]) -> list[Glomerulus]:
    """The components of a model-scale mask as full-resolution polygons (holes kept).

    `probabilities` are uint8 (255 = 1) at model scale; each polygon's mean is taken
    inside its own outline, rasterised in its bounding box only.
    """
    height, width = shape
    found = []
    for geometry, _ in features.shapes(mask.view(np.uint8), mask=mask, connectivity=4):
        outline = shapely.geometry.shape(geometry)
        polygon = shapely.affinity.scale(outline, reduction, reduction, origin=(0, 0))
        if polygon.bounds[2] > width or polygon.bounds[3] > height:
            polygon = polygon.intersection(shapely.box(0, 0, width, height))
        c0, r0, c1, r1 = (int(value) for value in outline.bounds)
        inside = features.geometry_mask([outline], (r1 - r0, c1 - c0),
                                        Affine.translation(c0, r0), invert=True)
        found.append(Glomerulus(polygon, int(outline.area),
                                float(probabilities[r0:r1, c0:c1][inside].mean()) / 255))
    return found


def feature_collection(glomeruli: Sequence[Glomerulus]) -> dict[str, Any]:
    """GeoJSON as QuPath imports it: annotations classified `glomerulus`.

    QuPath shows `measurements` in its tables; the flat `probability` is for GIS
    tools (shapely, geopandas) that read properties as columns.
    """
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": shapely.geometry.mapping(glomerulus.polygon),
         "properties": {"objectType": "annotation",
                        "classification": {"name": CLASS_NAME, "color": _CLASS_COLOUR},
                        "probability": round(glomerulus.probability, 4),
                        "measurements": {"probability": round(glomerulus.probability, 4)}}}
        for glomerulus in glomeruli]}


def write_geojson(path: str | paths.Path, glomeruli: Sequence[Glomerulus]) -> None:
    paths.atomic_write(path, json.dumps(feature_collection(glomeruli)))


def pyramid_factors(shape: tuple[int, int], tile: int = MASK_TILE) -> list[int]:
    """Downscale factors of the levels, halving until a level fits in one tile."""
    factors = [1]
    while max(shape) > factors[-1] * tile:
        factors.append(factors[-1] * 2)
    return factors


def _mask_tiles(mask: np.ndarray, reduction: int, shape: tuple[int, int], factor: int,
                tile: int) -> Iterator[np.ndarray]:
    """Tiles, row by row, of the full-resolution mask seen at 1/factor, as 0/255: each
    pixel is the model pixel under the centre of the full-resolution block it stands for."""
    rows = np.minimum(np.arange(0, shape[0], factor) + factor // 2, shape[0] - 1) // reduction
    cols = np.minimum(np.arange(0, shape[1], factor) + factor // 2, shape[1] - 1) // reduction
    for y0 in range(0, len(rows), tile):
        for x0 in range(0, len(cols), tile):
            yield mask[np.ix_(rows[y0:y0 + tile], cols[x0:x0 + tile])].view(np.uint8) * 255


def write_mask_tiff(path: str | paths.Path, mask: np.ndarray, reduction: int,
                    shape: tuple[int, int], pixel_size: tuple[float, float] | None = None,
                    tile: int = MASK_TILE) -> None:
    """The full-resolution mask (0/255) as a tiled, deflate-compressed OME-TIFF with its
    halvings as SubIFDs, the pyramid layout QuPath (Bio-Formats) and napari read.

    Tiles are made from the model-scale mask one at a time, so a 40,000 px slide's mask
    costs one tile of memory; the slide's pixel size, when known, goes with it, so the
    mask lies on the slide in physical units too.
    """
    factors = pyramid_factors(shape, tile)
    options: dict[str, Any] = {"tile": (tile, tile), "compression": "zlib",
                               "photometric": "minisblack", "dtype": np.uint8}
    metadata: dict[str, Any] = {"axes": "YX", "Name": f"{CLASS_NAME} mask"}
    if pixel_size is not None:
        metadata.update(PhysicalSizeY=pixel_size[0], PhysicalSizeX=pixel_size[1])
    with paths.staged_file(path) as staged, tifffile.TiffWriter(staged.path, bigtiff=True,
                                                                ome=True) as tiff:
        for level, factor in enumerate(factors):
            if pixel_size is not None:
                options.update(resolutionunit="CENTIMETER", resolution=(
                    1e4 / (pixel_size[1] * factor), 1e4 / (pixel_size[0] * factor)))
            level_shape = (-(-shape[0] // factor), -(-shape[1] // factor))
            tiff.write(_mask_tiles(mask, reduction, shape, factor, tile), shape=level_shape,
                       **({"subifds": len(factors) - 1, "metadata": metadata} if level == 0
                          else {"subfiletype": 1, "metadata": None}), **options)


def _number(value: float) -> str:
    return f"{value:.10g}"


def slide_stats(image_id: str, glomeruli: Sequence[Glomerulus],
                pixel_size: tuple[float, float] | None) -> dict[str, str]:
    """The slide's row of STATS_COLUMNS, as text: areas in full-resolution pixels (and
    square micrometres when the slide has a pixel size, else empty), the probability
    averaged over every glomerulus pixel at model scale. Empty where there is nothing
    to take a median or mean of."""
    areas = np.array([glomerulus.polygon.area for glomerulus in glomeruli])
    model_pixels = sum(glomerulus.model_pixels for glomerulus in glomeruli)
    square_um = pixel_size[0] * pixel_size[1] if pixel_size is not None else None
    row = {"id": image_id, "glomeruli": str(len(glomeruli)), "area_px": _number(areas.sum()),
           "median_area_px": _number(np.median(areas)) if len(areas) else "",
           "area_um2": "", "median_area_um2": "", "mean_probability": ""}
    if square_um is not None:
        row["area_um2"] = _number(areas.sum() * square_um)
        row["median_area_um2"] = _number(np.median(areas) * square_um) if len(areas) else ""
    if model_pixels:
        weighted = sum(glomerulus.probability * glomerulus.model_pixels
                       for glomerulus in glomeruli)
        row["mean_probability"] = f"{weighted / model_pixels:.4f}"
    return row


def write_stats(path: str | paths.Path, rows: Sequence[dict[str, str]]) -> None:
    with paths.atomic_open(path) as file:
        writer = csv.DictWriter(file, STATS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_stats(path: str | paths.Path) -> list[dict[str, str]]:
    with paths.open_text(path) as file:
        return list(csv.DictReader(file))


def _truth_at(truth: rle.RleMask, factor: int, offset: int) -> np.ndarray:
    """The full-resolution truth sampled every `factor` pixels from `offset` (clipped to
    the slide), decoded a block of columns at a time: a whole-slide truth is never
    decoded whole."""
    rows, cols = (np.minimum(np.arange(-(-length // factor)) * factor + offset, length - 1)
                  for length in truth.shape)
    sampled = np.empty((len(rows), len(cols)), bool)
    per_read = max(1, _STRIP_PIXELS // (truth.height * factor))
    for i in range(0, len(cols), per_read):
        block_cols = cols[i:i + per_read]
        block = truth.read(0, truth.height, int(block_cols[0]), int(block_cols[-1]) + 1)
        sampled[:, i:i + per_read] = block[rows][:, block_cols - block_cols[0]]
    return sampled


def write_overlay(slide: slides.Slide, mask: np.ndarray, reduction: int,
                  path: str | paths.Path, truth: rle.RleMask | None = None) -> None:
    """PNG of the slide, at most OVERLAY_MAX_SIDE px, the prediction tinted red; with a
    full-resolution truth, true positives green, false positives red, false negatives
    blue, the truth sampled where the prediction is (each overview pixel's first
    model pixel)."""
    from PIL import Image

    step = max(1, math.ceil(max(mask.shape) / OVERLAY_MAX_SIDE))
    factor = reduction * step
    height, width = slides.model_scale_shape(slide.height, slide.width, factor)
    read = slides.scaled_reader(slide, factor)
    rows_per_strip = max(1, _STRIP_PIXELS // (slide.width * factor))
    image = np.concatenate([read(y0, min(y0 + rows_per_strip, height), 0, width)
                            for y0 in range(0, height, rows_per_strip)]).astype(np.float32)
    predicted = mask[::step, ::step]
    if truth is None:
        tints = [(predicted, _PREDICTED)]
    else:
        true = _truth_at(truth, factor, reduction // 2)
        tints = [(predicted & true, _TRUE_POSITIVE), (predicted & ~true, _FALSE_POSITIVE),
                 (~predicted & true, _FALSE_NEGATIVE)]
    for where, colour in tints:
        image[where] += _OVERLAY_OPACITY * (colour - image[where])
    png = io.BytesIO()
    Image.fromarray(np.round(image).astype(np.uint8)).save(png, format="png")
    paths.make_parent(path)
    paths.atomic_write(path, png.getvalue())


@dataclasses.dataclass(frozen=True)
class SlideOutputs:
    """The per-slide files predict writes and where; by default none."""
    out_dir: paths.Path | None = None
    kinds: tuple[str, ...] = ()
    overlays: paths.Path | None = None        # --overlays: <id>.png there
    truth: dict[str, str] | None = None       # {id: full-resolution RLE}, for overlays
    truth_source: str = ""
    overwrite: bool = False

    def files(self, image_id: str) -> dict[str, paths.Path]:
        files = {}
        if self.out_dir is not None:
            files = {kind: self.out_dir / f"{image_id}{SUFFIXES[kind]}"
                     for kind in ("rle", *self.kinds)}
        if self.overlays is not None:
            files["overlay"] = self.overlays / f"{image_id}.png"
        return files

    def finished(self, image_id: str) -> bool:
        """Whether a rerun may skip the slide: only with --out_dir, where its RLE is kept."""
        return (self.out_dir is not None and not self.overwrite
                and all(path.exists() for path in self.files(image_id).values()))

    def reuse(self, image_id: str) -> tuple[str, dict[str, str] | None]:
        """(RLE, stats row) of a finished slide."""
        files = self.files(image_id)
        stats = read_stats(files["stats"])[0] if "stats" in files else None
        return files["rle"].read_text(), stats

    def probability_buffer(self, slide: slides.Slide, reduction: int) -> np.ndarray | None:
        """uint8 model-scale probabilities, for predict_slide to fill, when polygons are
        wanted; else None, and predicting keeps only the bool mask."""
        if self.out_dir is None or not {"geojson", "stats"} & set(self.kinds):
            return None
        return np.empty(slides.model_scale_shape(slide.height, slide.width, reduction),
                        np.uint8)

    def write(self, slide: slides.Slide, image_id: str, mask: np.ndarray,
              probabilities: np.ndarray | None, reduction: int,
              encoding: str) -> dict[str, str] | None:
        """Writes the slide's files, its RLE last; returns its stats row, if asked for."""
        files = self.files(image_id)
        for path in files.values():
            paths.make_parent(path)
        shape = (slide.height, slide.width)
        row = None
        if probabilities is not None:
            glomeruli = find_glomeruli(mask, probabilities, reduction, shape)
            if "geojson" in files:
                write_geojson(files["geojson"], glomeruli)
            if "stats" in files:
                row = slide_stats(image_id, glomeruli, slide.pixel_size)
                write_stats(files["stats"], [row])
        if "mask_tiff" in files:
            write_mask_tiff(files["mask_tiff"], mask, reduction, shape, slide.pixel_size)
        if "overlay" in files:
            truth = None
            if self.truth is not None:
                truth = rle.parse_named(self.truth[image_id], shape, self.truth_source,
                                        image_id)
            write_overlay(slide, mask, reduction, files["overlay"], truth)
        if "rle" in files:
            paths.atomic_write(files["rle"], encoding)
        return row

    def write_table(self, rows: Sequence[dict[str, str] | None]) -> None:
        """The stats rows of all slides, in one CSV beside theirs."""
        if self.out_dir is not None and "stats" in self.kinds:
            write_stats(self.out_dir / STATS_TABLE, rows)


def from_flags(config: Any, image_ids: Sequence[str]) -> SlideOutputs:
    """--out_dir, --outputs, --overlays, --truth and --overwrite, checked before any slide
    is predicted."""
    kinds = tuple(config.outputs)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise cli.InputError(f"--outputs: unknown output {unknown[0]!r}; choose from "
                             f"{', '.join(KINDS)}")
    if config["outputs"].present and not config.out_dir:
        raise cli.InputError("--outputs: give --out_dir=DIR for the per-slide files")
    result = SlideOutputs(
        out_dir=paths.path(config.out_dir) if config.out_dir else None,
        kinds=kinds if config.out_dir else (),
        overlays=paths.path(config.overlays) if config.overlays else None,
        overwrite=config.overwrite)
    if not config.truth:
        return result
    if "overlay" not in result.files(""):
        raise cli.InputError("--truth: only overlays use a truth; add --overlays=DIR or "
                             "overlay to --outputs")
    truth = evaluate.read_rle_csv(config.truth)
    missing = [image_id for image_id in image_ids if image_id not in truth]
    if missing:
        raise cli.InputError(f"--truth {config.truth}: no truth for image {missing[0]!r}")
    return dataclasses.replace(result, truth=truth, truth_source=config.truth)
