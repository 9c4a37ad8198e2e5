"""Whole-slide prediction: the RLE of the upsampled mask, scaled reading, flip TTA, and a
fake training run (random Unet-efficientnetb0, 64 px tiles) predicted end to end."""
import dataclasses
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tifffile
from PIL import Image

from jaxseg import (checkpoints, convert, ensembles, evaluate, models, outputs, predict, rle,
                    slides, stain, synthetic)
from unet_variables import random_variables

TILE = 64
REDUCTION = 2


def upsample(mask, factor, shape):
    return np.repeat(np.repeat(mask, factor, 0), factor, 1)[:shape[0], :shape[1]]


@pytest.mark.parametrize("shape,factor", [((7, 5), 1), ((9, 13), 2), ((10, 10), 2),
                                          ((31, 17), 3), ((64, 41), 4)])
def test_encode_upsampled_equals_rle_of_the_upsampled_mask(shape, factor, monkeypatch):
    monkeypatch.setattr(predict, "_RLE_BLOCK_PIXELS", 20)  # several column blocks
    small_shape = slides.model_scale_shape(*shape, factor)
    rng = np.random.default_rng(sum(shape) + factor)
    masks = [rng.random(small_shape) > 0.5, np.zeros(small_shape, bool),
             np.ones(small_shape, bool), np.eye(*small_shape, dtype=bool)]
    for mask in masks:
        assert predict.encode_upsampled(mask, factor, shape) == \
            rle.encode(upsample(mask, factor, shape))


def test_encode_upsampled_refuses_a_mask_of_another_scale():
    with pytest.raises(ValueError, match="not \\(9, 13\\) reduced 2 times"):
        predict.encode_upsampled(np.zeros((4, 7), bool), 2, (9, 13))


