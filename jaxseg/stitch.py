"""Sliding-window prediction of an image too large for the model, with no model inside.

The image is seen at model scale (a whole slide already reduced by the training
factor). Square windows of the model's tile size overlap, and the last window of a
row or column is shifted inwards so that it ends at the border instead of hanging
over it; only an image smaller than a tile is padded. Each window's probabilities are
weighted and summed into a buffer a few tiles high, and rows are handed out, already
normalised, as soon as no later window touches them. So a slide costs one strip of
float memory, whatever its height, and the caller keeps only what it needs (a mask).

Weights are separable: the weight of a window is w_y(row) * w_x(col), and since the
windows form a full grid, the summed weight at a pixel is (sum of w_y) * (sum of w_x).
Only two vectors are kept for normalisation, never a 2-D weight map.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

BLENDS = ("center", "gaussian")
# nnU-Net's choice: a Gaussian of sigma = tile / 8 trusts the centre and all but
# ignores the outer eighth, where the network saw the least context.
_GAUSSIAN_SIGMA_PER_TILE = 1 / 8

ReadWindow = Callable[[int, int, int, int], np.ndarray]
PredictFn = Callable[[np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class WindowGrid:
    """Windows over a (height, width) image at model scale: all (y, x) in ys x xs."""
    height: int
    width: int
    tile: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def num_windows(self) -> int:
        return len(self.ys) * len(self.xs)

    def windows(self) -> list[tuple[int, int]]:
        """Top-left corners in raster order, the order in which rows get finished."""
        return [(y, x) for y in self.ys for x in self.xs]


def window_starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Starts every `stride`, the last one moved back so that its window ends at `length`."""
    if length <= tile:
        return (0,)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return tuple(starts)


def plan_windows(height: int, width: int, tile: int, overlap: int) -> WindowGrid:
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    if tile < 1:
        raise ValueError(f"tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"window overlap must be in [0, {tile}) for {tile} px tiles, "
                         f"got {overlap}")
    stride = tile - overlap
    return WindowGrid(height, width, tile, overlap, window_starts(height, tile, stride),
                      window_starts(width, tile, stride))


def axis_weights(length: int, tile: int, overlap: int, starts: tuple[int, ...],
                 blend: str) -> np.ndarray:
    """(len(starts), tile) weights of each window along one axis.

    'center' keeps a window's middle: it drops overlap // 2 pixels before and the rest
    of the overlap after, so that neighbours at the nominal stride meet exactly; a
    side lying on the image border is kept, as no other window sees those pixels.
    'gaussian' weights every window the same smooth bump.
    """
    if blend == "gaussian":
        centre = (tile - 1) / 2
        sigma = tile * _GAUSSIAN_SIGMA_PER_TILE
        bump = np.exp(-0.5 * ((np.arange(tile) - centre) / sigma) ** 2).astype(np.float32)
        return np.tile(bump / bump.max(), (len(starts), 1))
    if blend != "center":
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    before, after = overlap // 2, overlap - overlap // 2
    weights = np.ones((len(starts), tile), np.float32)
    for row, start in zip(weights, starts):
        if start > 0:
            row[:before] = 0
        if start + tile < length:
            row[tile - after:] = 0
    return weights


def weight_totals(length: int, starts: tuple[int, ...], weights: np.ndarray) -> np.ndarray:
    """Summed weight of all windows at each position of one axis."""
    totals = np.zeros(length, np.float32)
    for start, row in zip(starts, weights):
        end = min(start + len(row), length)
        totals[start:end] += row[:end - start]
    if not totals.all():
        raise AssertionError(f"window plan leaves positions {np.flatnonzero(totals == 0)[:5]} "
                             "uncovered")
    return totals


def pad_to_tile(window: np.ndarray, tile: int) -> np.ndarray:
    """A window cut short by a small image, mirrored out to the full tile."""
    missing_y, missing_x = tile - window.shape[0], tile - window.shape[1]
    if not missing_y and not missing_x:
        return window
    return np.pad(window, ((0, missing_y), (0, missing_x), (0, 0)), mode="symmetric")


class _RowAccumulator:
    """Weighted sums for the rows still open, [top, top + len(buffer))."""

    def __init__(self, width: int):
        self.top = 0
        self.buffer = np.zeros((0, width), np.float32)

    def extend_to(self, row: int) -> None:
        missing = row - (self.top + len(self.buffer))
        if missing > 0:
            self.buffer = np.concatenate(
                [self.buffer, np.zeros((missing, self.buffer.shape[1]), np.float32)])

    def add(self, y: int, x: int, values: np.ndarray) -> None:
        height, width = values.shape
        self.buffer[y - self.top:y - self.top + height, x:x + width] += values

    def pop_until(self, row: int) -> np.ndarray:
        done = self.buffer[:row - self.top]
        self.buffer = self.buffer[row - self.top:]
        self.top = row
        return done


