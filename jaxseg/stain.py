"""Stain normalisation: every slide's colours moved onto one target (Reinhard et al. 2001).

Slides stained in different labs, or scanned on different scanners, differ in colour;
a model trained on a few slides sees another lab's as unfamiliar. Reinhard's colour
transfer works in CIELAB, where the channels of natural images are nearly uncorrelated:
each channel of each pixel is moved by x' = (x - mean_source) / std_source * std_target
+ mean_target, so that the slide's per-channel mean and standard deviation become the
target's. `jaxseg.prepare --stain_normalisation=reinhard` measures every training slide,
takes the mean of their statistics as the target, normalises the tiles it writes and
records the target in prepare.json; `jaxseg.predict` (and whole-slide validation, which
predicts as it does) measures each slide it predicts and normalises every window to that
target, so that training and prediction see the same colours.

A slide's statistics are those of its tissue pixels (the HSV saturation rule of
prepare's background filter, `tissue_pixels`) at model scale, the pixels the network
sees, measured on every SAMPLE_STRIDE-th row and column of one read of the whole slide:
the same at prepare and predict, independent of how the slide is cut into windows, and
cheap to convert (a HuBMAP slide reduced 4 times is measured on about 8 M pixels). Only
tissue is measured and transformed; `normalise` says why glass is left as it is.

All of this is numpy on the host: sRGB <-> CIELAB (D65, 2-degree observer) is written
out below with the CIE's constants, the same conversion as scikit-image's (the tests pin
it there), without the dependency.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from jaxseg import cli, slides

METHODS = ("none", "reinhard")
# Statistics are measured on every this-many-th model-scale pixel of each axis.
SAMPLE_STRIDE = 4
# Model-scale pixels per side of one read: a 2048 px full-resolution window at the
# recipe's reduction, the size of the windows prepare reads.
_BLOCK = 512
# A channel whose tissue is uniform has no spread to scale; this floor (in L*a*b* units)
# keeps the scale finite.
_MIN_STD = 1e-3

# sRGB's linear RGB -> CIE XYZ, and the D65 white point (2-degree observer).
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])
# CIELAB's f(t) = cbrt(t) above DELTA**3, linear below it.
_DELTA = 6 / 29


@dataclasses.dataclass(frozen=True)
class StainStatistics:
    """Per-channel mean and standard deviation of a slide's tissue in L*, a*, b*."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, record: object, where: str) -> StainStatistics:
        """Statistics as `to_json` wrote them; `where` names the field in an error."""
        try:
            mean, std = (tuple(float(v) for v in record[key]) for key in ("mean", "std"))
        except (TypeError, KeyError, ValueError):
            mean = std = ()
        if len(mean) != 3 or len(std) != 3 or min(std, default=0) <= 0:
            raise cli.InputError(f"{where}: expected {{\"mean\": [L, a, b], \"std\": [L, a, "
                                 f"b]}} with positive stds, got {record!r}")
        return cls(mean, std)


def mean_statistics(statistics: Sequence[StainStatistics]) -> StainStatistics:
    """The target of several slides: their means and their stds averaged, so that each
    slide counts once whatever its size."""
    return StainStatistics(tuple(np.mean([s.mean for s in statistics], axis=0).tolist()),
                           tuple(np.mean([s.std for s in statistics], axis=0).tolist()))


def tissue_pixels(image: np.ndarray, saturation_threshold: int) -> np.ndarray:
    """Bool (...) of uint8 (..., 3) pixels whose OpenCV 8-bit HSV saturation exceeds the
    threshold: tissue, for prepare's background filter and for the statistics here.

    OpenCV rounds 255 * (max - min) / max half up, so `s > t` is
    510 * (max - min) >= (2t + 1) * max, which avoids a division.
    """
    high = image.max(axis=-1).astype(np.int32)
    spread = high - image.min(axis=-1)
    return (510 * spread >= (2 * saturation_threshold + 1) * high) & (spread > 0)


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """float64 (..., 3) L*a*b* of uint8 sRGB pixels (scikit-image's rgb2lab)."""
    rgb = image.astype(np.float64) / 255
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ _XYZ_FROM_RGB.T / _D65_WHITE
    f = np.where(xyz > _DELTA ** 3, np.cbrt(xyz), xyz / (3 * _DELTA ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """float64 (..., 3) sRGB in [0, 1] of L*a*b* pixels (scikit-image's lab2rgb): colours
    outside the sRGB gamut are clipped, and so is a negative Z."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, np.maximum(fy - lab[..., 2] / 200, 0)], axis=-1)
    xyz = np.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4 / 29)) * _D65_WHITE
    linear = xyz @ _RGB_FROM_XYZ.T
    rgb = np.where(linear > 0.0031308, 1.055 * np.abs(linear) ** (1 / 2.4) - 0.055,
                   12.92 * linear)
    return np.clip(rgb, 0, 1)


def image_statistics(image: np.ndarray, saturation_threshold: int) -> StainStatistics | None:
    """The statistics of an image's tissue pixels; None if it has none."""
    return _Moments().add(image, saturation_threshold).statistics()


def slide_statistics(slide: slides.Slide, reduction: int,
                     saturation_threshold: int) -> StainStatistics | None:
    """The statistics of a slide's tissue at model scale `reduction`, sampled every
    SAMPLE_STRIDE pixels over the whole slide, read block by block (so memory stays at
    one block); None if no sampled pixel is tissue."""
    height, width = slides.model_scale_shape(slide.height, slide.width, reduction)
    read = slides.scaled_reader(slide, reduction)
    moments = _Moments()
    for y in range(0, height, _BLOCK):
        for x in range(0, width, _BLOCK):
            block = read(y, min(y + _BLOCK, height), x, min(x + _BLOCK, width))
            moments.add(block[::SAMPLE_STRIDE, ::SAMPLE_STRIDE], saturation_threshold)
    return moments.statistics()


class _Moments:
    """Running count, sum and sum of squares of tissue pixels' L*a*b*."""

    def __init__(self):
        self.count = 0
        self.total = np.zeros(3)
        self.squares = np.zeros(3)

    def add(self, image: np.ndarray, saturation_threshold: int) -> _Moments:
        lab = rgb_to_lab(image[tissue_pixels(image, saturation_threshold)])
        self.count += len(lab)
        self.total += lab.sum(axis=0)
        self.squares += (lab ** 2).sum(axis=0)
        return self

    def statistics(self) -> StainStatistics | None:
        if not self.count:
            return None
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - mean ** 2, 0))
        return StainStatistics(tuple(mean.tolist()), tuple(np.maximum(std, _MIN_STD).tolist()))


