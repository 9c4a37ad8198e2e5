"""Whole-slide images read window by window, whatever their TIFF layout.

HuBMAP slides reach 40,000 x 50,000 RGB pixels (6 GB as uint8), so a slide is never
loaded whole: uncompressed TIFF pages are memory-mapped, compressed ones (tiled JPEG,
LZW strips, ...) are decoded segment by segment, only for the tiles or strips a
window touches. zarr is not a dependency, so tifffile's zarr view is not used.

The competition's files come as (H, W, 3), (3, H, W), (1, 1, 3, H, W) or three
single-channel pages/series; all are read as "planes" (one per channel) that share
the image size, and `read` stacks the first three channels last. A one-channel image
is read as grey (replicated to RGB, as PIL does). PNG/JPEG files are decoded whole by
PIL: they are small tiles, and those formats cannot be read by window anyway.

A slide in a bucket is read through an open remote file: tifffile fetches only the
segments a window needs (a remote file cannot be memory-mapped, so every page is read
by segment).
"""
from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ElementTree
from typing import Callable, Protocol

import numpy as np
import tifffile
from PIL import Image

from jaxseg import cli, paths

TIFF_SUFFIXES = (".tif", ".tiff")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PICTURE_SUFFIXES
# Extensions of more than one part: the OME-TIFF of `x.ome.tiff` is image `x`.
_COMPOUND_SUFFIXES = (".ome.tif", ".ome.tiff")
# The recipe's tiles are 2048 px at full resolution, reduced 4 times to the 512 px the
# network sees. PNG/JPEG files are tiles decoded whole, so the largest taken is four
# tiles a side (192 MB as RGB), which stays below Pillow's own decompression-bomb limit;
# a larger image belongs in a TIFF, read by window.
RECIPE_TILE_SIZE = 2048
RECIPE_REDUCTION = 4
MAX_PICTURE_PIXELS = (4 * RECIPE_TILE_SIZE) ** 2

# PIL modes whose pixels are a single value; other modes are converted to RGB.
_SINGLE_VALUE_MODES = {"1", "L", "I", "I;16", "F"}


class _Planes(Protocol):
    """The channels of an image, each a full-size plane, read by window."""
    height: int
    width: int
    num_planes: int
    dtype: np.dtype
    pixel_size: tuple[float, float] | None   # micrometres (y, x), when the file says

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(h, w, num_planes) window."""

    def close(self) -> None:
        ...


class _Window:
    """Shared window checking and context management of slides and masks."""

    def __init__(self, path: paths.Path, planes: _Planes):
        self.path = path
        self._planes = planes
        self.height, self.width = planes.height, planes.width
        self.pixel_size = planes.pixel_size

    def _check(self, y0: int, y1: int, x0: int, x1: int) -> None:
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise ValueError(f"{self.path}: window rows {y0}:{y1}, cols {x0}:{x1} outside "
                             f"the {self.height} x {self.width} image")

    def close(self) -> None:
        self._planes.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Slide(_Window):
    """An RGB uint8 slide; `read` returns (h, w, 3) windows."""

    def __init__(self, path: paths.Path, planes: _Planes):
        super().__init__(path, planes)
        problem = None
        if planes.dtype != np.uint8:
            problem = f"pixels are {planes.dtype}, expected 8-bit (uint8)"
        elif planes.num_planes == 2:
            problem = "has 2 channels, expected RGB (3) or grey (1)"
        if problem:
            planes.close()
            raise cli.InputError(f"{path}: {problem}")
        # Grey is replicated; extra channels (alpha) are dropped, without a copy.
        self._channels = [0, 0, 0] if planes.num_planes == 1 else slice(0, 3)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows [y0, y1) and columns [x0, x1) as uint8 (h, w, 3); must lie inside."""
        self._check(y0, y1, x0, x1)
        return self._planes.read(y0, y1, x0, x1)[..., self._channels]


class MaskImage(_Window):
    """A binary mask stored as an image: any nonzero colour channel is foreground."""

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows [y0, y1) and columns [x0, x1) as bool (h, w); must lie inside."""
        self._check(y0, y1, x0, x1)
        colour = self._planes.read(y0, y1, x0, x1)[..., :3]
        return np.any(colour != 0, axis=-1)


def image_id(path: str | os.PathLike) -> str:
    """The id an image file stands for: its name without the whole image extension, as
    the competition's `train.csv` writes ids (`x.ome.tiff` is `x`, not `x.ome`)."""
    name = paths.path(path).name
    for suffix in _COMPOUND_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return paths.path(path).stem


