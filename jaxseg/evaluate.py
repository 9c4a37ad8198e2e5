"""The competition's score of a submission: Dice per image, averaged over images.

`python -m jaxseg.evaluate --pred=submission.csv --truth=train.csv --images='train/*.tiff'`
or `--truth=DIR` of mask images named `<id>.png` (any nonzero pixel is glomerulus).

Whole-slide masks reach 2 G pixels, so RLEs are compared column block by column block
(`rle.RleMask` decodes any window on its own) and no slide-sized mask is ever built.
An RLE only means something with the image height (pixels are numbered down the
columns), so shapes come from the slides' headers (`--images`) or from the masks.
"""
from __future__ import annotations

import csv
import os
import sys
from typing import Mapping

import numpy as np

from jaxseg import cli, paths, rle, slides

ID_COLUMN = "id"
RLE_COLUMNS = ("predicted", "encoding")  # sample_submission.csv, train.csv
_BLOCK_PIXELS = 1 << 25

Shape = tuple[int, int]


def dice(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """2|P & T| / (|P| + |T|) of two masks (nonzero = positive); 1 when both are empty."""
    if pred_mask.shape != true_mask.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} differs from truth shape "
                         f"{true_mask.shape}")
    pred, true = pred_mask != 0, true_mask != 0
    return _dice_from_counts(int(np.count_nonzero(pred & true)), int(np.count_nonzero(pred)),
                             int(np.count_nonzero(true)))


def _dice_from_counts(intersection: int, pred_pixels: int, true_pixels: int) -> float:
    total = pred_pixels + true_pixels
    return 1.0 if total == 0 else 2.0 * intersection / total


def read_rle_csv(path: str | os.PathLike) -> dict[str, str]:
    """{id: rle} of a `id,predicted` or `id,encoding` CSV."""
    path = paths.path(path)
    if not path.is_file():
        raise cli.MissingInput(f"{path}: no such file")
    # A whole-slide RLE is far longer than the csv module's default field limit.
    csv.field_size_limit(2**31 - 1)
    with paths.open_text(path) as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if (header is None or len(header) != 2 or header[0] != ID_COLUMN
                or header[1] not in RLE_COLUMNS):
            raise cli.InputError(f"{path}: header must be 'id,predicted' or 'id,encoding', "
                                 f"got {header}")
        encodings: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise cli.InputError(f"{path}: line {line} has {len(row)} fields, expected 2")
            if row[0] in encodings:
                raise cli.InputError(f"{path}: id {row[0]!r} appears twice (line {line})")
            encodings[row[0]] = row[1]
    return encodings