def normalise(image: np.ndarray, source: StainStatistics, target: StainStatistics,
              saturation_threshold: int) -> np.ndarray:
    """uint8 (..., 3) pixels whose tissue (`tissue_pixels`) has the colour statistics
    `source` moved onto `target`; the other pixels are returned as they are.

    Reinhard transforms every pixel, but glass is not stained, and the transform of a
    slide whose tissue spreads less than the target's (a std ratio of 2-10 in a* or b*
    on slides drawn with a stain shift) tints bright glass enough that a quarter of it
    passes the saturation threshold: the network would see tissue-coloured background
    that training's glass never had. Glass stays glass this way, and black (prepare's
    zero padding beyond the slide, and predict's of a window larger than the image)
    stays black. The price is an edge where the saturation rule draws one: pale tissue
    (a lumen, Bowman's space) keeps its own colour.
    """
    tissue = tissue_pixels(image, saturation_threshold)
    lab = rgb_to_lab(image[tissue])
    scale = np.asarray(target.std) / np.asarray(source.std)
    lab = (lab - np.asarray(source.mean)) * scale + np.asarray(target.mean)
    out = image.copy()
    out[tissue] = np.floor(lab_to_rgb(lab) * 255 + 0.5).astype(np.uint8)
    return out


@dataclasses.dataclass(frozen=True)
class Transfer:
    """`normalise` of one slide onto the target, a picklable callable for prepare's
    worker processes and predict's window reader."""
    source: StainStatistics
    target: StainStatistics
    saturation_threshold: int

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return normalise(image, self.source, self.target, self.saturation_threshold)

    def reader(self, read: Callable[[int, int, int, int], np.ndarray]
               ) -> Callable[[int, int, int, int], np.ndarray]:
        """A window reader whose windows are normalised."""
        return lambda y0, y1, x0, x1: self(read(y0, y1, x0, x1))


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """What prediction needs to normalise slides as prepare normalised the training
    tiles: the target and the saturation rule the statistics were measured with."""
    target: StainStatistics
    saturation_threshold: int
    # {(slide path, reduction): its transfer}: whole-slide validation predicts the same
    # slides every epoch, and measuring one reads the whole slide.
    _transfers: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_prepare_record(cls, record: dict, where: str) -> Normalisation | None:
        """The normalisation prepare.json (`record`, read from `where`) names; None if
        its tiles were not normalised."""
        stain = record.get("stain_normalisation")
        if stain is None:
            return None
        if not isinstance(stain, dict) or stain.get("method") not in METHODS[1:]:
            raise cli.InputError(f"{where}: stain_normalisation.method must be one of "
                                 f"{', '.join(METHODS[1:])}, got {stain!r:.80}")
        try:
            threshold = int(record["thresholds"]["saturation"])
        except (TypeError, KeyError, ValueError):
            raise cli.InputError(f"{where}: stain_normalisation needs thresholds.saturation, "
                                 "the rule its statistics were measured with") from None
        return cls(StainStatistics.from_json(stain.get("target"),
                                             f"{where}: stain_normalisation.target"), threshold)

    def transfer(self, slide: slides.Slide, reduction: int) -> Transfer | None:
        """The slide's transfer onto the target at model scale `reduction`; None if it
        has no tissue pixels to measure."""
        key = (str(slide.path), reduction)
        if key not in self._transfers:
            source = slide_statistics(slide, reduction, self.saturation_threshold)
            self._transfers[key] = (None if source is None else
                                    Transfer(source, self.target, self.saturation_threshold))
        return self._transfers[key]
