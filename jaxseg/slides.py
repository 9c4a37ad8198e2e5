"""Whole-slide images read window by window, at the pyramid level nearest the scale asked.

HuBMAP slides reach 40,000 x 50,000 RGB pixels (6 GB as uint8), so a slide is never
loaded whole. TIFF-based slides (the competition's TIFFs, SVS, NDPI, SCN, BIF,
OME-TIFF) are read by tifffile (`jaxseg.tiff_slides`), other whole-slide formats (MIRAX
and others) by OpenSlide (`jaxseg.openslide_slides`, the extra `wsi`); both read any
pyramid level by window. PNG/JPEG files are decoded whole by PIL: they are small tiles,
and those formats cannot be read by window anyway.

A slide is seen at model scale, 1/reduction of full resolution, with an integer
reduction, so that each model pixel stands for a whole block of full-resolution pixels
and the full-resolution mask and RLE map onto it exactly. The reduction comes from the
slide's pixel size and the scale the model was trained at (`reduction_for`), or is
given; `scaled_reader` then reads the level with the largest whole-number downsample
that divides it and block-averages the rest, instead of reading full resolution.

Images are read as "planes" (one per channel) that share the image size, and `read`
takes the first three channels last. A one-channel image is read as grey (replicated
to RGB, as PIL does).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Protocol

import numpy as np
from PIL import Image

from jaxseg import cli, openslide_slides, paths, tiff_slides

TIFF_SUFFIXES = (".tif", ".tiff")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PICTURE_SUFFIXES
# Whole-slide formats beyond TIFF and pictures, for slides (masks are IMAGE_SUFFIXES).
SLIDE_SUFFIXES = (IMAGE_SUFFIXES + tuple(suffix for suffix in tiff_slides.SUFFIXES
                                         if suffix not in TIFF_SUFFIXES)
                  + openslide_slides.SUFFIXES)
# Extensions of more than one part: the OME-TIFF of `x.ome.tiff` is image `x`.
_COMPOUND_SUFFIXES = (".ome.tif", ".ome.tiff")
# The recipe's tiles are 2048 px at full resolution, reduced 4 times to the 512 px the
# network sees. PNG/JPEG files are tiles decoded whole, so the largest taken is four
# tiles a side (192 MB as RGB), which stays below Pillow's own decompression-bomb limit;
# a larger image belongs in a TIFF, read by window.
RECIPE_TILE_SIZE = 2048
RECIPE_REDUCTION = 4
# The HuBMAP kidney slides' pixel, in micrometres (20x scans); their TIFFs do not say
# it, so the recipe's tiles are taken to be RECIPE_SLIDE_MPP * RECIPE_REDUCTION.
RECIPE_SLIDE_MPP = 0.5
MAX_PICTURE_PIXELS = (4 * RECIPE_TILE_SIZE) ** 2
# Pixel sizes outside this range (micrometres) are a wrong tag (1 pixel per centimetre),
# not a microscope's: scaling a slide by them would predict it at an absurd scale.
PLAUSIBLE_MPP = (0.01, 100.0)

# PIL modes whose pixels are a single value; other modes are converted to RGB.
_SINGLE_VALUE_MODES = {"1", "L", "I", "I;16", "F"}


class _Planes(Protocol):
    """The channels of an image, each a full-size plane, read by window at any level."""
    level_sizes: list[tuple[int, int]]   # (height, width) per pyramid level, full first
    num_planes: int
    dtype: np.dtype
    pixel_size: tuple[float, float] | None   # micrometres (y, x), when the file says

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """(h, w, num_planes) window, in the level's own pixels."""

    def close(self) -> None:
        ...


