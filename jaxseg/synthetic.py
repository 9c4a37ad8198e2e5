"""Synthetic kidney slides in the HuBMAP competition layout, for demos and tests.

    python -m jaxseg.synthetic --out_dir=/tmp/hubmap_synth

writes `train/<id>.tiff`, `train.csv` (id,encoding), `test/<id>.tiff`,
`test_truth.csv` (the test masks, same form as train.csv) and `sample_submission.csv`
(id,predicted). Slides cycle through the TIFF layouts the competition's files use
(see LAYOUTS), so every reader path is exercised.

What a slide shows, and why: bright low-saturation glass around a ragged tissue
section (so the background filter has something to drop); pink PAS-like stroma
packed with tubules (epithelial ring, brush border, pale lumen); glomeruli, the
target: lobulated purple tufts with dense nuclei inside a bright Bowman's space ring
and a thin capsule (the mask covers the capsule and everything inside); and
distractors, arterioles of exactly the tuft's colour and texture but with the bright
lumen inside the wall instead of around it, often elongated. Colour alone therefore
cannot separate glomeruli from arterioles: a model must use the arrangement.

Everything is a deterministic function of the seed and of absolute pixel position
(hashed white noise, sinusoid fields), so a slide renders identically window by
window: large slides are written tile by tile without ever holding the image as float.

Slides from different labs and scanners differ in stain colour; `--stain_spread` gives
each slide its own stain (see `draw_stain`) and `--test_stain_shift` moves the test
slides' stain away from the training slides', so that robustness to stain can be
measured. Both leave the layout and the masks as they are.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tifffile
from absl import flags
from scipy import ndimage
from tqdm import tqdm

from jaxseg import cli, rle

# (H, W, 3) strips; (3, H, W) one planar-separate page; (1, 1, 3, H, W) three pages;
# three single-channel series; (H, W, 3) in 256-px JPEG-compressed tiles (quality 90).
LAYOUTS = ("hwc", "chw", "1x1x3xhxw", "pages", "tiled-jpeg")

_TIFF_TILE = 256
_RENDER_WINDOW = 1024

# Region labels painted per pixel, then coloured through _COLOURS.
_GLASS, _STROMA, _EPITHELIUM, _LUMEN, _BRUSH_BORDER = 0, 1, 2, 3, 4
_TUFT, _BOWMAN_SPACE, _CAPSULE, _VESSEL_WALL, _VESSEL_LUMEN = 5, 6, 7, 8, 9
_COLOURS = np.array([
    (239, 237, 242),   # glass: bright, saturation ~5 of 255
    (226, 186, 212),   # stroma
    (206, 136, 184),   # tubule epithelium
    (240, 222, 236),   # tubule lumen
    (178, 82, 156),    # PAS-positive brush border
    (168, 92, 166),    # glomerular tuft
    (244, 232, 242),   # Bowman's space
    (196, 120, 178),   # Bowman's capsule
    (168, 92, 166),    # arteriole wall: the tuft's colour on purpose
    (244, 232, 242),   # arteriole lumen: Bowman's space colour on purpose
], np.float32)
_NUCLEUS_COLOUR = np.array((92, 62, 142), np.float32)
# Nuclei appear where normalised blurred noise exceeds this (inf: never).
_NUCLEUS_THRESHOLD = np.array([np.inf, 2.6, 2.0, np.inf, np.inf, 1.2, np.inf, 2.4, 1.3,
                               np.inf], np.float32)
# Tuft and arteriole wall share a mottled, lobulated texture.
_MOTTLED = np.zeros(len(_COLOURS), bool)
_MOTTLED[[_TUFT, _VESSEL_WALL]] = True
_NUCLEUS_SIGMA = 2.5
_MOTTLE_SIGMA = 4.0
Stain = tuple[float, float, float]
NO_STAIN: Stain = (1.0, 1.0, 1.0)
# Mixed into a slide's seed for its stain draw, so that the layout's draws stay as they are.
_STAIN_SALT = 0x57A1


@dataclass(frozen=True)
class Ellipses:
    """Tubules or arterioles: centre, semi-axes (a >= b), angle, lumen radius fraction."""
    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray
    b: np.ndarray
    angle: np.ndarray
    lumen: np.ndarray


@dataclass(frozen=True)
class Glomeruli:
    """Capsule radius r(t) = radius * (1 + sum_k amp_k cos(k t + phase_k)), k = 2, 3."""
    cy: np.ndarray
    cx: np.ndarray
    radius: np.ndarray
    amp: np.ndarray         # (n, 2)
    phase: np.ndarray       # (n, 2)
    tuft: np.ndarray        # tuft radius as a fraction of the capsule radius


@dataclass(frozen=True)
class Scene:
    height: int
    width: int
    seed: int
    tissue_waves: np.ndarray    # (k, 4): fy, fx, phase, amplitude
    stain_waves: np.ndarray
    tint: np.ndarray            # (3,) per-slide stain intensity per channel
    tubules: Ellipses
    vessels: Ellipses
    glomeruli: Glomeruli
    stain: Stain = NO_STAIN     # factor on each channel's optical density (`render`)


def make_scene(height: int, width: int, seed: int, glomeruli_per_mpx: float = 3.5,
               radius: tuple[float, float] = (60, 110), stain: Stain = NO_STAIN) -> Scene:
    """Random layout of one slide; object sizes scale with `radius` (full-res px).

    `stain` changes colours only: the layout, and so the mask, follows from the seed.
    """
    rng = np.random.default_rng(seed)
    scale = min(height, width)
    tissue_waves = _random_waves(rng, 8, scale / 1.2, scale / 3.0, amplitude=0.35)
    stain_waves = _random_waves(rng, 3, scale / 1.5, scale / 4.0, amplitude=0.5)
    tint = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    bare = Scene(height, width, seed, tissue_waves, stain_waves, tint,
                 _no_ellipses(), _no_ellipses(), _no_glomeruli())
    mean_radius = (radius[0] + radius[1]) / 2
    count = int(rng.poisson(glomeruli_per_mpx * height * width / 1e6))
    vessel_count = round(0.7 * count)
    occupied = _Discs(count + vessel_count)
    glomeruli = _place_glomeruli(rng, bare, count, radius, occupied)
    vessels = _place_vessels(rng, bare, vessel_count, mean_radius, occupied)
    tubules = _place_tubules(rng, bare, tubule_size=0.4 * mean_radius)
    return Scene(height, width, seed, tissue_waves, stain_waves, tint, tubules, vessels,
                 glomeruli, tuple(float(f) for f in stain))


def draw_stain(seed: int, spread: float, shift: Sequence[float] = NO_STAIN) -> Stain:
    """A slide's optical-density factors: `shift` times uniform(1 - spread, 1 + spread)
    per channel, a function of the slide's seed alone.

    A factor scales how much light a channel's dyes absorb, the way more or less
    haematoxylin or eosin, or another scanner's filters, change a slide.
    """
    _check_stain(spread, shift)
    if spread == 0:
        return tuple(float(f) for f in shift)
    rng = np.random.default_rng([seed, _STAIN_SALT])
    return tuple(float(f) for f in np.asarray(shift) * rng.uniform(1 - spread, 1 + spread, 3))


def _check_stain(spread: float, shift: Sequence[float]) -> None:
    if not 0 <= spread < 1:
        raise cli.InputError(f"stain_spread must be in [0, 1), got {spread}")
    if len(shift) != 3 or not all(f > 0 for f in shift):
        raise cli.InputError(f"test_stain_shift must be 3 positive factors, got {list(shift)}")


def render(scene: Scene, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """uint8 (h, w, 3) window [y0, y1) x [x0, x1), identical however it is tiled."""
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    labels = np.where(_tissue_field(scene, ys, xs) > 0, _STROMA, _GLASS).astype(np.uint8)
    _paint_tubules(scene.tubules, labels, y0, x0)
    _paint_vessels(scene.vessels, labels, y0, x0)
    for index in _overlapping(scene.glomeruli, y0, y1, x0, x1):
        box, rho, tuft = _glomerulus_geometry(scene.glomeruli, index, y0, y1, x0, x1)
        region = labels[box]
        region[rho <= 1] = _CAPSULE
        region[rho < 0.95] = _BOWMAN_SPACE
        region[tuft] = _TUFT

    colour = _COLOURS[labels]
    white, nuclei = _blurred_noise(scene.seed, y0, y1, x0, x1, _NUCLEUS_SIGMA, salt=1)
    _, mottle = _blurred_noise(scene.seed, y0, y1, x0, x1, _MOTTLE_SIGMA, salt=2)
    mottled = _MOTTLED[labels]
    # Lobulation: darker and lighter patches, with pale capillary loops.
    colour[mottled] *= (1 + 0.10 * mottle[mottled])[:, None]
    loops = mottled & (mottle > 1.1)
    colour[loops] = 0.5 * colour[loops] + 0.5 * _COLOURS[_BOWMAN_SPACE]
    is_nucleus = nuclei > _NUCLEUS_THRESHOLD[labels]
    colour[is_nucleus] = 0.25 * colour[is_nucleus] + 0.75 * _NUCLEUS_COLOUR
    tissue = labels != _GLASS
    stain = 1 + 0.12 * _wave_sum(scene.stain_waves, ys, xs)
    stain = np.broadcast_to(stain, labels.shape)[tissue][:, None] * scene.tint
    colour[tissue] = 255 - (255 - colour[tissue]) * stain
    colour += (white[..., None] - 0.5) * 8
    if scene.stain != NO_STAIN:
        colour = _stained(colour, scene.stain)
    return np.clip(colour + 0.5, 0, 255).astype(np.uint8)


def _stained(colour: np.ndarray, stain: Stain) -> np.ndarray:
    """Each channel's optical density -log(I / 255) times its factor: dense (dark)
    pixels change most, nearly transparent glass barely."""
    intensity = np.clip(colour, 1, 255) / np.float32(255)
    return 255 * intensity ** np.asarray(stain, np.float32)


def glomerulus_mask(scene: Scene) -> np.ndarray:
    """Bool (H, W) truth: capsule and everything inside it, as `render` paints it."""
    mask = np.zeros((scene.height, scene.width), bool)
    for index in range(len(scene.glomeruli.cy)):
        box, rho, _ = _glomerulus_geometry(scene.glomeruli, index, 0, scene.height, 0,
                                           scene.width)
        mask[box] |= rho <= 1
    return mask


def write_slide(path: str | Path, scene: Scene, layout: str) -> None:
    """Writes the scene as a TIFF in one of LAYOUTS.

    tiled-jpeg streams tiles from row bands of the rendering, so its memory stays
    at one band whatever the slide size; the other layouts hold the uint8 image.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}, expected one of {', '.join(LAYOUTS)}")
    shape = (scene.height, scene.width, 3)
    if layout == "tiled-jpeg":
        tifffile.imwrite(path, _tiles(scene), shape=shape, dtype=np.uint8,
                         tile=(_TIFF_TILE, _TIFF_TILE), photometric="rgb",
                         compression="jpeg", compressionargs={"level": 90})
        return
    image = np.empty(shape, np.uint8)
    for y0 in range(0, scene.height, _RENDER_WINDOW):
        for x0 in range(0, scene.width, _RENDER_WINDOW):
            y1 = min(scene.height, y0 + _RENDER_WINDOW)
            x1 = min(scene.width, x0 + _RENDER_WINDOW)
            image[y0:y1, x0:x1] = render(scene, y0, y1, x0, x1)
    if layout == "hwc":
        tifffile.imwrite(path, image, photometric="rgb")
    elif layout == "chw":
        tifffile.imwrite(path, image.transpose(2, 0, 1), photometric="rgb",
                         planarconfig="separate")
    elif layout == "1x1x3xhxw":
        tifffile.imwrite(path, image.transpose(2, 0, 1)[None, None],
                         photometric="minisblack")
    else:
        with tifffile.TiffWriter(path) as writer:
            for channel in range(3):
                writer.write(image[..., channel], photometric="minisblack")