def open_slide(path: str | os.PathLike) -> Slide:
    """Opens a TIFF, PNG or JPEG slide for windowed RGB reading (a context manager)."""
    path = paths.path(path)
    return Slide(path, _open_planes(path, for_mask=False))


def open_mask(path: str | os.PathLike) -> MaskImage:
    """Opens a TIFF, PNG or JPEG binary mask for windowed reading (a context manager)."""
    path = paths.path(path)
    return MaskImage(path, _open_planes(path, for_mask=True))


def downscale_area(image: np.ndarray, factor: int) -> np.ndarray:
    """Shrinks (H, W[, C]) by an integer factor with area interpolation (block means).

    uint8/uint16 images keep their dtype, rounded half up (OpenCV's INTER_AREA gives
    the same block means for integer factors); other dtypes give float64 means. Bool
    masks become True where at least half of the block is True, so the mask stays
    aligned with the averaged image (nearest-neighbour sampling would shift it by
    (factor - 1) / 2 pixels).
    """
    if factor < 1:
        raise ValueError(f"downscale factor must be >= 1, got {factor}")
    if factor == 1:
        return image
    height, width = image.shape[:2]
    if height % factor or width % factor:
        raise ValueError(f"image size {height} x {width} is not divisible by the "
                         f"downscale factor {factor}")
    exact = image.dtype in (np.bool_, np.uint8, np.uint16)
    # Summing the factor**2 strided sub-images is faster than a reshaped sum.
    total = np.zeros((height // factor, width // factor, *image.shape[2:]),
                     np.uint32 if exact else np.float64)
    for dy in range(factor):
        for dx in range(factor):
            total += image[dy::factor, dx::factor]
    area = factor * factor
    if image.dtype == np.bool_:
        return total * 2 >= area
    if exact:
        return ((total + area // 2) // area).astype(image.dtype)
    return total / area


def model_scale_shape(height: int, width: int, reduction: int) -> tuple[int, int]:
    return -(-height // reduction), -(-width // reduction)


def scaled_reader(slide: Slide, reduction: int) -> Callable[[int, int, int, int], np.ndarray]:
    """Reads windows of the full-resolution slide at 1/reduction scale (model scale, or
    an overview).

    Pixel (y, x) is the mean of the full-resolution block starting at
    (y * reduction, x * reduction); the last blocks of a slide whose size the
    reduction does not divide are completed by repeating the edge pixels.
    """
    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        top, left = y0 * reduction, x0 * reduction
        bottom = min(y1 * reduction, slide.height)
        right = min(x1 * reduction, slide.width)
        pixels = slide.read(top, bottom, left, right)
        if reduction == 1:
            return pixels
        missing_y = (y1 - y0) * reduction - (bottom - top)
        missing_x = (x1 - x0) * reduction - (right - left)
        if missing_y or missing_x:
            pixels = np.pad(pixels, ((0, missing_y), (0, missing_x), (0, 0)), mode="edge")
        return downscale_area(pixels, reduction)

    return read


def _open_planes(path: paths.Path, for_mask: bool) -> _Planes:
    if not path.is_file():
        raise cli.MissingInput(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return _TiffPlanes(path)
    if suffix in PICTURE_SUFFIXES:
        return _PicturePlanes(path, for_mask)
    raise cli.InputError(f"{path}: unsupported image type {suffix!r}, expected one of "
                         f"{', '.join(IMAGE_SUFFIXES)}")


class _PicturePlanes:
    """A PNG/JPEG decoded whole into memory."""

    def __init__(self, path: paths.Path, for_mask: bool):
        pixels = None
        # Pillow's decompression-bomb warning is turned into the error below rather than
        # printed as a line of its own (its hard limit, twice as high, raises anyway).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with path.open("rb") as file, Image.open(file) as image:
                    if image.width * image.height <= MAX_PICTURE_PIXELS:
                        pixels = (np.asarray(image)[..., None]
                                  if for_mask and image.mode in _SINGLE_VALUE_MODES
                                  else np.asarray(image.convert("RGB")))
            except (Image.DecompressionBombWarning, Image.DecompressionBombError):
                pass
            except (OSError, ValueError) as error:
                raise cli.InputError(
                    f"{path}: unreadable image ({_first_line(error)})") from None
        if pixels is None:
            raise cli.InputError(f"{path}: more than {MAX_PICTURE_PIXELS:,} pixels, the most a "
                                 "PNG/JPEG may hold here (it is decoded whole); save a larger "
                                 "image as TIFF, which is read by window")
        self._pixels = pixels
        self.height, self.width, self.num_planes = pixels.shape
        self.dtype = pixels.dtype
        self.pixel_size = None

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._pixels[y0:y1, x0:x1]

    def close(self) -> None:
        self._pixels = None


class _TiffPlanes:
    """The channel planes of a TIFF, gathered from whichever pages/series hold them."""

    def __init__(self, path: paths.Path):
        # tifffile closes only the files it opened itself.
        self._remote_file = path.open("rb") if paths.is_remote(path) else None
        try:
            self._tiff = tifffile.TiffFile(self._remote_file or os.fspath(path))
        except Exception as error:  # tifffile raises many types for corrupt files
            self._close_remote_file()
            raise cli.InputError(f"{path}: unreadable TIFF ({_first_line(error)})") from None
        try:
            pages = self._base_pages()
            _check_complete(pages, self._tiff.filehandle.size)
            self._readers = [_MemmapPage(path, page) if page.is_memmappable
                             else _SegmentPage(page) for page in pages]
        except Exception as error:
            self.close()
            raise cli.InputError(f"{path}: unreadable TIFF ({_first_line(error)})") from None
        self.path = path
        self.height, self.width = pages[0].imagelength, pages[0].imagewidth
        self.dtype = pages[0].dtype
        self._sources = []             # per channel: (reader, separate sample, contig sample)
        for index, page in enumerate(pages):
            separate = page.planarconfig == 2
            self._sources += [(index, sample if separate else 0, 0 if separate else sample)
                              for sample in range(page.samplesperpixel)]
        self.num_planes = len(self._sources)
        self.pixel_size = _pixel_size(self._tiff, pages[0])

    def _base_pages(self) -> list[tifffile.TiffPage]:
        """Full-resolution pages of the image, in channel order.

        The first series holds the image; when it has a single channel (each channel
        written as its own series), later series of the same size add channels.
        Pyramid levels and thumbnails (other sizes) are ignored.
        """
        pages = []
        size = None
        for series in self._tiff.series:
            for frame in series.pages:
                page = frame.aspage()
                if size is None:
                    size = (page.imagelength, page.imagewidth)
                if (page.imagelength, page.imagewidth) == size:
                    pages.append(page)
            if sum(page.samplesperpixel for page in pages) >= 3:
                break
        if not pages:
            raise ValueError("no image pages")
        if any(page.imagedepth > 1 for page in pages):
            raise ValueError("volumetric pages are not supported")
        return pages

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            windows = [reader.read(y0, y1, x0, x1) for reader in self._readers]
        except _SegmentError as error:
            raise cli.InputError(f"{self.path}: {error}") from None
        except Exception as error:  # a file changed since it was opened, a failing disk
            raise cli.InputError(f"{self.path}: cannot read rows {y0}:{y1}, cols {x0}:{x1} "
                                 f"({_first_line(error)})") from None
        return np.stack([windows[r][s, :, :, c] for r, s, c in self._sources], axis=-1)

    def close(self) -> None:
        self._tiff.close()
        self._close_remote_file()

    def _close_remote_file(self) -> None:
        if self._remote_file is not None:
            self._remote_file.close()


# OME's length units down to micrometres; OME's default unit is the micrometre.
_MICROMETRES_PER_UNIT = {"nm": 1e-3, "\u00b5m": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4}


def _pixel_size(tiff: tifffile.TiffFile, page: tifffile.TiffPage
                ) -> tuple[float, float] | None:
    """(y, x) micrometres per pixel from OME-XML, else from resolution tags in
    centimetres (as microscopy software writes them). Inch resolutions are ignored:
    they are what desktop software writes by default (72 dpi), not a scan's pixel."""
    if tiff.is_ome and tiff.ome_metadata:
        try:
            root = ElementTree.fromstring(tiff.ome_metadata)
            pixels = next(element for element in root.iter() if element.tag.endswith("}Pixels"))
            size_y, size_x = (float(pixels.attrib[f"PhysicalSize{axis}"]) * _MICROMETRES_PER_UNIT[
                pixels.attrib.get(f"PhysicalSize{axis}Unit", "\u00b5m")] for axis in "YX")
            return size_y, size_x
        except (ElementTree.ParseError, StopIteration, KeyError, ValueError):
            pass
    if page.resolutionunit == tifffile.RESUNIT.CENTIMETER and all(page.resolution):
        per_micrometre_x, per_micrometre_y = page.get_resolution(tifffile.RESUNIT.MICROMETER)
        return 1 / per_micrometre_y, 1 / per_micrometre_x
    return None


class _SegmentError(ValueError):
    """A TIFF segment that cannot be decoded; `_TiffPlanes.read` adds the file's name."""


def _check_complete(pages: list[tifffile.TiffPage], file_size: int) -> None:
    """A copy cut short fails when opened, not hours later at the missing window (or,
    uncompressed, as numpy's memory-map error that names no file)."""
    end = max(offset + count for page in pages
              for offset, count in zip(page.dataoffsets, page.databytecounts))
    if end > file_size:
        raise ValueError(f"truncated: its pixel data runs to byte {end:,}, the file ends at "
                         f"byte {file_size:,}")


class _MemmapPage:
    """An uncompressed, contiguous page: windows are copied out of a memory map.

    The map lives only for one read: pages of a long-lived map stay in the process's
    resident set, which would grow to the whole slide over a pass.
    """

    def __init__(self, path: paths.Path, page: tifffile.TiffPage):
        separate, _, height, width, contig = page.shaped
        self._map_args = {"filename": os.fspath(path), "dtype": page.dtype, "mode": "r",
                          "offset": page.dataoffsets[0],
                          "shape": (separate, height, width, contig)}

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(separate samples, h, w, contiguous samples) window."""
        return np.array(np.memmap(**self._map_args)[:, y0:y1, x0:x1, :])


class _SegmentPage:
    """A compressed page: decodes only the tiles or strips a window overlaps."""

    def __init__(self, page: tifffile.TiffPage):
        self._page = page
        self._shaped = page.shaped
        if page.is_tiled:
            self._segment_size = (page.tilelength, page.tilewidth)
        else:
            self._segment_size = (min(page.rowsperstrip, page.imagelength), page.imagewidth)
        self._grid = (-(-page.imagelength // self._segment_size[0]),
                      -(-page.imagewidth // self._segment_size[1]))
        self._decode_args = {}
        if page.jpegtables is not None or page.jpegheader is not None:
            self._decode_args = {"jpegtables": page.jpegtables,
                                 "jpegheader": page.jpegheader}

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(separate samples, h, w, contiguous samples) window."""
        separate, _, _, _, contig = self._shaped
        seg_h, seg_w = self._segment_size
        rows, cols = self._grid
        out = np.zeros((separate, y1 - y0, x1 - x0, contig), dtype=self._page.dtype)
        indices = [(s * rows + r) * cols + c
                   for s in range(separate)
                   for r in range(y0 // seg_h, (y1 - 1) // seg_h + 1)
                   for c in range(x0 // seg_w, (x1 - 1) // seg_w + 1)]
        page = self._page
        filehandle = page.parent.filehandle
        segments = filehandle.read_segments([page.dataoffsets[i] for i in indices],
                                            [page.databytecounts[i] for i in indices],
                                            indices=indices, lock=filehandle.lock)
        for data, index in segments:
            try:
                segment, (sample, _, top, left, _), _ = page.decode(data, index,
                                                                    **self._decode_args)
            except Exception as error:  # codec errors have no common base class
                raise _SegmentError(f"cannot decode TIFF segment {index} "
                                    f"({_first_line(error)})") from None
            if segment is None:     # segment absent from the file: zeros
                continue
            segment = segment[0]    # drop the depth axis
            sy0, sy1 = max(y0, top), min(y1, top + segment.shape[0])
            sx0, sx1 = max(x0, left), min(x1, left + segment.shape[1])
            out[sample, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = \
                segment[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
        return out


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
