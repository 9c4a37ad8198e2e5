"""Per-slide outputs: polygons rasterised back equal the mask, one valid polygon per
connected component (scipy's count), QuPath's GeoJSON, a pyramidal OME-TIFF read back
by tifffile, statistics against hand counts, TP/FP/FN overlays, and predict writing them
all and skipping finished slides on a rerun."""
import csv
import json
import types

import numpy as np
import pytest
import shapely
import shapely.geometry
import tifffile
from PIL import Image
from rasterio import features
from scipy import ndimage

from jaxseg import cli, outputs, predict, rle, slides
from test_predict import images, options  # noqa: F401  (a pytest fixture, reused)


def components_of(mask):
    """4-connected components, numbered from 1 (scipy's default structure is the cross)."""
    return ndimage.label(mask)[0]


def upsample(mask, factor, shape):
    return np.repeat(np.repeat(mask, factor, 0), factor, 1)[:shape[0], :shape[1]]


def rasterised(glomeruli, shape):
    return features.rasterize([(glomerulus.polygon, 1) for glomerulus in glomeruli],
                              out_shape=shape, dtype=np.uint8).astype(bool)


def dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def awkward_mask():
    """Model-scale (20, 17) mask: a ring with a hole, a hole touching another at a corner,
    squares sharing an edge (one object) and meeting at a corner (two), objects on every
    border (the right and bottom ones cropped by a slide size 3 does not divide)."""
    mask = np.zeros((20, 17), bool)
    mask[2:9, 2:9] = True
    mask[4:6, 4:6] = False               # a hole
    mask[6, 6] = False                   # a second hole, touching the first at a corner
    mask[11:13, 2:4] = mask[11:13, 4:6] = True      # touching along an edge: one object
    mask[14:16, 2:4] = mask[16:18, 4:6] = True      # touching at a corner: two objects
    mask[0:3, 12:17] = True              # top and right borders
    mask[17:20, 10:17] = True            # bottom-right corner
    mask[9:11, 0] = True                 # left border
    return mask