def predict_rows(grid: WindowGrid, read_window: ReadWindow, predict_fn: PredictFn, *,
                 blend: str = "center", batch_size: int = 8,
                 progress: Callable[[int], Any] | None = None,
                 on_not_finite: Callable[[str], Any] | None = None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (first_row, probabilities) strips, top to bottom, covering every row once.

    `read_window(y0, y1, x0, x1)` returns the (y1 - y0, x1 - x0, 3) pixels at model
    scale; `predict_fn` maps a (B, tile, tile, 3) batch to (B, tile, tile)
    probabilities, or more rows (a fixed-size batch with padding: the extra rows are
    ignored). It may return a not-yet-computed array (a JAX dispatch): the next
    batch is read, in a background thread, before the result is waited for, so
    reading and the accelerator overlap. `progress(n)` is told of each batch done.

    A window with NaN or infinite probabilities raises FloatingPointError naming it
    (NaN > threshold is False: it would silently become background), unless
    `on_not_finite` is given: that is told the same description, and those pixels count
    as probability 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    tile = grid.tile
    weights_y = axis_weights(grid.height, tile, grid.overlap, grid.ys, blend)
    weights_x = axis_weights(grid.width, tile, grid.overlap, grid.xs, blend)
    totals_y = weight_totals(grid.height, grid.ys, weights_y)
    totals_x = weight_totals(grid.width, grid.xs, weights_x)
    windows = grid.windows()
    num_cols = len(grid.xs)
    accumulator = _RowAccumulator(grid.width)

    def read_batch(indices: range) -> np.ndarray:
        tiles = []
        for index in indices:
            y, x = windows[index]
            window = read_window(y, min(y + tile, grid.height), x, min(x + tile, grid.width))
            tiles.append(pad_to_tile(window, tile))
        return np.stack(tiles)

    def accumulate(indices: range, result: Any) -> Iterator[tuple[int, np.ndarray]]:
        probabilities = np.asarray(result, np.float32)
        if probabilities.shape[1:] != (tile, tile) or len(probabilities) < len(indices):
            raise ValueError(f"predict_fn returned shape {probabilities.shape}, expected "
                             f"{(len(indices), tile, tile)}")
        for index, window_probabilities in zip(indices, probabilities):
            row, col = divmod(index, num_cols)
            y, x = windows[index]
            height, width = min(tile, grid.height - y), min(tile, grid.width - x)
            inside = window_probabilities[:height, :width]
            not_finite = np.count_nonzero(~np.isfinite(inside))
            if not_finite:
                where = (f"window {index + 1} of {len(windows)} (rows {y}:{y + height}, cols "
                         f"{x}:{x + width}): {not_finite} of {inside.size} predicted "
                         "probabilities are NaN or infinite")
                if on_not_finite is None:
                    raise FloatingPointError(where)
                on_not_finite(where)
                inside = np.where(np.isfinite(inside), inside, 0)
            if col == 0:
                accumulator.extend_to(y + height)
            weighted = (inside * weights_y[row, :height, None]
                        * weights_x[col, None, :width])
            accumulator.add(y, x, weighted)
            if col == num_cols - 1:
                first = accumulator.top
                last = grid.ys[row + 1] if row + 1 < len(grid.ys) else grid.height
                sums = accumulator.pop_until(last)
                yield first, sums / (totals_y[first:last, None] * totals_x[None, :])
        if progress is not None:
            progress(len(indices))

    batches = [range(start, min(start + batch_size, len(windows)))
               for start in range(0, len(windows), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as reader:
        next_tiles = reader.submit(read_batch, batches[0])
        pending = None
        for number, indices in enumerate(batches):
            tiles = next_tiles.result()
            if number + 1 < len(batches):
                next_tiles = reader.submit(read_batch, batches[number + 1])
            result = predict_fn(tiles)
            if pending is not None:
                yield from accumulate(*pending)
            pending = (indices, result)
        yield from accumulate(*pending)


def predict_mask(grid: WindowGrid, read_window: ReadWindow, predict_fn: PredictFn,
                 threshold: float = 0.5, probabilities: np.ndarray | None = None,
                 **options: Any) -> np.ndarray:
    """Bool (height, width) mask of probability > threshold, built strip by strip.

    `probabilities`, a uint8 (height, width) array, is filled with round(255 p): what
    per-object confidences need, at a quarter of a float map's memory.
    """
    mask = np.empty((grid.height, grid.width), bool)
    for first, rows in predict_rows(grid, read_window, predict_fn, **options):
        mask[first:first + len(rows)] = rows > threshold
        if probabilities is not None:
            probabilities[first:first + len(rows)] = np.rint(np.clip(rows, 0, 1) * 255)
    return mask
