"""TIFF-based slides through tifffile: the competition's layouts and the scanners' pyramids.

tifffile parses the pyramid of SVS, NDPI, SCN, BIF, OME-TIFF (SubIFDs) and generic tiled
TIFF (reduced-resolution pages) itself, as `series[0].levels`; tiffslide wraps the same
parser, so it is used directly and adds no dependency. Every level is read by window:
uncompressed pages are memory-mapped, compressed ones (tiled JPEG, LZW strips, ...) are
decoded segment by segment, only for the tiles or strips a window touches. zarr is not a
dependency, so tifffile's zarr view is not used.

The competition's files come as (H, W, 3), (3, H, W), (1, 1, 3, H, W) or three
single-channel pages/series; all are read as "planes" (one per channel) that share the
image size. A file whose channels lie in several series has no usable pyramid here.

A slide in a bucket is read through an open remote file: tifffile fetches only the
segments a window needs (a remote file cannot be memory-mapped, so every page is read
by segment).
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ElementTree

import numpy as np
import tifffile

from jaxseg import cli, paths

# Formats tifffile reads; openslide_slides takes the ones that are not TIFF.
SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif")
# OME's length units down to micrometres; OME's default unit is the micrometre.
_MICROMETRES_PER_UNIT = {"nm": 1e-3, "\u00b5m": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4}
# Aperio writes the scan's pixel size into the ImageDescription: "...|MPP = 0.2525|...".
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")


class TiffPlanes:
    """The channel planes of a TIFF at each pyramid level, gathered from whichever
    pages/series hold them."""

    def __init__(self, path: paths.Path):
        # tifffile closes only the files it opened itself.
        self._remote_file = path.open("rb") if paths.is_remote(path) else None
        try:
            self._tiff = tifffile.TiffFile(self._remote_file or os.fspath(path))
        except Exception as error:  # tifffile raises many types for corrupt files
            self._close_remote_file()
            raise cli.InputError(f"{path}: unreadable TIFF ({cli.first_line(error)})") from None
        try:
            # The slide is the largest image: a Leica SCN lists its macro photo first.
            self._series = sorted(self._tiff.series, key=lambda series: -_pixel_count(series))
            base = self._base_pages()
            levels = [base] + self._reduced_levels(base)
            _check_complete([page for pages in levels for page in pages],
                            self._tiff.filehandle.size)
            self._levels = [_PageStack(path, pages) for pages in levels]
            self.pixel_size = _pixel_size(self._tiff, base[0])
        except Exception as error:
            self.close()
            raise cli.InputError(f"{path}: unreadable TIFF ({cli.first_line(error)})") from None
        self.path = path
        self.level_sizes = [(level.height, level.width) for level in self._levels]
        self.dtype = base[0].dtype
        self.num_planes = self._levels[0].num_planes

    def _base_pages(self) -> list[tifffile.TiffPage]:
        """Full-resolution pages of the image, in channel order.

        The largest series holds the image; when it has a single channel (each channel
        written as its own series), other series of the same size add channels, in file
        order. Thumbnails, labels and other images (other sizes) are ignored.
        """
        pages = []
        size = None
        for series in self._series:
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

    def _reduced_levels(self, base: list[tifffile.TiffPage]) -> list[list[tifffile.TiffPage]]:
        """The pages of each reduced level of the image series' pyramid that holds the
        channels the way full resolution does; a level laid out otherwise ends the list."""
        series = self._series[0]
        if len(series.pages) != len(base):   # channels from several series
            return []
        levels = []
        for level in series.levels[1:]:
            pages = [frame.aspage() for frame in level.pages]
            if len(pages) != len(base) or any(
                    (page.samplesperpixel, page.planarconfig, page.dtype, page.imagedepth)
                    != (first.samplesperpixel, first.planarconfig, first.dtype, 1)
                    for page, first in zip(pages, base)):
                break
            levels.append(pages)
        return levels

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """(h, w, num_planes) window of the level, in the level's own pixels."""
        try:
            return self._levels[level].read(y0, y1, x0, x1)
        except _SegmentError as error:
            raise cli.InputError(f"{self.path}: {error}") from None
        except Exception as error:  # a file changed since it was opened, a failing disk
            where = f" of level {level}" if level else ""
            raise cli.InputError(f"{self.path}: cannot read rows {y0}:{y1}, cols {x0}:{x1}"
                                 f"{where} ({cli.first_line(error)})") from None

    def close(self) -> None:
        self._tiff.close()
        self._close_remote_file()

    def _close_remote_file(self) -> None:
        if self._remote_file is not None:
            self._remote_file.close()