def make_dataset(out_dir: str | Path, num_train: int = 6, num_test: int = 2,
                 height: int = 3000, width: int = 3000, seed: int = 0,
                 glomeruli_per_mpx: float = 3.5,
                 radius: tuple[float, float] = (60, 110), stain_spread: float = 0.0,
                 test_stain_shift: Sequence[float] = NO_STAIN) -> dict:
    """Writes a competition-layout dataset; returns {split: {id: {layout, glomeruli,
    stain}}}.

    Every slide's stain is drawn with `stain_spread` (`draw_stain`); the test slides'
    is also multiplied by `test_stain_shift`, as slides from another lab would be.
    """
    _check_stain(stain_spread, test_stain_shift)
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    ids = []
    while len(ids) < num_train + num_test:
        slide_id = f"{int(rng.integers(16 ** 9)):09x}"
        if slide_id not in ids:
            ids.append(slide_id)
    splits = {"train": ids[:num_train], "test": ids[num_train:]}
    summary = {"train": {}, "test": {}}
    encodings = {"train": [], "test": []}
    slide_seeds = rng.integers(2 ** 31, size=len(ids))
    jobs = [(split, slide_id) for split in ("train", "test") for slide_id in splits[split]]
    for number, (split, slide_id) in enumerate(tqdm(jobs, desc="synthetic slides")):
        seed = int(slide_seeds[number])
        stain = draw_stain(seed, stain_spread,
                           test_stain_shift if split == "test" else NO_STAIN)
        scene = make_scene(height, width, seed, glomeruli_per_mpx, radius, stain)
        layout = LAYOUTS[number % len(LAYOUTS)]
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        write_slide(out_dir / split / f"{slide_id}.tiff", scene, layout)
        encodings[split].append((slide_id, rle.encode(glomerulus_mask(scene))))
        summary[split][slide_id] = {"layout": layout,
                                    "glomeruli": len(scene.glomeruli.cy), "stain": stain}
    _write_csv(out_dir / "train.csv", ("id", "encoding"), encodings["train"])
    _write_csv(out_dir / "test_truth.csv", ("id", "encoding"), encodings["test"])
    _write_csv(out_dir / "sample_submission.csv", ("id", "predicted"),
               [(slide_id, "") for slide_id in splits["test"]])
    return summary


