"""Windowed slide reading across the competition's TIFF layouts, PIL images, masks."""
import os
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from jaxseg import slides
from jaxseg.slides import downscale_area, open_mask, open_slide

HEIGHT, WIDTH = 150, 230
WINDOWS = [(0, HEIGHT, 0, WIDTH), (5, 77, 130, 229), (149, 150, 0, 1), (64, 150, 64, 230)]


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def write_separate_series(path, image):
    with tifffile.TiffWriter(path) as writer:
        for channel in range(3):
            writer.write(image[..., channel], photometric="minisblack")


LOSSLESS_LAYOUTS = {
    "hwc": lambda p, im: tifffile.imwrite(p, im, photometric="rgb"),
    "chw-planar": lambda p, im: tifffile.imwrite(p, im.transpose(2, 0, 1), photometric="rgb",
                                                 planarconfig="separate"),
    "chw-pages": lambda p, im: tifffile.imwrite(p, im.transpose(2, 0, 1),
                                                photometric="minisblack"),
    "1x1x3xhxw": lambda p, im: tifffile.imwrite(p, im.transpose(2, 0, 1)[None, None],
                                                photometric="minisblack"),
    "separate-series": write_separate_series,
    "tiled-zlib": lambda p, im: tifffile.imwrite(p, im, tile=(64, 128), photometric="rgb",
                                                 compression="zlib"),
    "tiled-planar-zlib": lambda p, im: tifffile.imwrite(
        p, im.transpose(2, 0, 1), tile=(32, 64), photometric="rgb",
        planarconfig="separate", compression="zlib"),
    "strips-zlib": lambda p, im: tifffile.imwrite(p, im, rowsperstrip=7, photometric="rgb",
                                                  compression="zlib"),
    "rgba": lambda p, im: tifffile.imwrite(
        p, np.dstack([im, np.full(im.shape[:2], 255, np.uint8)]), photometric="rgb",
        extrasamples=["unassalpha"]),
    "png": lambda p, im: Image.fromarray(im).save(p),
}


@pytest.mark.parametrize("layout", sorted(LOSSLESS_LAYOUTS))
def test_every_layout_reads_back_identical_windows(tmp_path, image, layout):
    path = tmp_path / ("slide.png" if layout == "png" else "slide.tiff")
    LOSSLESS_LAYOUTS[layout](path, image)
    with open_slide(path) as slide:
        assert (slide.height, slide.width) == (HEIGHT, WIDTH)
        for y0, y1, x0, x1 in WINDOWS:
            window = slide.read(y0, y1, x0, x1)
            assert window.dtype == np.uint8
            np.testing.assert_array_equal(window, image[y0:y1, x0:x1])


@pytest.mark.parametrize("compression, suffix", [("jpeg-tiles", ".tiff"),
                                                 ("jpeg-strips", ".tiff"),
                                                 ("jpeg-file", ".jpg")])
def test_jpeg_windows_match_the_whole_decoded_image(tmp_path, image, compression, suffix):
    path = tmp_path / f"slide{suffix}"
    if compression == "jpeg-tiles":
        tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="jpeg")
    elif compression == "jpeg-strips":
        tifffile.imwrite(path, image, rowsperstrip=16, photometric="rgb", compression="jpeg")
    else:
        Image.fromarray(image).save(path, quality=90)
    whole = (tifffile.imread(path) if suffix == ".tiff"
             else np.asarray(Image.open(path).convert("RGB")))
    with open_slide(path) as slide:
        for y0, y1, x0, x1 in WINDOWS:
            np.testing.assert_array_equal(slide.read(y0, y1, x0, x1), whole[y0:y1, x0:x1])


@pytest.mark.parametrize("suffix", [".tiff", ".png"])
def test_grey_images_are_replicated_to_rgb(tmp_path, image, suffix):
    grey = image[..., 0]
    path = tmp_path / f"grey{suffix}"
    tifffile.imwrite(path, grey) if suffix == ".tiff" else Image.fromarray(grey).save(path)
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read(0, HEIGHT, 0, WIDTH),
                                      np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("name, write", [
    ("mask.png", lambda p, m: Image.fromarray(m * 255).save(p)),
    ("mask_rgb.png", lambda p, m: Image.fromarray(np.dstack([m * 255, 0 * m, 0 * m])).save(p)),
    ("mask.tiff", lambda p, m: tifffile.imwrite(p, m)),
    ("mask_tiled.tiff", lambda p, m: tifffile.imwrite(p, m, tile=(32, 32), compression="zlib")),
])
def test_masks_are_nonzero_pixels(tmp_path, image, name, write):
    truth = (image[..., 1] > 128).astype(np.uint8)
    write(tmp_path / name, truth)
    with open_mask(tmp_path / name) as mask:
        for y0, y1, x0, x1 in WINDOWS:
            window = mask.read(y0, y1, x0, x1)
            assert window.dtype == np.bool_
            np.testing.assert_array_equal(window, truth[y0:y1, x0:x1] != 0)


def test_unreadable_tiff_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "broken.tiff"
    path.write_bytes(b"II*\x00" + b"not a tiff at all" * 20)
    with pytest.raises(ValueError, match="broken.tiff: unreadable TIFF") as error:
        open_slide(path)
    assert "\n" not in str(error.value)


def test_corrupt_tile_data_fails_when_read(tmp_path, image):
    path = tmp_path / "corrupt.tiff"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[-1]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\xff" * 16)
    with open_slide(path) as slide:
        slide.read(0, 64, 0, 64)                  # untouched tiles still read
        with pytest.raises(ValueError, match="corrupt.tiff: cannot decode TIFF segment"):
            slide.read(HEIGHT - 10, HEIGHT, WIDTH - 10, WIDTH)


