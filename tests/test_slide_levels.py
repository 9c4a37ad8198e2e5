"""Pyramid levels and pixel sizes: a slide is read at the level nearest the model's scale,
never at full resolution when a level will do; single-level TIFFs predict as before."""
import sys

import numpy as np
import pytest
import tifffile

from jaxseg import openslide_slides, outputs, paths, predict, rle, slides, tiff_slides

# An SVS-like slide: 0.125 um/px at level 0, levels at 1/4 and 1/16, so the recipe's
# 2 um/px is level 2 itself. Sizes the downsamples do not divide: levels round up.
HEIGHT, WIDTH = 520, 776
MPP = 0.125
TARGET_MPP = 2.0
LEVEL_SIZES = [(HEIGHT, WIDTH), (130, 194), (33, 49)]


def _aperio(description: str) -> str:
    return f"Aperio Image Library v12.0.15\n{WIDTH}x{HEIGHT} (64x64) JPEG/RGB{description}"


def write_svs_like(path, levels, compression="jpeg"):
    """Aperio's layout: full resolution, a stripped thumbnail, then the tiled levels."""
    with tifffile.TiffWriter(path) as writer:
        tiled = {"tile": (64, 64), "compression": compression, "photometric": "rgb",
                 "metadata": None}
        writer.write(levels[0], description=_aperio(f"|AppMag = 80|MPP = {MPP}"), **tiled)
        writer.write(levels[-1][::2, ::2], photometric="rgb", metadata=None,
                     description=_aperio(""))
        for level in levels[1:]:
            writer.write(level, description=_aperio(""), **tiled)