def _write_csv(path: Path, header: tuple[str, str], rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


# --- geometry -----------------------------------------------------------------------

def _random_waves(rng: np.random.Generator, count: int, longest: float, shortest: float,
                  amplitude: float) -> np.ndarray:
    wavelength = rng.uniform(shortest, longest, count)
    direction = rng.uniform(0, 2 * np.pi, count)
    return np.stack([np.sin(direction) / wavelength, np.cos(direction) / wavelength,
                     rng.uniform(0, 2 * np.pi, count),
                     np.full(count, amplitude * math.sqrt(2 / count))], axis=1)


def _wave_sum(waves: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sum of plane waves; sin(a + b) = sin a cos b + cos a sin b keeps the per-pixel
    work to products of row and column factors when ys and xs are a column and a row."""
    total = np.zeros(np.broadcast_shapes(ys.shape, xs.shape), np.float32)
    two_pi = np.float32(2 * np.pi)
    for fy, fx, phase, amplitude in waves.astype(np.float32):
        along_y = two_pi * fy * ys + phase
        along_x = two_pi * fx * xs
        total += (amplitude * np.sin(along_y)) * np.cos(along_x)
        total += (amplitude * np.cos(along_y)) * np.sin(along_x)
    return total


def _tissue_field(scene: Scene, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Positive on tissue: a ragged section centred on the slide, glass at the corners."""
    dy = (ys - scene.height / 2) / (0.5 * scene.height)
    dx = (xs - scene.width / 2) / (0.5 * scene.width)
    return _wave_sum(scene.tissue_waves, ys, xs) + 0.75 - 0.9 * (dy * dy + dx * dx)


def _inside_tissue(scene: Scene, cy: float, cx: float, reach: float) -> bool:
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ys = np.append(cy + reach * np.sin(angles), cy).astype(np.float32)
    xs = np.append(cx + reach * np.cos(angles), cx).astype(np.float32)
    inside_slide = (ys.min() >= 0 and xs.min() >= 0 and ys.max() < scene.height
                    and xs.max() < scene.width)
    return inside_slide and bool((_tissue_field(scene, ys, xs) > 0.05).all())


class _Discs:
    """Space already taken by glomeruli and arterioles, so that none overlap."""

    def __init__(self, capacity: int):
        self._discs = np.empty((capacity, 3))
        self._count = 0

    def collides(self, cy: float, cx: float, reach: float) -> bool:
        taken = self._discs[:self._count]
        distance = np.hypot(taken[:, 0] - cy, taken[:, 1] - cx)
        return bool((distance < taken[:, 2] + reach + 10).any())

    def add(self, cy: float, cx: float, reach: float) -> None:
        self._discs[self._count] = cy, cx, reach
        self._count += 1


def _place_glomeruli(rng: np.random.Generator, scene: Scene, count: int,
                     radius: tuple[float, float], occupied: _Discs) -> Glomeruli:
    """Rejection sampling inside tissue, apart from each other."""
    rows = []
    for _ in range(60 * count):
        if len(rows) == count:
            break
        r = rng.uniform(*radius)
        cy, cx = rng.uniform(0, scene.height), rng.uniform(0, scene.width)
        reach = 1.15 * r
        if not _inside_tissue(scene, cy, cx, reach) or occupied.collides(cy, cx, reach):
            continue
        occupied.add(cy, cx, reach)
        rows.append((cy, cx, r, *rng.uniform(0, 0.06, 2), *rng.uniform(0, 2 * np.pi, 2),
                     rng.uniform(0.72, 0.84)))
    table = np.array(rows, np.float32).reshape(-1, 8)
    return Glomeruli(table[:, 0], table[:, 1], table[:, 2], table[:, 3:5], table[:, 5:7],
                     table[:, 7])


def _place_vessels(rng: np.random.Generator, scene: Scene, count: int, size: float,
                   occupied: _Discs) -> Ellipses:
    rows = []
    for _ in range(60 * count):
        if len(rows) == count:
            break
        b = rng.uniform(0.5, 0.9) * size
        a = b * rng.uniform(1.0, 3.5)
        cy, cx = rng.uniform(0, scene.height), rng.uniform(0, scene.width)
        if not _inside_tissue(scene, cy, cx, a) or occupied.collides(cy, cx, a):
            continue
        occupied.add(cy, cx, a)
        rows.append((cy, cx, a, b, rng.uniform(0, np.pi), rng.uniform(0.3, 0.55)))
    return _ellipses(rows)


def _place_tubules(rng: np.random.Generator, scene: Scene, tubule_size: float) -> Ellipses:
    """A jittered grid packs tubules like cortex; those off tissue are dropped later."""
    spacing = 2.6 * tubule_size
    grid_y = np.arange(spacing / 2, scene.height, spacing)
    grid_x = np.arange(spacing / 2, scene.width, spacing)
    cy, cx = (g.ravel() for g in np.meshgrid(grid_y, grid_x, indexing="ij"))
    cy = cy + rng.uniform(-0.25, 0.25, cy.shape) * spacing
    cx = cx + rng.uniform(-0.25, 0.25, cx.shape) * spacing
    b = rng.uniform(0.7, 1.0, cy.shape) * tubule_size
    a = b * rng.uniform(1.0, 1.6, cy.shape)
    angle = rng.uniform(0, np.pi, cy.shape)
    lumen = rng.uniform(0.35, 0.6, cy.shape)
    return _ellipses(list(zip(cy, cx, a, b, angle, lumen)))


def _ellipses(rows: list) -> Ellipses:
    table = np.array(rows, np.float32).reshape(-1, 6)
    return Ellipses(*(table[:, i] for i in range(6)))


def _no_ellipses() -> Ellipses:
    return _ellipses([])


def _no_glomeruli() -> Glomeruli:
    empty = np.zeros(0, np.float32)
    return Glomeruli(empty, empty, empty, np.zeros((0, 2), np.float32),
                     np.zeros((0, 2), np.float32), empty)


def _overlapping(shapes: Ellipses | Glomeruli, y0: int, y1: int, x0: int,
                 x1: int) -> np.ndarray:
    """Indices of shapes whose bounding square meets the window."""
    reach = shapes.a if isinstance(shapes, Ellipses) else 1.15 * shapes.radius
    hits = ((shapes.cy + reach >= y0) & (shapes.cy - reach < y1)
            & (shapes.cx + reach >= x0) & (shapes.cx - reach < x1))
    return np.flatnonzero(hits)


def _local_grid(cy: float, cx: float, reach: float, y0: int, y1: int, x0: int, x1: int):
    """Window-relative slices of the shape's box and pixel offsets from its centre."""
    top, bottom = max(y0, int(cy - reach)), min(y1, int(cy + reach) + 2)
    left, right = max(x0, int(cx - reach)), min(x1, int(cx + reach) + 2)
    box = (slice(top - y0, max(top, bottom) - y0), slice(left - x0, max(left, right) - x0))
    dy = np.arange(top, max(top, bottom), dtype=np.float32)[:, None] - cy
    dx = np.arange(left, max(left, right), dtype=np.float32)[None, :] - cx
    return box, dy, dx


def _ellipse_rho(shapes: Ellipses, index: int, y0: int, y1: int, x0: int, x1: int):
    box, dy, dx = _local_grid(shapes.cy[index], shapes.cx[index], shapes.a[index],
                              y0, y1, x0, x1)
    cos, sin = np.cos(shapes.angle[index]), np.sin(shapes.angle[index])
    u = (dx * cos + dy * sin) / shapes.a[index]
    v = (dy * cos - dx * sin) / shapes.b[index]
    return box, np.sqrt(u * u + v * v)


def _glomerulus_geometry(shapes: Glomeruli, index: int, y0: int, y1: int, x0: int, x1: int):
    """Box, radial coordinate (1 on the capsule) and tuft pixels of one glomerulus."""
    radius = shapes.radius[index]
    box, dy, dx = _local_grid(shapes.cy[index], shapes.cx[index], 1.15 * radius,
                              y0, y1, x0, x1)
    theta = np.arctan2(dy, dx)
    amp, phase = shapes.amp[index], shapes.phase[index]
    outline = radius * (1 + amp[0] * np.cos(2 * theta + phase[0])
                        + amp[1] * np.cos(3 * theta + phase[1]))
    rho = np.sqrt(dy * dy + dx * dx) / outline
    # The tuft is lobulated: five bumps, independent of the capsule's shape.
    tuft = rho < shapes.tuft[index] * (1 + 0.05 * np.cos(5 * theta + phase[0]))
    return box, rho, tuft


def _paint_tubules(tubules: Ellipses, labels: np.ndarray, y0: int, x0: int) -> None:
    y1, x1 = y0 + labels.shape[0], x0 + labels.shape[1]
    for index in _overlapping(tubules, y0, y1, x0, x1):
        box, rho = _ellipse_rho(tubules, index, y0, y1, x0, x1)
        region = labels[box]
        on_tissue = region != _GLASS
        lumen = tubules.lumen[index]
        region[on_tissue & (rho < 1)] = _EPITHELIUM
        region[on_tissue & (rho < lumen + 0.1)] = _BRUSH_BORDER
        region[on_tissue & (rho < lumen)] = _LUMEN


def _paint_vessels(vessels: Ellipses, labels: np.ndarray, y0: int, x0: int) -> None:
    y1, x1 = y0 + labels.shape[0], x0 + labels.shape[1]
    for index in _overlapping(vessels, y0, y1, x0, x1):
        box, rho = _ellipse_rho(vessels, index, y0, y1, x0, x1)
        region = labels[box]
        region[rho < 1] = _VESSEL_WALL
        region[rho < vessels.lumen[index]] = _VESSEL_LUMEN


# --- texture ------------------------------------------------------------------------

def _hash_uniform(seed: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) noise as a pure function of absolute pixel position."""
    with np.errstate(over="ignore"):
        h = (ys.astype(np.uint32) * np.uint32(0x9E3779B1)
             ^ xs.astype(np.uint32) * np.uint32(0x85EBCA77)
             ^ np.uint32(seed * 0xC2B2AE3D & 0xFFFFFFFF))
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x7FEB352D)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x846CA68B)
        h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def _blurred_noise(seed: int, y0: int, y1: int, x0: int, x1: int, sigma: float,
                   salt: int) -> tuple[np.ndarray, np.ndarray]:
    """White noise of the window and its Gaussian blur normalised to unit variance.

    The blur is computed on a margin wide enough that the result does not depend on
    where the window starts.
    """
    margin = int(4 * sigma + 0.5) + 1
    ys = np.arange(y0 - margin, y1 + margin)[:, None] + (1 << 20)
    xs = np.arange(x0 - margin, x1 + margin)[None, :] + (1 << 20)
    white = _hash_uniform(seed * 7919 + salt, ys, xs)
    blurred = ndimage.gaussian_filter(white, sigma, mode="nearest")
    inner = (slice(margin, -margin), slice(margin, -margin))
    return white[inner], (blurred[inner] - 0.5) / _blur_std(sigma)


def _blur_std(sigma: float) -> float:
    """Standard deviation of uniform noise after the 2-D Gaussian blur (scipy's kernel)."""
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    return float(math.sqrt(1 / 12) * (kernel ** 2).sum())


def _tiles(scene: Scene) -> Iterator[np.ndarray]:
    """TIFF tiles in row-major order, rendered one band of tile rows at a time."""
    rows_per_band = max(1, _RENDER_WINDOW // _TIFF_TILE)
    band_height = rows_per_band * _TIFF_TILE
    padded_width = -(-scene.width // _TIFF_TILE) * _TIFF_TILE
    for band_y in range(0, scene.height, band_height):
        band = np.zeros((band_height, padded_width, 3), np.uint8)
        bottom = min(scene.height, band_y + band_height)
        for x0 in range(0, scene.width, _RENDER_WINDOW):
            x1 = min(scene.width, x0 + _RENDER_WINDOW)
            band[:bottom - band_y, x0:x1] = render(scene, band_y, bottom, x0, x1)
        for ty in range(0, min(band_height, bottom - band_y), _TIFF_TILE):
            for tx in range(0, padded_width, _TIFF_TILE):
                yield band[ty:ty + _TIFF_TILE, tx:tx + _TIFF_TILE]


def define_flags() -> None:
    flags.DEFINE_string("out_dir", None, "Directory to write the dataset into.")
    flags.DEFINE_integer("num_train", 6, "Training slides (train/, train.csv).")
    flags.DEFINE_integer("num_test", 2, "Test slides (test/, test_truth.csv).")
    flags.DEFINE_integer("height", 3000, "Slide height, full-resolution pixels.")
    flags.DEFINE_integer("width", 3000, "Slide width, full-resolution pixels.")
    flags.DEFINE_integer("seed", 0, "Everything written is a function of this seed.")
    flags.DEFINE_float("glomeruli_per_mpx", 3.5, "Mean glomeruli per million slide pixels "
                       "(Poisson; fewer when the tissue has no room left).")
    flags.DEFINE_float("min_radius", 60, "Smallest glomerulus radius, full-res pixels.")
    flags.DEFINE_float("max_radius", 110, "Largest glomerulus radius, full-res pixels.")
    flags.DEFINE_float("stain_spread", 0.0, "Each slide's optical density per channel is "
                       "scaled by a factor uniform in 1 +- this (0.1: +-10%); 0: one stain.")
    flags.DEFINE_list("test_stain_shift", ["1", "1", "1"], "Three factors (R,G,B) on the "
                      "test slides' optical density on top of their drawn stain, as slides "
                      "from another lab: e.g. 1.1,0.9,1.")


def main() -> None:
    options = flags.FLAGS
    if not options.out_dir:
        raise cli.InputError("--out_dir is required")
    try:
        shift = [float(f) for f in options.test_stain_shift]
    except ValueError:
        raise cli.InputError(f"--test_stain_shift must be 3 numbers, got "
                             f"{','.join(options.test_stain_shift)}") from None
    summary = make_dataset(options.out_dir, options.num_train, options.num_test,
                           options.height, options.width, options.seed,
                           options.glomeruli_per_mpx, (options.min_radius, options.max_radius),
                           options.stain_spread, shift)
    for split, slides in summary.items():
        for slide_id, info in slides.items():
            stain = info["stain"]
            described = "" if stain == NO_STAIN else ", stain " + ",".join(
                f"{f:.3f}" for f in stain)
            print(f"{split}/{slide_id}.tiff: {info['layout']}, "
                  f"{info['glomeruli']} glomeruli{described}")


def run() -> None:
    """Where `python -m jaxseg.synthetic` starts (a console script would call it too)."""
    define_flags()
    cli.run_main(main)


if __name__ == "__main__":
    run()