class _Window:
    """Shared window checking and context management of slides and masks."""

    def __init__(self, path: paths.Path, planes: _Planes):
        self.path = path
        self._planes = planes
        self.height, self.width = planes.level_sizes[0]
        self.pixel_size = planes.pixel_size

    def _check(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> None:
        height, width = self._planes.level_sizes[level]
        if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
            where = f" of level {level}" if level else ""
            raise ValueError(f"{self.path}: window rows {y0}:{y1}, cols {x0}:{x1} outside "
                             f"the {height} x {width} image{where}")

    def close(self) -> None:
        self._planes.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Slide(_Window):
    """An RGB uint8 slide; `read` returns (h, w, 3) windows of any pyramid level."""

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
        self.level_sizes = planes.level_sizes
        self.downsamples = _whole_downsamples(planes.level_sizes)

    @property
    def mpp(self) -> float | None:
        """Micrometres per full-resolution pixel (mean of y and x), when the file records
        a plausible one."""
        if self.pixel_size is None:
            return None
        mpp = sum(self.pixel_size) / 2
        return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None

    def level_for(self, reduction: int) -> tuple[int, int]:
        """(level, its downsample): the level with the largest whole-number downsample
        that divides `reduction`, the one fewest pixels are read from."""
        downsample = max(d for d in self.downsamples if reduction % d == 0)
        return self.downsamples[downsample], downsample

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """Rows [y0, y1) and columns [x0, x1) of the level as uint8 (h, w, 3); must lie
        inside it."""
        self._check(y0, y1, x0, x1, level)
        return self._planes.read(y0, y1, x0, x1, level)[..., self._channels]


class MaskImage(_Window):
    """A binary mask stored as an image: any nonzero colour channel is foreground."""

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows [y0, y1) and columns [x0, x1) as bool (h, w); must lie inside."""
        self._check(y0, y1, x0, x1)
        colour = self._planes.read(y0, y1, x0, x1)[..., :3]
        return np.any(colour != 0, axis=-1)


def _whole_downsamples(level_sizes: list[tuple[int, int]]) -> dict[int, int]:
    """{downsample: level} of the levels that are full resolution divided by a whole
    number, their size rounded either way (scanners do both); levels of other scales
    (an NDPI's, a thumbnail taken for a level) are not read."""
    height, width = level_sizes[0]
    found = {1: 0}
    for level, (level_height, level_width) in enumerate(level_sizes[1:], 1):
        downsample = round(width / level_width)
        if (downsample > 1 and downsample not in found
                and level_height in (height // downsample, -(-height // downsample))
                and level_width in (width // downsample, -(-width // downsample))):
            found[downsample] = level
    return found


def image_id(path: str | os.PathLike) -> str:
    """The id an image file stands for: its name without the whole image extension, as
    the competition's `train.csv` writes ids (`x.ome.tiff` is `x`, not `x.ome`)."""
    name = paths.path(path).name
    for suffix in _COMPOUND_SUFFIXES + SLIDE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return paths.path(path).stem


def open_slide(path: str | os.PathLike) -> Slide:
    """Opens a whole-slide image, PNG or JPEG for windowed RGB reading (a context manager)."""
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


def reduction_for(slide: Slide, target_mpp: float | None, default: int) -> int:
    """The whole reduction from full resolution that brings the slide nearest to
    `target_mpp` micrometres per pixel; `default` when the slide records no pixel size
    (or no target is given).

    Rounded to a whole number so that model pixels are whole blocks of full-resolution
    pixels: a 0.2525 µm/px slide aimed at 2.0 µm/px is read at 1/8, 2.02 µm/px.
    """
    if target_mpp is None or slide.mpp is None:
        return default
    return max(1, round(target_mpp / slide.mpp))


def scaled_reader(slide: Slide, reduction: int) -> Callable[[int, int, int, int], np.ndarray]:
    """Reads windows of the slide at 1/reduction scale (model scale, or an overview),
    from the pyramid level that `Slide.level_for` picks.

    Pixel (y, x) is the mean of the level's block starting at (y * f, x * f), f the
    reduction left after the level's downsample, which stands for the full-resolution
    block at (y * reduction, x * reduction). The last blocks of a slide whose size the
    reduction does not divide are completed by repeating the edge pixels (a level whose
    size was rounded down may lack the last row or column of blocks altogether).
    """
    level, downsample = slide.level_for(reduction)
    factor = reduction // downsample
    level_height, level_width = slide.level_sizes[level]

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        top, left = min(y0 * factor, level_height - 1), min(x0 * factor, level_width - 1)
        bottom = min(y1 * factor, level_height)
        right = min(x1 * factor, level_width)
        pixels = slide.read(top, bottom, left, right, level)
        missing_y = (y1 - y0) * factor - (bottom - top)
        missing_x = (x1 - x0) * factor - (right - left)
        if missing_y or missing_x:
            pixels = np.pad(pixels, ((0, missing_y), (0, missing_x), (0, 0)), mode="edge")
        return downscale_area(pixels, factor)

    return read


def _open_planes(path: paths.Path, for_mask: bool) -> _Planes:
    if not path.is_file():
        raise cli.MissingInput(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in PICTURE_SUFFIXES:
        return _PicturePlanes(path, for_mask)
    if suffix in tiff_slides.SUFFIXES:
        return tiff_slides.TiffPlanes(path)
    if suffix in openslide_slides.SUFFIXES and not for_mask:
        return openslide_slides.OpenSlidePlanes(path)
    expected = IMAGE_SUFFIXES if for_mask else SLIDE_SUFFIXES
    raise cli.InputError(f"{path}: unsupported image type {suffix!r}, expected one of "
                         f"{', '.join(expected)}")


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
                    f"{path}: unreadable image ({cli.first_line(error)})") from None
        if pixels is None:
            raise cli.InputError(f"{path}: more than {MAX_PICTURE_PIXELS:,} pixels, the most a "
                                 "PNG/JPEG may hold here (it is decoded whole); save a larger "
                                 "image as TIFF, which is read by window")
        self._pixels = pixels
        height, width, self.num_planes = pixels.shape
        self.level_sizes = [(height, width)]
        self.dtype = pixels.dtype
        self.pixel_size = None

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        return self._pixels[y0:y1, x0:x1]

    def close(self) -> None:
        self._pixels = None
