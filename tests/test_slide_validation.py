"""Whole-slide validation scores what `jaxseg.predict` + `jaxseg.evaluate` would score."""
import json

import numpy as np
import pytest
from PIL import Image

from jaxseg import cli, evaluate, predict, prepare, slide_validation, train
from jaxseg.ensembles import load_ensemble

from test_train import tiny_config

SIZE = 64          # model-scale tile
REDUCTION = 2
# Slides of several tiles, with glomerulus-like bright discs, some cut by tile borders.
SLIDE_SHAPES = [(256, 192), (192, 256), (256, 256), (192, 192)]


def _write_slides(folder):
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    for index, (height, width) in enumerate(SLIDE_SHAPES):
        image = rng.integers(120, 200, (height, width, 3)).astype(np.uint8)
        image[..., 1] //= 2   # saturated enough to count as tissue
        yy, xx = np.mgrid[:height, :width]
        mask = np.zeros((height, width), bool)
        for _ in range(3):
            cy, cx = rng.integers(20, height - 20), rng.integers(20, width - 20)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= int(rng.integers(12, 24)) ** 2
        image[mask] = (250, 90, 160)
        Image.fromarray(image).save(folder / "images" / f"s{index}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"s{index}.png")


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    _write_slides(folder)
    prepare.prepare(prepare.image_jobs(folder / "images", folder / "masks"), folder / "records",
                    prepare.TilingConfig(tile_size=SIZE * REDUCTION, reduction=REDUCTION,
                                         min_pixels=0), workers=1)
    config = tiny_config(folder / "records", folds="0", epochs=2,
                         val_images=str(folder / "images" / "*.png"),
                         val_truth=str(folder / "masks"))
    workdir = folder / "run"
    summary = train.train_and_evaluate(config, workdir)
    return folder, workdir, summary


def test_slide_dice_is_what_predict_and_evaluate_give_for_the_best_epoch(slide_run, tmp_path):
    folder, workdir, summary = slide_run
    history = json.loads((workdir / "fold_0" / "history.json").read_text())
    result = summary["folds"]["0"]
    best = result["best_epoch"] - 1
    # 'auto' chose the best epoch by whole-slide Dice, not by the tiles' Dice.
    assert result["monitor"] == "val_slide_dice"
    assert result["best_val_slide_dice"] == max(history["val_slide_dice"])
    assert history["val_slide_dice"][best] == max(history["val_slide_dice"])
    val_ids = slide_validation.slide_ids(
        (workdir / "fold_0" / "val_files.txt").read_text().split())
    images = [folder / "images" / f"{slide_id}.png" for slide_id in val_ids]

    ensemble = load_ensemble(str(workdir), checkpoint=str(workdir / "fold_0"))
    predict_fn, batch = predict.make_batch_predictor(ensemble, "none", 1)
    options = predict.SlideOptions(tile=SIZE, reduction=REDUCTION, overlap=SIZE // 4,
                                   blend="center", batch_size=batch, threshold=0.5,
                                   target_mpp=predict.target_scale(None, ensemble)[0])
    predict.predict_to_csv(images, predict_fn, options, tmp_path / "pred.csv")
    shapes = evaluate.image_shapes(str(folder / "images" / "*.png"))
    scored = evaluate.evaluate(tmp_path / "pred.csv", folder / "masks",
                               {slide_id: shapes[slide_id] for slide_id in val_ids})
    assert [row["id"] for row in scored["images"]] == sorted(val_ids)
    assert history["val_slide_dice"][best] == pytest.approx(scored["mean_dice"], abs=1e-12)


@pytest.mark.parametrize("overrides, message", [
    (dict(monitor="val_slide_dice"), "config.monitor=val_slide_dice needs config.val_images"),
    (dict(val_images="x/*.png"), "config.val_images and config.val_truth go together"),
    (dict(monitor="val_loss"), "config.monitor: unknown 'val_loss'"),
])
def test_inconsistent_validation_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(cli.InputError, match=message):
        train.train_and_evaluate(tiny_config(tmp_path, **overrides), tmp_path / "run")


def test_a_validation_slide_without_image_or_truth_is_named_before_training(slide_run,
                                                                           tmp_path):
    folder, workdir, _ = slide_run
    missing = slide_validation.slide_ids(
        (workdir / "fold_0" / "val_files.txt").read_text().split())[0]
    others = [path for path in (folder / "images").iterdir() if path.stem != missing]
    (tmp_path / "images").mkdir()
    for path in others:
        (tmp_path / "images" / path.name).symlink_to(path)
    config = tiny_config(folder / "records", folds="0",
                         val_images=str(tmp_path / "images" / "*.png"),
                         val_truth=str(folder / "masks"))
    with pytest.raises(cli.MissingInput, match=f"no image of validation slide {missing}$"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    config.val_images, config.val_truth = str(folder / "images" / "*.png"), str(
        tmp_path / "truth.csv")
    (tmp_path / "truth.csv").write_text("id,encoding\nnobody,1 2\n")
    with pytest.raises(cli.MissingInput, match="no truth for validation slide "):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_record_files_name_their_slides():
    assert slide_validation.slide_ids(["/d/a-b-12.tfrec", "gs://x/c-3.tfrec"]) == ["a-b", "c"]
    with pytest.raises(cli.InputError, match="other.tfrec: not named"):
        slide_validation.slide_ids(["/d/other.tfrec"])