@pytest.mark.parametrize("layout", ["hwc", "strips-zlib", "tiled-zlib", "chw-planar"])
def test_a_truncated_tiff_is_named_when_opened(tmp_path, image, layout):
    """A copy cut short: uncompressed pages used to fail at the first read with numpy's
    'mmap length is greater than file size', naming no file."""
    path = tmp_path / "cut.tiff"
    LOSSLESS_LAYOUTS[layout](path, image)
    os.truncate(path, os.path.getsize(path) * 2 // 3)
    with pytest.raises(ValueError, match=r"cut.tiff: unreadable TIFF \(truncated: its pixel "
                                         r"data runs to byte [\d,]+, the file ends at byte"):
        open_slide(path)


def test_a_tiff_cut_while_open_is_named_when_read(tmp_path, image):
    path = tmp_path / "shrinking.tiff"
    LOSSLESS_LAYOUTS["hwc"](path, image)
    with open_slide(path) as slide:
        os.truncate(path, 1000)
        with pytest.raises(ValueError, match="shrinking.tiff: cannot read rows 0:150, cols "
                                             "0:230 \\(mmap length"):
            slide.read(0, HEIGHT, 0, WIDTH)


def test_image_ids_drop_the_whole_image_extension():
    """The competition's train.csv names slide `aaa6a05cc.tiff` as id `aaa6a05cc`; an
    OME-TIFF `x.ome.tiff` is image `x`."""
    assert [slides.image_id(name) for name in [
        "train/aaa6a05cc.tiff", "x.ome.tiff", "x.OME.TIF", "gs://b/tiles/y.v2.png",
        "z.jpeg"]] == ["aaa6a05cc", "x", "x", "y.v2", "z"]


def _png_claiming_size(path, width, height):
    """A small PNG whose header claims another size: what a decompression bomb shows
    before its pixels are decoded."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("width, height", [(9000, 8000), (100_000, 100_000)])
def test_pictures_above_the_bound_are_refused_before_decoding(tmp_path, width, height):
    """Above the bound (four 2048 px tiles a side) and above Pillow's own hard limit."""
    path = tmp_path / "bomb.png"
    _png_claiming_size(path, width, height)
    with pytest.raises(ValueError, match="bomb.png: more than 67,108,864 pixels, the most a "
                                         "PNG/JPEG may hold here") as error:
        open_slide(path)
    assert "\n" not in str(error.value)


def test_reading_a_picture_leaves_pillows_guard_alone(tmp_path, image):
    guard = Image.MAX_IMAGE_PIXELS
    Image.fromarray(image).save(tmp_path / "tile.png")
    with open_slide(tmp_path / "tile.png") as slide:
        assert (slide.height, slide.width) == (HEIGHT, WIDTH)
    assert Image.MAX_IMAGE_PIXELS == guard is not None


def test_missing_file_and_out_of_range_windows(tmp_path, image):
    with pytest.raises(FileNotFoundError, match="nothere.tiff"):
        open_slide(tmp_path / "nothere.tiff")
    path = tmp_path / "slide.tiff"
    tifffile.imwrite(path, image, photometric="rgb")
    with open_slide(path) as slide:
        for window in [(0, HEIGHT + 1, 0, 5), (-1, 5, 0, 5), (5, 5, 0, 5), (0, 5, 10, 2)]:
            with pytest.raises(ValueError, match="outside the 150 x 230 image"):
                slide.read(*window)


def test_16_bit_slides_are_rejected(tmp_path, image):
    path = tmp_path / "deep.tiff"
    tifffile.imwrite(path, image.astype(np.uint16), photometric="rgb")
    with pytest.raises(ValueError, match="deep.tiff: pixels are uint16, expected 8-bit"):
        open_slide(path)


def test_downscale_area_hand_examples():
    pixels = np.array([[1, 2, 9, 9],
                       [3, 5, 9, 8]], np.uint8)
    # Means 2.75 and 8.75 round half up to 3 and 9.
    np.testing.assert_array_equal(downscale_area(pixels, 2), [[3, 9]])
    np.testing.assert_allclose(downscale_area(pixels.astype(np.float32), 2), [[2.75, 8.75]])
    halves = np.array([[1, 0, 1, 0],
                       [1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(downscale_area(halves, 2), [[True, False]])
    assert downscale_area(pixels, 1) is pixels


def test_downscale_area_matches_block_means(image):
    blocks = image[:150, :230].reshape(30, 5, 46, 5, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_array_equal(downscale_area(image, 5), np.floor(blocks + 0.5))
    with pytest.raises(ValueError, match="150 x 230 is not divisible by the downscale "
                                         "factor 4"):
        downscale_area(image, 4)


def test_pixel_size_from_ome_xml_or_centimetre_resolution_only(tmp_path, image):
    """Micrometres (y, x); an inch resolution is a desktop default (72 dpi), not a scan."""
    tifffile.imwrite(tmp_path / "a.ome.tiff", image, metadata={
        "PhysicalSizeX": 0.5, "PhysicalSizeY": 250, "PhysicalSizeYUnit": "nm"})
    tifffile.imwrite(tmp_path / "b.tiff", image, resolution=(20000, 10000),
                     resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "c.tiff", image, resolution=(72, 72), resolutionunit="INCH")
    Image.fromarray(image).save(tmp_path / "d.png")
    sizes = []
    for name in ["a.ome.tiff", "b.tiff", "c.tiff", "d.png"]:
        with open_slide(tmp_path / name) as slide:
            sizes.append(slide.pixel_size)
    assert sizes == [(0.25, 0.5), (1.0, 0.5), None, None]