def _counts_of_rles(pred: rle.RleMask, true: rle.RleMask) -> tuple[int, int, int]:
    height, width = true.shape
    intersection = pred_pixels = true_pixels = 0
    cols_per_block = max(1, _BLOCK_PIXELS // height)
    for x0 in range(0, width, cols_per_block):
        x1 = min(width, x0 + cols_per_block)
        pred_block, true_block = pred.read(0, height, x0, x1), true.read(0, height, x0, x1)
        intersection += int(np.count_nonzero(pred_block & true_block))
        pred_pixels += int(np.count_nonzero(pred_block))
        true_pixels += int(np.count_nonzero(true_block))
    return intersection, pred_pixels, true_pixels


def _counts_of_masks(pred: rle.RleMask, true_mask: np.ndarray) -> tuple[int, int, int]:
    pred, true = pred.read(0, pred.height, 0, pred.width), true_mask != 0
    return (int(np.count_nonzero(pred & true)), int(np.count_nonzero(pred)),
            int(np.count_nonzero(true)))


def find_masks(directory: str | os.PathLike) -> dict[str, paths.Path]:
    """{id: mask file} of a folder of `<id>.png` (or TIFF/JPEG) masks."""
    directory = paths.path(directory)
    masks = {slides.image_id(path): path for path in sorted(directory.iterdir())
             if path.suffix.lower() in slides.IMAGE_SUFFIXES}
    if not masks:
        raise cli.MissingInput(f"{directory}: no mask images "
                               f"({', '.join(slides.IMAGE_SUFFIXES)})")
    return masks


def read_mask(path: paths.Path) -> np.ndarray:
    """Bool (H, W) mask: any nonzero channel is glomerulus."""
    with slides.open_mask(path) as mask:
        return mask.read(0, mask.height, 0, mask.width)


def image_shapes(pattern: str) -> dict[str, Shape]:
    """{image id: (height, width)} from the headers of the images matching a glob."""
    found = paths.glob(pattern)
    if not found:
        raise cli.MissingInput(f"--images {pattern!r}: no files match")
    shapes = {}
    for path in found:
        with slides.open_slide(path) as slide:
            shapes[slides.image_id(path)] = (slide.height, slide.width)
    return shapes


class Truth:
    """The true masks of a CSV of RLEs or of a folder of masks named by id, each read
    only when an image is scored."""

    def __init__(self, source: str | os.PathLike):
        self.path = paths.path(source)
        self._masks = find_masks(self.path) if self.path.is_dir() else None
        self._rles = None if self._masks is not None else read_rle_csv(self.path)

    @property
    def ids(self) -> list[str]:
        return list(self._masks if self._masks is not None else self._rles)

    def counts(self, image_id: str, prediction: str, shape: Shape | None,
               pred_source: str | os.PathLike) -> tuple[int, int, int]:
        """(|P & T|, |P|, |T|) of one image's predicted RLE against its truth. `shape`:
        the image's (height, width), which a mask must agree with and RLE truth needs."""
        if self._masks is not None:
            true_mask = read_mask(self._masks[image_id])
            if shape is not None and tuple(shape) != true_mask.shape:
                raise cli.InputError(f"{self._masks[image_id]}: mask is {true_mask.shape}, "
                                     f"image {image_id} is {tuple(shape)}")
            return _counts_of_masks(rle.parse_named(prediction, true_mask.shape, pred_source,
                                                    image_id), true_mask)
        if shape is None:
            raise cli.InputError(f"image {image_id}: unknown image shape: give the images "
                                 "with --images")
        return _counts_of_rles(rle.parse_named(prediction, shape, pred_source, image_id),
                               rle.parse_named(self._rles[image_id], shape, self.path,
                                               image_id))

    def dice(self, image_id: str, prediction: str, shape: Shape | None,
             pred_source: str | os.PathLike) -> float:
        return _dice_from_counts(*self.counts(image_id, prediction, shape, pred_source))


def evaluate(pred_csv: str | os.PathLike, truth: str | os.PathLike,
             shapes: Mapping[str, Shape] | None = None) -> dict:
    """Per-image Dice of every truth image and their mean (the competition score).

    `truth` is a CSV of RLEs (then `shapes` must give each image's (height, width)) or a
    folder of masks named by id (their own shape; a shape in `shapes` must agree).
    `shapes`, the images the user named, also says which truth images are evaluated, so
    that a held-out part of train.csv can be scored; without it every truth image is.
    A truth image the prediction lacks scores 0, as Kaggle scores a missing id: leaving
    it out of the mean would reward an incomplete submission.
    Returns {'images': [{'id', 'dice', 'pred_pixels', 'true_pixels'}, ...] (pixel
    counts None for a missing prediction), 'mean_dice': float, 'missing_ids': [...]}.
    """
    predictions = read_rle_csv(pred_csv)
    if not predictions:
        raise cli.InputError(f"{pred_csv}: holds no predictions")
    truth = Truth(truth)
    strangers = sorted(set(predictions) - set(truth.ids))
    if strangers:
        raise cli.InputError(f"{truth.path}: no truth for predicted ids "
                             f"{', '.join(strangers[:5])}")
    evaluated = [image_id for image_id in truth.ids
                 if image_id in predictions or shapes is None or image_id in shapes]
    shapes = dict(shapes or {})
    images = []
    for image_id in evaluated:
        if image_id not in predictions:
            images.append({"id": image_id, "dice": 0.0, "pred_pixels": None,
                           "true_pixels": None})
            continue
        counts = truth.counts(image_id, predictions[image_id], shapes.get(image_id), pred_csv)
        images.append({"id": image_id, "dice": _dice_from_counts(*counts),
                       "pred_pixels": counts[1], "true_pixels": counts[2]})
    return {"images": images, "mean_dice": float(np.mean([row["dice"] for row in images])),
            "missing_ids": [row["id"] for row in images if row["pred_pixels"] is None]}


def default_out_path(pred_csv: str | os.PathLike) -> paths.Path:
    pred_csv = paths.path(pred_csv)
    return pred_csv.with_name(f"{pred_csv.stem}_dice.csv")


def format_table(result: dict) -> str:
    width = max(len("mean"), *(len(row["id"]) for row in result["images"]))
    lines = [f"{'id':<{width}}  {'dice':>7}  {'pred_pixels':>12}  {'true_pixels':>12}"]
    lines += [f"{row['id']:<{width}}  {row['dice']:7.4f}  " + (
              f"{row['pred_pixels']:12d}  {row['true_pixels']:12d}"
              if row["pred_pixels"] is not None else "no prediction")
              for row in result["images"]]
    lines.append(f"{'mean':<{width}}  {result['mean_dice']:7.4f}")
    return "\n".join(lines)


def write_table(result: dict, out: str | os.PathLike) -> None:
    """CSV of the per-image rows and a last `mean` row, written whole or not at all; a
    missing prediction's pixel counts are empty."""
    with paths.atomic_open(out) as file:
        writer = csv.writer(file)
        writer.writerow(["id", "dice", "pred_pixels", "true_pixels"])
        for row in result["images"]:
            writer.writerow([row["id"], f"{row['dice']:.6f}", row["pred_pixels"],
                             row["true_pixels"]])
        writer.writerow(["mean", f"{result['mean_dice']:.6f}", "", ""])


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("pred", None, "Submission CSV (id,predicted).", required=True)
    flags.DEFINE_string("truth", None, "Truth: a CSV of RLEs (id,encoding, as train.csv) or "
                        "a folder of masks named <id>.png.", required=True)
    flags.DEFINE_string("images", None, "Glob of the predicted images, read for their "
                        "shapes (needed with a CSV truth).")
    flags.DEFINE_string("out", None, "Per-image Dice CSV; default <pred>_dice.csv beside "
                        "the prediction.")


def main() -> None:
    from absl import flags

    config = flags.FLAGS
    shapes = image_shapes(config.images) if config.images else None
    result = evaluate(config.pred, config.truth, shapes)
    print(format_table(result))
    if result["missing_ids"]:
        print(f"{len(result['missing_ids'])} truth image(s) have no prediction and score 0 "
              f"(Kaggle's rule): {', '.join(result['missing_ids'])}", file=sys.stderr)
    out = config.out or default_out_path(config.pred)
    write_table(result, out)
    print(f"wrote {out}")


def run() -> None:
    """Where `python -m jaxseg.evaluate` and the console script `jaxseg-evaluate` start, so
    both parse the same flags and report errors alike."""
    define_flags()
    cli.run_main(main)


if __name__ == "__main__":
    run()