def _pixel_count(series: tifffile.TiffPageSeries) -> int:
    page = series.keyframe
    return page.imagelength * page.imagewidth


class _PageStack:
    """The pages holding one level's channels, read together as (h, w, channels)."""

    def __init__(self, path: paths.Path, pages: list[tifffile.TiffPage]):
        self.height, self.width = pages[0].imagelength, pages[0].imagewidth
        if any((page.imagelength, page.imagewidth) != (self.height, self.width)
               for page in pages):
            raise ValueError("the channel pages of a level differ in size")
        self._readers = [_MemmapPage(path, page) if page.is_memmappable
                         else _SegmentPage(page) for page in pages]
        self._sources = []             # per channel: (reader, separate sample, contig sample)
        for index, page in enumerate(pages):
            separate = page.planarconfig == 2
            self._sources += [(index, sample if separate else 0, 0 if separate else sample)
                              for sample in range(page.samplesperpixel)]
        self.num_planes = len(self._sources)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        windows = [reader.read(y0, y1, x0, x1) for reader in self._readers]
        return np.stack([windows[r][s, :, :, c] for r, s, c in self._sources], axis=-1)


def _pixel_size(tiff: tifffile.TiffFile, page: tifffile.TiffPage
                ) -> tuple[float, float] | None:
    """(y, x) micrometres per pixel from OME-XML, an Aperio (SVS) description, else
    from resolution tags in centimetres (as NDPI, SCN and microscopy software write
    them). Inch resolutions are ignored: they are what desktop software writes by
    default (72 dpi), not a scan's pixel."""
    if tiff.is_ome and tiff.ome_metadata:
        try:
            root = ElementTree.fromstring(tiff.ome_metadata)
            pixels = next(element for element in root.iter() if element.tag.endswith("}Pixels"))
            size_y, size_x = (float(pixels.attrib[f"PhysicalSize{axis}"]) * _MICROMETRES_PER_UNIT[
                pixels.attrib.get(f"PhysicalSize{axis}Unit", "\u00b5m")] for axis in "YX")
            return size_y, size_x
        except (ElementTree.ParseError, StopIteration, KeyError, ValueError):
            pass
    if tiff.is_svs:
        found = _APERIO_MPP.search(page.description)
        if found:
            try:
                return float(found[1]), float(found[1])
            except ValueError:
                pass
    if page.resolutionunit == tifffile.RESUNIT.CENTIMETER and all(page.resolution):
        per_micrometre_x, per_micrometre_y = page.get_resolution(tifffile.RESUNIT.MICROMETER)
        return 1 / per_micrometre_y, 1 / per_micrometre_x
    return None


class _SegmentError(ValueError):
    """A TIFF segment that cannot be decoded; `TiffPlanes.read` adds the file's name."""


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
                                    f"({cli.first_line(error)})") from None
            if segment is None:     # segment absent from the file: zeros
                continue
            segment = segment[0]    # drop the depth axis
            sy0, sy1 = max(y0, top), min(y1, top + segment.shape[0])
            sx0, sx1 = max(x0, left), min(x1, left + segment.shape[1])
            out[sample, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = \
                segment[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
        return out
