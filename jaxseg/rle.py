"""Run-length masks in the HuBMAP competition convention.

Pixels are numbered 1.. top to bottom, then left to right (column-major, i.e. the
order of `mask.T.flatten()`); an RLE is the space-separated `start length` pairs of
the runs of ones, starts increasing, runs not overlapping; an empty mask is ''.

Whole-slide masks are up to 40,000 x 50,000 pixels (2 GB as bool), so nothing here
makes a full-size transposed or int64 copy: `encode` finds run boundaries from row
differences block by block, and `RleMask` keeps only the runs (split per column) so
that any window of the mask can be decoded on its own.
"""
from __future__ import annotations

import os

import numpy as np

from jaxseg import cli

# Pixels processed per block: bounds the temporaries of encode/decode to ~64 MB.
_BLOCK_PIXELS = 1 << 26
# A Python loop fills one piece in about the time a cumulative sum takes for this many
# pixels.
_PIXELS_PER_LOOPED_PIECE = 64


def encode(mask: np.ndarray) -> str:
    """RLE of the nonzero pixels of a 2-D mask, column-major, 1-indexed."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    height, width = mask.shape
    if mask.size == 0:
        return ""
    # A run starts or ends where the pixel value changes along the column-major scan:
    # inside a column (a vertical difference) or between the last pixel of one column
    # and the first of the next. Positions are 0-indexed "first pixel of the new value".
    changes = []
    rows_per_block = max(1, _BLOCK_PIXELS // width)
    for r0 in range(0, height - 1, rows_per_block):
        # Blocks overlap by one row so that every vertical neighbour pair is compared.
        block = mask[r0:r0 + rows_per_block + 1]
        if block.dtype != np.bool_:
            block = block != 0
        rows, cols = np.divmod(np.flatnonzero(block[1:] != block[:-1]), width)
        changes.append(cols * height + (rows + r0 + 1))
    top = mask[0] != 0
    bottom = mask[-1] != 0
    between_columns = np.flatnonzero(bottom[:-1] != top[1:]).astype(np.int64)
    changes.append((between_columns + 1) * height)
    if top[0]:
        changes.append(np.zeros(1, np.int64))
    if bottom[-1]:
        changes.append(np.full(1, height * width, np.int64))
    boundaries = np.sort(np.concatenate(changes))
    starts = boundaries[0::2]
    lengths = boundaries[1::2] - starts
    pairs = np.stack([starts + 1, lengths], axis=1).ravel()
    return " ".join(map(str, pairs.tolist()))


def parse_named(rle: str, shape: tuple[int, int], source: str | os.PathLike,
                image_id: str) -> RleMask:
    """The runs of an RLE read from a file; a defect names the file and the id, since a
    submission or train.csv holds many RLEs of several files' images."""
    try:
        return RleMask(rle, shape)
    except ValueError as error:
        raise cli.InputError(f"{source}, id {image_id}: {error}") from None


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Bool (H, W) mask of an RLE; ValueError if the RLE is malformed or too long."""
    runs = RleMask(rle, shape)
    # Filled in column-major storage, the order runs are laid out in, and returned as
    # its transpose: no full-size transposed copy is ever made.
    columns = np.empty((runs.width, runs.height), dtype=bool)
    cols_per_block = max(1, _BLOCK_PIXELS // runs.height)
    for x0 in range(0, runs.width, cols_per_block):
        x1 = min(runs.width, x0 + cols_per_block)
        runs.fill_columns(0, runs.height, x0, x1, columns[x0:x1])
    return columns.T


class RleMask:
    """A parsed RLE that decodes any window of its mask on demand.

    Runs are split at column boundaries once (at most runs + W pieces), so a window
    only touches the pieces of its own columns: a whole slide never needs to exist
    as a full-size array.
    """

    def __init__(self, rle: str, shape: tuple[int, int]):
        height, width = (int(v) for v in shape)
        if height <= 0 or width <= 0:
            raise ValueError(f"mask shape must be positive, got {shape}")
        self.height, self.width = height, width
        starts, lengths = _parse(rle, height * width)
        first = starts - 1                      # 0-indexed, inclusive
        last = first + lengths - 1              # 0-indexed, inclusive
        first_col, last_col = first // height, last // height
        pieces = last_col - first_col + 1
        run_of_piece = np.repeat(np.arange(len(first)), pieces)
        offset_in_run = np.arange(len(run_of_piece)) - np.repeat(np.cumsum(pieces) - pieces,
                                                                  pieces)
        self._col = first_col[run_of_piece] + offset_in_run
        is_first_piece = offset_in_run == 0
        is_last_piece = self._col == last_col[run_of_piece]
        self._row0 = np.where(is_first_piece, first[run_of_piece] % height, 0)
        self._row1 = np.where(is_last_piece, last[run_of_piece] % height + 1, height)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Bool mask of rows [y0, y1) and columns [x0, x1) (a Fortran-ordered array)."""
        columns = np.empty((x1 - x0, y1 - y0), dtype=bool)
        self.fill_columns(y0, y1, x0, x1, columns)
        return columns.T

    def fill_columns(self, y0: int, y1: int, x0: int, x1: int, out: np.ndarray) -> None:
        """Writes the window, transposed (columns first), into bool `out` (x1-x0, y1-y0)."""
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise ValueError(f"window rows {y0}:{y1}, cols {x0}:{x1} outside the "
                             f"{self.height} x {self.width} mask")
        height, width = y1 - y0, x1 - x0
        lo, hi = np.searchsorted(self._col, [x0, x1])
        row0 = np.clip(self._row0[lo:hi], y0, y1) - y0
        row1 = np.clip(self._row1[lo:hi], y0, y1) - y0
        visible = row1 > row0
        cols, row0, row1 = self._col[lo:hi][visible] - x0, row0[visible], row1[visible]
        if len(cols) * _PIXELS_PER_LOOPED_PIECE < height * width:
            # Few pieces (real masks): one contiguous fill per piece touches only them.
            out[...] = False
            for col, r0, r1 in zip(cols.tolist(), row0.tolist(), row1.tolist()):
                out[col, r0:r1] = True
            return
        # Many pieces: +1 where a piece starts, -1 past its end, summed down each column.
        # Pieces of a column never overlap, so each fancy-indexed update has unique indices.
        edges = np.zeros((width, height + 1), np.int8)
        edges[cols, row0] += 1
        edges[cols, row1] -= 1
        np.cumsum(edges[:, :height], axis=1, dtype=np.int8, out=out.view(np.int8))


def _parse(rle: str, num_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated (starts, lengths) of an RLE; one-line ValueError on any defect."""
    tokens = rle.split()
    if not tokens:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(tokens) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(tokens)}): "
                         "expected 'start length' pairs")
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((t for t in tokens if not t.lstrip("-").isdigit()), "beyond int64")
        raise ValueError(f"RLE value {bad[:20]!r} is not an integer") from None
    starts, lengths = values[0::2], values[1::2]
    if starts.min() < 1:
        raise ValueError(f"RLE start {starts.min()} is below 1 (starts are 1-indexed)")
    if lengths.min() < 1:
        raise ValueError(f"RLE run length {lengths.min()} is below 1")
    ends = starts + lengths                    # 1-indexed, exclusive
    bad = np.flatnonzero(starts[1:] < ends[:-1])
    if len(bad):
        i = bad[0]
        raise ValueError(f"RLE runs not increasing or overlapping: run {i + 1} "
                         f"({starts[i]} {lengths[i]}) then {starts[i + 1]}")
    if ends[-1] - 1 > num_pixels:
        raise ValueError(f"RLE runs past the image: last pixel {ends[-1] - 1} > "
                         f"{num_pixels} pixels")
    return starts, lengths