def spoil_level_0(path):
    """Overwrites every full-resolution tile with bytes no codec decodes: any read of
    level 0 then fails, while the levels below stay intact."""
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        segments = list(zip(page.dataoffsets, page.databytecounts))
    with open(path, "r+b") as file:
        for offset, count in segments:
            file.seek(offset)
            file.write(b"\xff\x00" * (count // 2))


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """(path, decoded levels) of an SVS-like slide whose level 0 cannot be read, and
    whose levels hold unrelated pictures, so no level passes for another."""
    rng = np.random.default_rng(0)
    levels = [rng.integers(0, 256, (*size, 3), np.uint8) for size in LEVEL_SIZES]
    path = tmp_path_factory.mktemp("svs") / "pyramid.svs"
    write_svs_like(path, levels)
    with tifffile.TiffFile(path) as tiff:
        decoded = [level.asarray() for level in tiff.series[0].levels]
    spoil_level_0(path)
    return path, decoded


def test_an_svs_pyramid_is_read_at_level_2_without_reading_level_0(pyramid):
    path, levels = pyramid
    with slides.open_slide(path) as slide:
        assert slide.level_sizes == LEVEL_SIZES
        assert slide.downsamples == {1: 0, 4: 1, 16: 2}
        assert slide.pixel_size == (MPP, MPP)
        reduction = slides.reduction_for(slide, TARGET_MPP, default=4)
        assert reduction == 16 and slide.level_for(reduction) == (2, 16)
        shape = slides.model_scale_shape(HEIGHT, WIDTH, reduction)
        read = slides.scaled_reader(slide, reduction)
        np.testing.assert_array_equal(read(0, shape[0], 0, shape[1]), levels[2])
        # 1/12 is level 1 (1/4) averaged 3x3, its last rows and column repeated.
        padded = np.pad(levels[1], ((0, 2), (0, 1), (0, 0)), mode="edge")
        assert slide.level_for(12) == (1, 4)
        np.testing.assert_array_equal(slides.scaled_reader(slide, 12)(0, 44, 0, 65),
                                      slides.downscale_area(padded, 3))
        with pytest.raises(ValueError, match="pyramid.svs: cannot decode TIFF segment"):
            slide.read(0, 64, 0, 64)           # level 0 is spoilt: a read would show


def test_predict_reads_the_pyramid_slide_at_level_2(pyramid, tmp_path):
    """The whole prediction path: the slide's pixel size picks reduction 16, its level 2
    is predicted (here by a pointwise model: red above half), and the RLE is the level
    2 mask upsampled 16 times, cropped to the full-resolution size."""
    path, levels = pyramid
    options = predict.SlideOptions(tile=32, reduction=4, overlap=8, blend="center",
                                   batch_size=4, threshold=0.5, target_mpp=TARGET_MPP)
    out = tmp_path / "submission.csv"
    predict.predict_to_csv([paths.path(path)], lambda batch: batch[..., 0] / 255, options,
                           out, outputs.SlideOutputs(out_dir=paths.path(tmp_path),
                                                     kinds=("mask_tiff",)))
    expected = predict.encode_upsampled(levels[2][..., 0] > 127, 16, (HEIGHT, WIDTH))
    assert out.read_text().splitlines()[1] == f"pyramid,{expected}"
    full_mask = tifffile.imread(tmp_path / "pyramid.mask.ome.tif")
    np.testing.assert_array_equal(full_mask != 0, rle.decode(expected, (HEIGHT, WIDTH)))


def test_a_pyramid_read_through_an_open_file_gives_the_same_windows(pyramid, monkeypatch):
    """A slide in a bucket is read through an open remote file, never memory-mapped:
    the same levels and windows, segment by segment."""
    path, levels = pyramid
    monkeypatch.setattr(paths, "is_remote", lambda name: True)
    with slides.open_slide(path) as slide:
        assert slide.level_sizes == LEVEL_SIZES
        np.testing.assert_array_equal(slides.scaled_reader(slide, 16)(3, 33, 7, 49),
                                      levels[2][3:, 7:])


@pytest.mark.parametrize("layout, pixel_size", [("tiled-zlib", 0.5), ("separate-series", None)])
def test_a_single_level_tiff_predicts_exactly_as_before(tmp_path, layout, pixel_size):
    """Competition-style TIFFs (one level; with a 0.5 um/px resolution tag, or none) are
    read at 1/4 from full resolution, block means with edges repeated, as before."""
    image = np.random.default_rng(1).integers(0, 256, (203, 150, 3), np.uint8)
    path = tmp_path / "slide.tiff"
    if layout == "tiled-zlib":
        tifffile.imwrite(path, image, tile=(32, 32), compression="zlib", photometric="rgb",
                         resolution=(1e4 / pixel_size, 1e4 / pixel_size),
                         resolutionunit="CENTIMETER")
    else:
        with tifffile.TiffWriter(path) as writer:
            for channel in range(3):
                writer.write(image[..., channel], photometric="minisblack")
    padded = np.pad(image, ((0, 1), (0, 2), (0, 0)), mode="edge")
    before = slides.downscale_area(padded, 4)            # what scaled_reader gave
    options = predict.SlideOptions(tile=32, reduction=4, overlap=8, blend="center",
                                   batch_size=4, threshold=0.5, target_mpp=TARGET_MPP)
    out = tmp_path / "submission.csv"
    predict.predict_to_csv([paths.path(path)], lambda batch: batch[..., 0] / 255, options, out)
    assert out.read_text().splitlines()[1] == "slide," + predict.encode_upsampled(
        before[..., 0] > 127, 4, image.shape[:2])


def test_a_level_rounded_down_repeats_its_edge(tmp_path):
    """A level of floor(size / 2) pixels lacks the last model pixel's block: it is the
    level's last row (column) again, as full-resolution edges are."""
    rng = np.random.default_rng(2)
    full = rng.integers(0, 256, (101, 67, 3), np.uint8)
    half = rng.integers(0, 256, (50, 33, 3), np.uint8)
    path = tmp_path / "floor.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(full, tile=(32, 32), photometric="rgb", metadata=None)
        writer.write(half, tile=(32, 32), photometric="rgb", subfiletype=1, metadata=None)
    with slides.open_slide(path) as slide:
        assert slide.downsamples == {1: 0, 2: 1}
        window = slides.scaled_reader(slide, 2)(48, 51, 30, 34)
    np.testing.assert_array_equal(window, np.pad(half[48:, 30:], ((0, 1), (0, 1), (0, 0)),
                                                 mode="edge"))


def test_levels_of_other_scales_are_not_read(tmp_path):
    """A level that is not full resolution over a whole number (here 1/2.5) is skipped:
    1/5 is then read from full resolution."""
    image = np.random.default_rng(3).integers(0, 256, (100, 150, 3), np.uint8)
    path = tmp_path / "odd.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as writer:
        writer.write(image, tile=(32, 32), photometric="rgb", subifds=1)
        writer.write(image[:40, :60], tile=(32, 32), photometric="rgb", subfiletype=1)
    with slides.open_slide(path) as slide:
        assert slide.level_sizes == [(100, 150), (40, 60)]
        assert slide.downsamples == {1: 0} and slide.level_for(5) == (0, 1)
        np.testing.assert_array_equal(slides.scaled_reader(slide, 5)(0, 20, 0, 30),
                                      slides.downscale_area(image, 5))


def test_the_slide_is_the_largest_image_of_the_file(tmp_path):
    """A Leica SCN lists its macro photo before the scan: the largest image is the slide."""
    rng = np.random.default_rng(5)
    macro = rng.integers(0, 256, (30, 80, 3), np.uint8)
    scan = rng.integers(0, 256, (120, 90, 3), np.uint8)
    path = tmp_path / "macro_first.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(macro, photometric="rgb", metadata=None)
        writer.write(scan, tile=(32, 32), photometric="rgb", metadata=None)
    with slides.open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read(0, 120, 0, 90), scan)


def test_openslide_reads_a_generic_pyramidal_tiff_at_its_whole_levels(tmp_path):
    """OpenSlide (for MIRAX and the formats tifffile cannot read) offers the same levels
    and windows as tifffile on a file both read; a level at a downsample that is not a
    whole number (1001 / 500) is left out, as OpenSlide would interpolate it."""
    rng = np.random.default_rng(4)
    levels = [rng.integers(0, 256, (1001, 1536, 3), np.uint8),
              rng.integers(0, 256, (500, 768, 3), np.uint8),
              rng.integers(0, 256, (250, 384, 3), np.uint8)]
    whole = tmp_path / "generic.tif"
    with tifffile.TiffWriter(whole) as writer:
        writer.write(levels[0][:1000], tile=(256, 256), photometric="rgb", metadata=None,
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        for level in levels[1:]:
            writer.write(level, tile=(256, 256), photometric="rgb", subfiletype=1,
                         metadata=None)
    with slides.Slide(whole, openslide_slides.OpenSlidePlanes(paths.path(whole))) as slide, \
            slides.open_slide(whole) as reference:
        assert slide.level_sizes == reference.level_sizes == [(1000, 1536), (500, 768),
                                                              (250, 384)]
        assert slide.pixel_size == reference.pixel_size == (0.5, 0.5)
        for level, window in [(0, (990, 1000, 3, 300)), (1, (17, 301, 255, 700)),
                              (2, (0, 250, 0, 384))]:
            np.testing.assert_array_equal(slide.read(*window, level=level),
                                          reference.read(*window, level=level))
        np.testing.assert_array_equal(slides.scaled_reader(slide, 8)(0, 125, 0, 192),
                                      slides.downscale_area(levels[2], 2))
    odd = tmp_path / "odd.tif"
    with tifffile.TiffWriter(odd) as writer:
        writer.write(levels[0], tile=(256, 256), photometric="rgb", metadata=None)
        writer.write(levels[1], tile=(256, 256), photometric="rgb", subfiletype=1,
                     metadata=None)
    with slides.Slide(odd, openslide_slides.OpenSlidePlanes(paths.path(odd))) as slide:
        assert slide.level_sizes == [(1001, 1536)]


def test_transparent_openslide_pixels_take_the_background_colour(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32] = [200, 100, 50, 255]          # tissue; the right half is transparent
    path = tmp_path / "alpha.tif"
    tifffile.imwrite(path, rgba, tile=(32, 32), photometric="rgb",
                     extrasamples=["unassalpha"], metadata=None)
    with slides.Slide(path, openslide_slides.OpenSlidePlanes(paths.path(path))) as slide:
        window = slide.read(0, 64, 0, 64)
    np.testing.assert_array_equal(window[:, :32], np.broadcast_to([200, 100, 50], (64, 32, 3)))
    np.testing.assert_array_equal(window[:, 32:], np.full((64, 32, 3), 255))


def test_formats_needing_openslide_name_the_extra_when_it_is_missing(tmp_path, monkeypatch):
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "openslide", None)      # import fails
    with pytest.raises(ValueError, match=r"^.*slide.mrxs: reading .mrxs slides needs "
                                         r"OpenSlide: pip install 'jaxseg\[wsi\]'$"):
        slides.open_slide(path)


def test_an_unreadable_openslide_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "broken.mrxs"
    path.write_bytes(b"not a slide")
    with pytest.raises(ValueError, match="broken.mrxs: unreadable slide") as error:
        slides.open_slide(path)
    assert "\n" not in str(error.value)


def test_reductions_round_to_the_target_and_fall_back_without_a_pixel_size(tmp_path, capsys):
    image = np.zeros((40, 40, 3), np.uint8)
    found = {}
    for name, pixels_per_cm in [("aperio", 1e4 / 0.2525), ("none", None), ("tag", 1.0)]:
        path = tmp_path / f"{name}.tiff"
        tifffile.imwrite(path, image, **({} if pixels_per_cm is None else {
            "resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}))
        options = predict.SlideOptions(tile=32, reduction=4, overlap=0, blend="center",
                                       batch_size=1, threshold=0.5, target_mpp=TARGET_MPP)
        with slides.open_slide(path) as slide:
            found[name] = predict.slide_reduction(slide, options, said := set())
            found[name + " again"] = predict.slide_reduction(slide, options, said)
    # 0.2525 um/px: 2.0 / 0.2525 = 7.92, read at 1/8 (2.02 um/px, within 3%); a slide
    # without a pixel size, or with a tag no microscope writes (1 px/cm), at --reduction.
    assert found == {"aperio": 8, "aperio again": 8, "none": 4, "none again": 4,
                     "tag": 4, "tag again": 4}
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"note: {tmp_path / name}.tiff records no pixel size: it and other "
                     "slides without one are read at 1/4 (--reduction)"
                     for name in ["none", "tag"]]
    with slides.open_slide(tmp_path / "aperio.tiff") as slide:
        predict.slide_reduction(slide, predict.SlideOptions(
            tile=32, reduction=4, overlap=0, blend="center", batch_size=1, threshold=0.5,
            target_mpp=1.4), set())
    assert capsys.readouterr().err == (
        f"note: {tmp_path / 'aperio.tiff'}: 0.2525 \u00b5m/px, read at 1/6: 1.515 \u00b5m/px, "
        "the nearest whole reduction to 1.4 \u00b5m/px\n")


def test_slide_formats_and_ids():
    assert slides.image_id("a/x.svs") == "x" and slides.image_id("y.mrxs") == "y"
    assert {".svs", ".ndpi", ".scn", ".mrxs"} <= set(slides.SLIDE_SUFFIXES)
    assert not set(tiff_slides.SUFFIXES) & set(openslide_slides.SUFFIXES)