def test_polygons_rasterise_back_to_the_mask_one_valid_polygon_per_component():
    mask, reduction, shape = awkward_mask(), 3, (58, 50)   # cropped: 60 x 51 at full size
    components = components_of(mask)
    probabilities = (components * 20).astype(np.uint8)
    glomeruli = outputs.find_glomeruli(mask, probabilities, reduction, shape)
    assert len(glomeruli) == components.max() == 7
    assert all(isinstance(g.polygon, shapely.Polygon) and g.polygon.is_valid for g in glomeruli)
    assert sorted(len(g.polygon.interiors) for g in glomeruli) == [0] * 6 + [2]
    full = upsample(mask, reduction, shape)
    back = rasterised(glomeruli, shape)
    assert dice(back, full) >= 0.99
    np.testing.assert_array_equal(back, full)    # exactly, with pixel-corner outlines
    assert sum(g.polygon.area for g in glomeruli) == np.count_nonzero(full)
    for glomerulus in glomeruli:
        x, y = glomerulus.polygon.representative_point().coords[0]
        number = components[int(y) // reduction, int(x) // reduction]
        assert glomerulus.model_pixels == np.count_nonzero(components == number)
        assert glomerulus.probability == pytest.approx(number * 20 / 255)


def test_geojson_is_what_qupath_imports(tmp_path):
    mask = awkward_mask()
    glomeruli = outputs.find_glomeruli(mask, np.full(mask.shape, 200, np.uint8), 2, (40, 34))
    outputs.write_geojson(tmp_path / "a.geojson", glomeruli)
    collection = json.loads((tmp_path / "a.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == components_of(mask).max()
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        assert shapely.geometry.shape(feature["geometry"]).is_valid
        properties = feature["properties"]
        assert properties["objectType"] == "annotation"
        assert properties["classification"]["name"] == "glomerulus"
        assert properties["probability"] == properties["measurements"]["probability"] == \
            round(200 / 255, 4)


def test_mask_tiff_is_a_tiled_compressed_pyramid_equal_to_the_mask(tmp_path):
    mask, reduction, shape = awkward_mask(), 3, (58, 50)
    path = tmp_path / "a.mask.ome.tif"
    outputs.write_mask_tiff(path, mask, reduction, shape, pixel_size=(0.5, 0.25), tile=16)
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_ome and 'PhysicalSizeX="0.25"' in tiff.ome_metadata
        levels = tiff.series[0].levels
        assert [level.shape for level in levels] == [(58, 50), (29, 25), (15, 13)]
        page = tiff.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (16, 16)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        np.testing.assert_array_equal(levels[0].asarray(), upsample(mask, reduction, shape) * 255)
        full = upsample(mask, reduction, shape)
        np.testing.assert_array_equal(levels[1].asarray(), full[1::2, 1::2] * 255)
    with slides.open_mask(path) as reread:   # jaxseg's own reader sees the full level
        np.testing.assert_array_equal(reread.read(0, 58, 0, 50), full)
        assert reread.pixel_size == (0.5, 0.25)


def test_stats_row_against_hand_counts(tmp_path):
    mask = np.zeros((6, 8), bool)
    mask[0:3, 0:4] = True                        # 12 model pixels, 48 at full size
    mask[4:6, 6:8] = True                        # 4 model pixels, cropped to 2 x 1 of them
    probabilities = np.where(np.arange(8) < 5, 255, 51).astype(np.uint8)[None].repeat(6, 0)
    glomeruli = outputs.find_glomeruli(mask, probabilities, 2, (12, 15))
    row = outputs.slide_stats("s", glomeruli, (0.5, 0.25))
    # Areas 48 and 4 * 3 = 12 px (the last column is half outside the slide);
    # probability (12 * 1 + 4 * 0.2) / 16; square um: 0.125 a pixel.
    assert row == {"id": "s", "glomeruli": "2", "area_px": "60", "median_area_px": "30",
                   "area_um2": "7.5", "median_area_um2": "3.75", "mean_probability": "0.8000"}
    assert outputs.slide_stats("t", [], None) == {
        "id": "t", "glomeruli": "0", "area_px": "0", "median_area_px": "", "area_um2": "",
        "median_area_um2": "", "mean_probability": ""}
    outputs.write_stats(tmp_path / "s.csv", [row])
    assert outputs.read_stats(tmp_path / "s.csv") == [row]


def test_overlay_colours_true_and_false_positives_and_false_negatives(tmp_path):
    Image.fromarray(np.full((8, 12, 3), 255, np.uint8)).save(tmp_path / "white.png")
    prediction = np.zeros((4, 6), bool)
    prediction[:, :3] = True
    truth = np.zeros((8, 12), bool)
    truth[:4] = True
    with slides.open_slide(tmp_path / "white.png") as slide:
        outputs.write_overlay(slide, prediction, 2, tmp_path / "o.png",
                              rle.RleMask(rle.encode(truth), truth.shape))
    overlay = np.asarray(Image.open(tmp_path / "o.png"))
    tinted = {name: tuple(np.round(255 + 0.45 * (colour - 255)).astype(int)) for name, colour in
              [("tp", outputs._TRUE_POSITIVE), ("fp", outputs._FALSE_POSITIVE),
               ("fn", outputs._FALSE_NEGATIVE)]}
    assert tuple(overlay[0, 0]) == tinted["tp"] and tuple(overlay[3, 0]) == tinted["fp"]
    assert tuple(overlay[0, 5]) == tinted["fn"] and tuple(overlay[3, 5]) == (255, 255, 255)


class FlagsLike(types.SimpleNamespace):
    """What `from_flags` reads of absl's FLAGS: values, and whether --outputs was given."""

    def __getitem__(self, name):
        return types.SimpleNamespace(present=int(self.outputs != list(outputs.DEFAULT_KINDS)))


def flags_like(**values):
    return FlagsLike(**{"out_dir": None, "outputs": list(outputs.DEFAULT_KINDS),
                        "overlays": None, "truth": None, "overwrite": False, **values})


def test_bad_output_flags_are_one_line_input_errors(tmp_path):
    with pytest.raises(cli.InputError, match="^--outputs: unknown output 'png'; choose from"):
        outputs.from_flags(flags_like(out_dir=str(tmp_path), outputs=["png"]), ["a"])
    with pytest.raises(cli.InputError, match="^--outputs: give --out_dir"):
        outputs.from_flags(flags_like(outputs=["geojson"]), ["a"])
    with pytest.raises(cli.InputError, match="^--truth: only overlays use a truth"):
        outputs.from_flags(flags_like(out_dir=str(tmp_path), truth="t.csv"), ["a"])
    (tmp_path / "t.csv").write_text("id,encoding\nb,1 2\n")
    with pytest.raises(cli.InputError, match="t.csv: no truth for image 'a'"):
        outputs.from_flags(flags_like(overlays=str(tmp_path), truth=str(tmp_path / "t.csv")),
                           ["a"])


def test_predict_writes_every_output_and_a_rerun_skips_finished_slides(
        images, tmp_path):  # noqa: F811
    calls = []

    def red_channel(batch):     # a stand-in model: speckled masks, many components
        calls.append(len(batch))
        return batch[..., 0] / 255

    paths = predict.find_images(str(images / "*"))
    out_dir, submission = tmp_path / "slides", tmp_path / "submission.csv"
    (tmp_path / "truth.csv").write_text("id,encoding\nslide1,1 5000\ntile2,\n")
    config = flags_like(out_dir=str(out_dir), outputs=list(outputs.KINDS),
                        truth=str(tmp_path / "truth.csv"))
    slide_outputs = outputs.from_flags(config, [slides.image_id(path) for path in paths])
    predict.predict_to_csv(paths, red_channel, options(), submission, slide_outputs)
    first = submission.read_text()
    encodings = dict(row for row in csv.reader(first.splitlines()[1:]))
    table = outputs.read_stats(out_dir / "stats.csv")
    assert [row["id"] for row in table] == ["slide1", "tile2"]
    for path, row in zip(paths, table):
        image_id = slides.image_id(path)
        assert sorted(p.name for p in out_dir.glob(f"{image_id}.*")) == sorted(
            f"{image_id}{suffix}" for suffix in outputs.SUFFIXES.values())
        with slides.open_slide(path) as slide:
            shape = (slide.height, slide.width)
        full = rle.decode(encodings[image_id], shape)
        collection = json.loads((out_dir / f"{image_id}.geojson").read_text())
        polygons = [shapely.geometry.shape(f["geometry"]) for f in collection["features"]]
        assert all(polygon.is_valid for polygon in polygons)
        assert len(polygons) == components_of(full).max() == int(row["glomeruli"]) > 10
        assert dice(features.rasterize([(p, 1) for p in polygons], out_shape=shape,
                                       dtype=np.uint8).astype(bool), full) >= 0.99
        assert int(row["area_px"]) == np.count_nonzero(full)
        assert tifffile.imread(out_dir / f"{image_id}.mask.ome.tif").shape == shape
        assert (out_dir / f"{image_id}.rle").read_text() == encodings[image_id]

    calls.clear()
    predict.predict_to_csv(paths, red_channel, options(), submission, slide_outputs)
    assert not calls and submission.read_text() == first
    assert outputs.read_stats(out_dir / "stats.csv") == table
    (out_dir / "tile2.geojson").unlink()           # an unfinished slide is predicted again
    predict.predict_to_csv(paths, red_channel, options(), submission, slide_outputs)
    assert calls and (out_dir / "tile2.geojson").exists()
    calls.clear()
    redo = outputs.from_flags(flags_like(out_dir=str(out_dir), overwrite=True), ["slide1"])
    predict.predict_to_csv(paths[:1], red_channel, options(), tmp_path / "again.csv", redo)
    assert calls and (tmp_path / "again.csv").read_text().splitlines()[1] == \
        first.splitlines()[1]
    assert not list(out_dir.glob(".*"))