def test_scaled_reader_gives_block_means_with_edges_repeated(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (23, 17, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    padded = np.pad(image, ((0, 1), (0, 1), (0, 0)), mode="edge").astype(np.float64)
    expected = padded.reshape(8, 3, 6, 3, 3).mean(axis=(1, 3))
    expected = np.floor(expected + 0.5).astype(np.uint8)  # round half up, as downscale_area
    with slides.open_slide(tmp_path / "a.png") as slide:
        read = slides.scaled_reader(slide, 3)
        np.testing.assert_array_equal(read(0, 8, 0, 6), expected)
        np.testing.assert_array_equal(read(5, 8, 2, 6), expected[5:8, 2:6])
        np.testing.assert_array_equal(slides.scaled_reader(slide, 1)(3, 9, 4, 5),
                                      image[3:9, 4:5])


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A jaxseg.train run directory: two finished folds of a random Unet-b0, 64 px,
    reduction 2.

    With normalised input the random network's logits stay within about +-10; on raw
    0..255 pixels they reach thousands and float rounding flips probabilities.
    """
    run = tmp_path_factory.mktemp("run")
    model = models.Unet("efficientnetb0")
    for fold in range(2):
        saver = checkpoints.FoldCheckpoints(run / f"fold_{fold}")
        variables = random_variables(model, seed=fold, random_affine=True)
        saver.save_best(0, variables, {"val_dice_coe": 0.5})
        saver.close()
        (run / f"fold_{fold}" / "result.json").write_text(json.dumps({"fold": fold}))
    (run / "config.json").write_text(json.dumps({
        "backbone": "efficientnetb0", "image_size": TILE, "half_precision": False,
        "normalize_input": True, "num_folds": 2, "depthwise_impl": "auto"}))
    (run / "prepare.json").write_text(json.dumps({"tile_size": TILE * REDUCTION,
                                                  "reduction": REDUCTION}))
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A tiled OME-TIFF larger than one window (id `slide1`, as the competition writes
    it) and a PNG smaller than one window."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    tifffile.imwrite(folder / "slide1.ome.tiff", rng.integers(0, 256, (190, 301, 3), np.uint8),
                     tile=(32, 32))
    Image.fromarray(rng.integers(0, 256, (101, 77, 3), np.uint8)).save(folder / "tile2.png")
    return folder


def test_unfinished_folds_are_left_out_and_named_unless_allowed(fake_run, tmp_path, capsys):
    """A fold still training (or stopped) has no result.json: its half-trained best
    model must not join the ensemble without a word."""
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    (run / "fold_1" / "result.json").unlink()
    assert [str(path) for path in ensembles.find_fold_dirs(run)] == [str(run / "fold_0")]
    assert capsys.readouterr().err == (
        f"warning: leaving out fold_1 of {run}: training unfinished (no result.json); "
        "--allow_unfinished_folds includes them\n")
    ensemble = ensembles.load_ensemble(str(run), allow_unfinished_folds=True)
    assert len(ensemble.variables) == 2
    assert ensemble.source == f"{run / 'fold_0'}, {run / 'fold_1'} (unfinished)"
    with pytest.raises(ValueError, match="fold_1: training of this fold has not finished"):
        ensembles.load_ensemble(None, checkpoint=str(run / "fold_1"))
    (run / "fold_0" / "result.json").unlink()
    with pytest.raises(ValueError, match=f"^{run}: no fold has finished training \\(fold_0, "
                                         "fold_1 have no result.json\\)"):
        ensembles.find_fold_dirs(run)


def test_flip_tta_is_flip_equivariant_and_averages_folds(fake_run):
    ensemble = ensembles.load_ensemble(str(fake_run))
    assert len(ensemble.variables) == 2 and (ensemble.tile, ensemble.reduction) == (64, 2)
    stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *ensemble.variables)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (TILE, TILE, 3), np.uint8)
    half = rng.integers(0, 256, (TILE // 2, TILE // 2, 3), np.uint8)
    top = np.concatenate([half, half[:, ::-1]], axis=1)
    symmetric = np.concatenate([top, top[::-1]], axis=0)
    batch = np.stack([image, image[:, ::-1], image[::-1], symmetric])
    tta = jax.jit(lambda v, x: predict.ensemble_probabilities(v, x, model=ensemble.model,
                                                              tta="flips"))(stacked, batch)
    tta = np.asarray(tta)
    np.testing.assert_allclose(tta[1], tta[0][:, ::-1], atol=1e-5)
    np.testing.assert_allclose(tta[2], tta[0][::-1], atol=1e-5)
    np.testing.assert_allclose(tta[3], tta[3][::-1, ::-1], atol=1e-5)
    np.testing.assert_allclose(tta[3], tta[3][:, ::-1], atol=1e-5)

    apply = jax.jit(lambda v, x: jax.nn.sigmoid(ensemble.model.apply(v, x, train=False)[..., 0]))
    views = np.stack([image, image[:, ::-1], image[::-1], image[::-1, ::-1]])
    per_fold = [np.asarray(apply(v, views)) for v in ensemble.variables]
    unflipped = [np.mean([p[0], p[1][:, ::-1], p[2][::-1], p[3][::-1, ::-1]], axis=0)
                 for p in per_fold]
    np.testing.assert_allclose(tta[0], np.mean(unflipped, axis=0), atol=1e-5)
    # Without TTA the random model is not flip-equivariant: the test above can fail.
    assert np.abs(per_fold[0][1][:, ::-1] - per_fold[0][0]).max() > 1e-3

    sharded, global_batch = predict.make_batch_predictor(ensemble, "flips", per_device_batch=1)
    assert global_batch == jax.device_count()
    np.testing.assert_allclose(np.asarray(sharded(batch))[:len(batch)], tta, atol=1e-5)


def options(tile=TILE):
    return predict.SlideOptions(tile=tile, reduction=REDUCTION, overlap=16, blend="center",
                                batch_size=jax.device_count(), threshold=0.5)


@pytest.fixture(scope="module")
def submission(fake_run, images, tmp_path_factory):
    """The fake run's prediction of both images (no TTA), with overlays."""
    ensemble = ensembles.load_ensemble(str(fake_run))
    predict_fn, _ = predict.make_batch_predictor(ensemble, "none", per_device_batch=1)
    out = tmp_path_factory.mktemp("sub") / "submission.csv"
    predict.predict_to_csv(predict.find_images(str(images / "*")), predict_fn, options(), out,
                           outputs.SlideOutputs(overlays=out.parent / "overlays"))
    return out, predict_fn


def test_predict_end_to_end_writes_rles_of_the_predicted_masks(submission, images):
    out, predict_fn = submission
    assert out.read_text().splitlines()[0] == "id,predicted"
    encodings = evaluate.read_rle_csv(out)
    assert list(encodings) == ["slide1", "tile2"]
    fractions = []
    for path in predict.find_images(str(images / "*")):
        with slides.open_slide(path) as slide:
            shape = (slide.height, slide.width)
            mask = predict.predict_slide(slide, predict_fn, options())
        assert mask.shape == slides.model_scale_shape(*shape, REDUCTION)
        np.testing.assert_array_equal(rle.decode(encodings[slides.image_id(path)], shape),
                                      upsample(mask, REDUCTION, shape))
        fractions.append(mask.mean())
        overlay = np.asarray(Image.open(out.parent / "overlays" /
                                        f"{slides.image_id(path)}.png"))
        assert overlay.shape == (*mask.shape, 3)
    assert 0 < np.mean(fractions) < 1, fractions  # the random model predicts both classes
    assert not list(out.parent.glob(".*"))


def test_cli_writes_the_same_submission(submission, fake_run, images, tmp_path):
    out = tmp_path / "cli.csv"
    done = subprocess.run([sys.executable, "-m", "jaxseg.predict", f"--workdir={fake_run}",
                           f"--images={images}/*", f"--out={out}", "--tta=none",
                           "--overlap=0.25", "--blend=center", "--batch_size=1",
                           f"--overlays={tmp_path / 'overlays'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 model(s)" in done.stderr and (
        "64 px windows at 1 \u00b5m/px (the training tiles', assuming 0.5 \u00b5m/px slides; "
        "1/2 scale for slides without a pixel size)") in done.stderr
    assert "note: " + str(images / "slide1.ome.tiff") + " records no pixel size: it and other " \
        "slides without one are read at 1/2 (--reduction)" in done.stderr
    assert out.read_text() == submission[0].read_text()
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["slide1.png",
                                                                         "tile2.png"]


def test_the_target_scale_is_the_training_tiles(fake_run, tmp_path):
    """--target_mpp by default: the slides' pixel size prepare.json records times the
    reduction; without one, the HuBMAP slides' 0.5 um/px times it."""
    ensemble = ensembles.load_ensemble(str(fake_run))
    assert ensemble.mpp is None
    assert predict.target_scale(None, ensemble) == (
        0.5 * REDUCTION, "the training tiles', assuming 0.5 \u00b5m/px slides")
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    record = json.loads((run / "prepare.json").read_text())
    (run / "prepare.json").write_text(json.dumps({**record, "slide_mpp": 0.25}))
    ensemble = ensembles.load_ensemble(str(run), reduction=8)
    assert predict.target_scale(None, ensemble) == (2.0, "the training tiles'")
    assert predict.target_scale(1.5, ensemble) == (1.5, "--target_mpp")
    with pytest.raises(ValueError, match="--target_mpp must be positive, got 0"):
        predict.target_scale(0.0, ensemble)


def test_keras_weights_take_backbone_and_normalisation_from_the_conversion(fake_run,
                                                                         monkeypatch):
    variables = checkpoints.load_best_variables(fake_run / "fold_0")
    meta = {"backbone": "efficientnetb0", "normalize_input": True}
    monkeypatch.setattr(convert, "load_converted", lambda directory: (variables, meta))
    ensemble = ensembles.load_ensemble(None, keras_weights="converted", tile_size=TILE)
    assert (ensemble.tile, ensemble.reduction) == (TILE, ensembles.SEED_REDUCTION)
    assert ensemble.model.backbone == "efficientnetb0" and ensemble.model.normalize_input
    with pytest.raises(ValueError, match="not both"):
        ensembles.load_ensemble(None, checkpoint=str(fake_run / "fold_0"), keras_weights="x")


def test_a_failing_slide_leaves_no_csv(images, tmp_path):
    calls = []

    def fails_on_second_slide(batch):
        calls.append(len(batch))
        if len(calls) > 1:
            raise ValueError("device lost")
        return batch[..., 0] / 255

    out = tmp_path / "submission.csv"
    paths = predict.find_images(str(images / "*"))
    with pytest.raises(ValueError, match="device lost"):
        predict.predict_to_csv(paths, fails_on_second_slide,
                               dataclasses.replace(options(), batch_size=100), out)
    assert not list(tmp_path.iterdir())


def test_a_nan_prediction_stops_naming_slide_and_window(images):
    """Not an empty mask: the model's NaN is reported, naming where it came from."""
    path = images / "slide1.ome.tiff"
    with slides.open_slide(path) as slide, pytest.raises(FloatingPointError, match=(
            rf"^{path}: window 1 of 6 \(rows 0:64, cols 0:64\): 4096 of 4096 predicted "
            r"probabilities are NaN or infinite \(pixels at 1/2 scale\); stopped$")):
        predict.predict_slide(slide, lambda batch: np.full(batch.shape[:3], np.nan), options())


def test_continue_on_nan_counts_the_windows_as_background_and_names_them(images, capsys):
    path = images / "slide1.ome.tiff"

    def nan_in_the_top_left_window(batch):
        probabilities = batch[..., 0] / 255
        probabilities[0, :4, :4] = np.nan   # the first window of each call
        return probabilities

    with slides.open_slide(path) as slide:
        continued = predict.predict_slide(slide, nan_in_the_top_left_window, dataclasses.replace(
            options(), batch_size=1, continue_on_nan=True))
        reference = predict.predict_slide(slide, lambda batch: batch[..., 0] / 255,
                                          dataclasses.replace(options(), batch_size=1))
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning")]
    assert warnings == [
        f"warning: {path}: 6 of 6 windows had NaN or infinite probabilities, counted as "
        "background (pixels at 1/2 scale): window 1 of 6 (rows 0:64, cols 0:64): 16 of 4096 "
        "predicted probabilities are NaN or infinite; window 2 of 6 (rows 0:64, cols 48:112): "
        "16 of 4096 predicted probabilities are NaN or infinite; window 3 of 6 (rows 0:64, "
        "cols 87:151): 16 of 4096 predicted probabilities are NaN or infinite; ..."]
    assert continued.shape == reference.shape
    # Only the NaN pixels differ, and only where the reference is foreground.
    assert not (continued & ~reference).any()
    assert 0 < np.count_nonzero(reference & ~continued) <= 6 * 16


def test_input_errors_name_the_file(fake_run, images, tmp_path):
    with pytest.raises(FileNotFoundError, match="no files match"):
        predict.find_images(str(tmp_path / "*.tiff"))
    (tmp_path / "bad.tiff").write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match="bad.tiff: unreadable TIFF"):
        predict.check_readable(predict.find_images(str(tmp_path / "*.tiff")))
    with pytest.raises(FileNotFoundError, match="no fold_K/best checkpoints"):
        (tmp_path / "config.json").write_text(json.dumps({"backbone": "efficientnetb0"}))
        ensembles.load_ensemble(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ensembles.load_ensemble(str(images))
    with pytest.raises(ValueError, match="variables do not fit a Unet-efficientnetb1"):
        (tmp_path / "b1").mkdir()
        config = json.loads((fake_run / "config.json").read_text())
        (tmp_path / "b1" / "config.json").write_text(json.dumps({**config,
                                                                 "backbone": "efficientnetb1"}))
        ensembles.load_ensemble(str(tmp_path / "b1"), checkpoint=str(fake_run / "fold_0"))
    with pytest.raises(ValueError, match="tile_size"):
        ensembles.load_ensemble(str(fake_run), tile_size=48)


def test_cli_errors_are_one_line_and_write_nothing(fake_run, tmp_path):
    out = tmp_path / "submission.csv"
    done = subprocess.run([sys.executable, "-m", "jaxseg.predict", f"--workdir={fake_run}",
                           f"--images={tmp_path}/*.tiff", f"--out={out}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: --images '{tmp_path}/*.tiff': no files match"]
    assert not out.exists()


def test_stain_normalised_prediction_is_that_of_the_normalised_slide(fake_run, tmp_path):
    """A run whose prepare.json records a stain target normalises every window of a
    slide: the same as predicting the slide normalised beforehand."""
    run = tmp_path / "run"
    shutil.copytree(fake_run, run)
    target = {"mean": [60.0, 35.0, -20.0], "std": [9.0, 7.0, 6.0]}
    record = json.loads((run / "prepare.json").read_text())
    (run / "prepare.json").write_text(json.dumps({
        **record, "thresholds": {"saturation": 40, "min_pixels": 62},
        "stain_normalisation": {"method": "reinhard", "target": target, "slides": {}}}))
    normalisation = ensembles.load_ensemble(str(run)).stain_normalisation
    assert normalisation == stain.Normalisation(stain.StainStatistics.from_json(target, ""), 40)
    assert ensembles.load_ensemble(str(fake_run)).stain_normalisation is None

    synthetic.make_dataset(tmp_path / "synthetic", num_train=0, num_test=1, height=300,
                           width=340, seed=3, test_stain_shift=(1.2, 0.8, 1.1))
    [path] = (tmp_path / "synthetic" / "test").glob("*.tiff")
    with slides.open_slide(path) as slide:
        shape = slides.model_scale_shape(slide.height, slide.width, REDUCTION)
        image = slides.scaled_reader(slide, REDUCTION)(0, shape[0], 0, shape[1])
        normalised = normalisation.transfer(slide, REDUCTION)(image)
        tissue = stain.tissue_pixels(image, 40)
        assert tissue.mean() > 0.05 and np.abs(normalised.astype(int) - image)[tissue].mean() > 5
        green = lambda batch: batch[..., 1] / 255   # noqa: E731  a probability per pixel
        got = np.zeros(shape, np.uint8)
        predict.predict_slide(slide, green, dataclasses.replace(
            options(), stain_normalisation=normalisation), probabilities=got)
        plain = np.zeros(shape, np.uint8)
        predict.predict_slide(slide, green, options(), probabilities=plain)
    Image.fromarray(normalised).save(tmp_path / "normalised.png")
    expected = np.zeros(shape, np.uint8)
    with slides.open_slide(tmp_path / "normalised.png") as slide:
        predict.predict_slide(slide, green, dataclasses.replace(options(), reduction=1),
                              probabilities=expected)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, plain)
    assert predict.describe_stain(normalisation, "the training tiles") == (
        "stain: each slide's tissue colours are normalised (Reinhard) to the target of the "
        "training tiles (L*a*b* mean 60.0, 35.0, -20.0, std 9.0, 7.0, 6.0)")
