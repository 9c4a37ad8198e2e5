"""Slide formats that are not TIFF (MIRAX .mrxs, Hamamatsu .vms/.vmu, Zeiss .czi, ...)
through OpenSlide, the maintained C reader (the extra `wsi`: openslide-python and
openslide-bin, its library as a wheel).

OpenSlide reads a region of any level by level-0 coordinates; at a level whose
downsample is not a whole number, a window's origin falls between that level's pixels
and OpenSlide interpolates. Only levels with a whole-number downsample are offered, so
every window is the level's own pixels. Transparent pixels (outside the scanned area
of a MIRAX slide) take the slide's background colour, as OpenSlide's viewers show
them, not black.
"""
from __future__ import annotations

import os

import numpy as np

from jaxseg import cli, paths

SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide", ".czi", ".dcm")
EXTRA = "wsi"


class OpenSlidePlanes:
    """An RGB slide OpenSlide opens, at each of its whole-number pyramid levels."""

    def __init__(self, path: paths.Path):
        if paths.is_remote(path):
            raise cli.InputError(f"{path}: OpenSlide reads local files only; copy the slide "
                                 "(with its companion files) to a local disk")
        try:
            import openslide
        except ImportError:
            raise cli.InputError(f"{path}: reading {path.suffix} slides needs OpenSlide: "
                                 f"pip install 'jaxseg[{EXTRA}]'") from None
        try:
            self._slide = openslide.OpenSlide(os.fspath(path))
        except (openslide.OpenSlideError, OSError) as error:
            raise cli.InputError(f"{path}: unreadable slide ({cli.first_line(error)})") from None
        self.path = path
        self._levels = [level for level, downsample in enumerate(self._slide.level_downsamples)
                        if float(downsample).is_integer()]
        self._downsamples = [int(self._slide.level_downsamples[level])
                             for level in self._levels]
        self.level_sizes = [self._slide.level_dimensions[level][::-1] for level in self._levels]
        self.num_planes = 3
        self.dtype = np.dtype(np.uint8)
        properties = self._slide.properties
        try:
            self.pixel_size = (float(properties[openslide.PROPERTY_NAME_MPP_Y]),
                               float(properties[openslide.PROPERTY_NAME_MPP_X]))
        except (KeyError, ValueError):
            self.pixel_size = None
        colour = properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR) or "ffffff"
        self._background = np.frombuffer(bytes.fromhex(colour), np.uint8).astype(np.uint32)

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """(h, w, 3) window of the level, in the level's own pixels."""
        downsample = self._downsamples[level]
        try:
            region = self._slide.read_region((x0 * downsample, y0 * downsample),
                                             self._levels[level], (x1 - x0, y1 - y0))
        except Exception as error:  # openslide.OpenSlideError, a failing disk
            raise cli.InputError(f"{self.path}: cannot read rows {y0}:{y1}, cols {x0}:{x1} "
                                 f"({cli.first_line(error)})") from None
        rgba = np.asarray(region)
        if rgba[..., 3].min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        # openslide-python un-premultiplies: colour over background by alpha.
        colour, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
        composed = (colour * alpha + self._background * (255 - alpha) + 127) // 255
        return composed.astype(np.uint8)

    def close(self) -> None:
        self._slide.close()
