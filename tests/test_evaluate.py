"""The competition metric: Dice per image (1 when both masks are empty), mean over images."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from jaxseg import evaluate, rle

PRED = np.array([[1, 1, 0, 0],
                 [1, 0, 0, 0],
                 [0, 0, 0, 1]], bool)
TRUE = np.array([[1, 0, 0, 0],
                 [1, 1, 0, 0],
                 [0, 0, 1, 1]], bool)  # |P & T| = 3, |P| = 4, |T| = 5: Dice 6/9


def test_dice_pinned_on_hand_made_masks():
    empty = np.zeros((3, 4), bool)
    assert evaluate.dice(PRED, TRUE) == pytest.approx(6 / 9)
    assert evaluate.dice(empty, empty) == 1.0
    assert evaluate.dice(PRED, empty) == 0.0
    assert evaluate.dice(empty, TRUE) == 0.0
    assert evaluate.dice(TRUE, TRUE) == 1.0
    assert evaluate.dice(PRED.astype(np.uint8) * 255, TRUE) == pytest.approx(6 / 9)
    with pytest.raises(ValueError, match="shape"):
        evaluate.dice(PRED, TRUE.T)


def test_dice_equals_sklearn_f1():
    rng = np.random.default_rng(0)
    pred, true = rng.random((37, 53)) > 0.6, rng.random((37, 53)) > 0.3
    assert evaluate.dice(pred, true) == pytest.approx(f1_score(true.ravel(), pred.ravel()))


def write_csv(path, column, rows):
    path.write_text(f"id,{column}\n" + "".join(f"{i},{r}\n" for i, r in rows))
    return path


@pytest.fixture
def hand_made(tmp_path):
    """Three images: Dice 6/9, both empty (1), prediction empty (0); mean 5/9."""
    empty = np.zeros((3, 4), bool)
    pred = write_csv(tmp_path / "sub.csv", "predicted",
                     [("a", rle.encode(PRED)), ("b", ""), ("c", "")])
    truth = write_csv(tmp_path / "train.csv", "encoding",
                      [("a", rle.encode(TRUE)), ("b", ""), ("c", rle.encode(TRUE)),
                       ("d", "")])
    masks = tmp_path / "masks"
    masks.mkdir()
    for image_id, mask in (("a", TRUE), ("b", empty), ("c", TRUE)):
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{image_id}.png")
    shapes = {image_id: (3, 4) for image_id in "abcd"}
    return pred, truth, masks, shapes


def test_evaluate_against_rle_truth_and_mask_folder(hand_made):
    pred, truth, masks, shapes = hand_made
    three_images = {image_id: shapes[image_id] for image_id in "abc"}
    for result in (evaluate.evaluate(pred, truth, three_images),
                   evaluate.evaluate(pred, masks)):
        assert [row["id"] for row in result["images"]] == ["a", "b", "c"]
        assert [row["dice"] for row in result["images"]] == pytest.approx([6 / 9, 1.0, 0.0])
        assert [row["pred_pixels"] for row in result["images"]] == [4, 0, 0]
        assert [row["true_pixels"] for row in result["images"]] == [5, 0, 5]
        assert result["mean_dice"] == pytest.approx(5 / 9)
        assert result["missing_ids"] == []


def test_a_truth_image_without_prediction_scores_0_and_is_named(hand_made):
    """Kaggle scores a missing id 0, even where the truth is empty (an empty prediction
    would score 1 there): d has no row in the submission."""
    pred, truth, masks, shapes = hand_made
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(masks / "d.png")
    for result in (evaluate.evaluate(pred, truth, shapes), evaluate.evaluate(pred, masks)):
        assert [row["id"] for row in result["images"]] == ["a", "b", "c", "d"]
        assert result["images"][3] == {"id": "d", "dice": 0.0, "pred_pixels": None,
                                       "true_pixels": None}
        assert result["mean_dice"] == pytest.approx((6 / 9 + 1) / 4)
        assert result["missing_ids"] == ["d"]
    done = run_cli(f"--pred={pred}", f"--truth={masks}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-3].split() == ["d", "0.0000", "no", "prediction"]
    assert done.stdout.splitlines()[-2].split() == ["mean", "0.4167"]
    assert done.stderr.strip().splitlines()[-1] == (
        "1 truth image(s) have no prediction and score 0 (Kaggle's rule): d")
    assert (pred.parent / "sub_dice.csv").read_text().splitlines()[-2:] == [
        "d,0.000000,,", "mean,0.416667,,"]


def test_rle_comparison_in_column_blocks_matches_decoded_masks(monkeypatch):
    rng = np.random.default_rng(1)
    pred, true = rng.random((50, 70)) > 0.5, rng.random((50, 70)) > 0.4
    monkeypatch.setattr(evaluate, "_BLOCK_PIXELS", 50 * 3)  # blocks of 3 columns
    intersection, pred_pixels, true_pixels = evaluate._counts_of_rles(
        rle.RleMask(rle.encode(pred), (50, 70)), rle.RleMask(rle.encode(true), (50, 70)))
    assert evaluate._dice_from_counts(intersection, pred_pixels, true_pixels) == \
        pytest.approx(evaluate.dice(pred, true))
    assert (pred_pixels, true_pixels) == (pred.sum(), true.sum())


def test_evaluate_errors_name_the_problem(hand_made, tmp_path):
    pred, truth, masks, shapes = hand_made
    with pytest.raises(ValueError, match="image a: unknown image shape"):
        evaluate.evaluate(pred, truth, {})
    with pytest.raises(ValueError, match=f"{masks / 'a.png'}: mask is \\(3, 4\\), image a is "
                                         "\\(4, 3\\)"):
        evaluate.evaluate(pred, masks, {"a": (4, 3)})
    stranger = write_csv(tmp_path / "s.csv", "predicted", [("zzz", "")])
    with pytest.raises(ValueError, match="no truth for predicted ids zzz"):
        evaluate.evaluate(stranger, truth, shapes)
    twice = write_csv(tmp_path / "t.csv", "predicted", [("a", ""), ("a", "")])
    with pytest.raises(ValueError, match="appears twice"):
        evaluate.evaluate(twice, truth, shapes)
    bad_header = write_csv(tmp_path / "h.csv", "rle", [("a", "")])
    with pytest.raises(ValueError, match="header"):
        evaluate.evaluate(bad_header, truth, shapes)
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate.evaluate(tmp_path / "absent.csv", truth, shapes)


def test_rle_errors_name_the_file_and_the_id(hand_made, tmp_path):
    pred, truth, masks, shapes = hand_made
    with pytest.raises(ValueError, match=f"^{pred}, id a: RLE runs past the image"):
        evaluate.evaluate(pred, truth, {**shapes, "a": (2, 2)})
    too_long = write_csv(tmp_path / "long.csv", "predicted", [("b", "5 100")])
    with pytest.raises(ValueError, match=f"^{too_long}, id b: RLE runs past the image"):
        evaluate.evaluate(too_long, masks)
    only_a = write_csv(tmp_path / "only_a.csv", "predicted", [("a", "")])
    odd_truth = write_csv(tmp_path / "odd.csv", "encoding", [("a", "1 2 3")])
    with pytest.raises(ValueError, match=f"^{odd_truth}, id a: RLE has an odd number"):
        evaluate.evaluate(only_a, odd_truth, shapes)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxseg.evaluate", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_and_saves_the_table(hand_made):
    pred, _, masks, _ = hand_made
    done = run_cli(f"--pred={pred}", f"--truth={masks}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2].split() == ["mean", "0.5556"]
    saved = (pred.parent / "sub_dice.csv").read_text().splitlines()
    assert saved[0] == "id,dice,pred_pixels,true_pixels"
    assert saved[1:] == ["a,0.666667,4,5", "b,1.000000,0,0", "c,0.000000,0,5",
                         "mean,0.555556,,"]


def test_shapes_come_from_image_headers(hand_made, tmp_path):
    pred, truth, _, _ = hand_made
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "c.ome.tiff"):
        Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(images / name)
    shapes = evaluate.image_shapes(str(images / "*"))
    assert shapes == {"a": (3, 4), "b": (3, 4), "c": (3, 4)}  # c.ome.tiff is image c
    out = tmp_path / "table.csv"
    done = run_cli(f"--pred={pred}", f"--truth={truth}", f"--images={images}/*",
                   f"--out={out}")
    assert done.returncode == 0, done.stderr
    assert out.read_text().splitlines()[-1] == "mean,0.555556,,"
    assert "no prediction" not in done.stderr  # d is not among the images named
    with pytest.raises(FileNotFoundError, match="no files match"):
        evaluate.image_shapes(str(images / "*.jpg"))


def test_cli_error_is_one_line(hand_made):
    pred, truth, _, _ = hand_made
    done = run_cli(f"--pred={pred}", f"--truth={truth}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: image a: unknown image shape: give the images with --images"]
    assert not (pred.parent / "sub_dice.csv").exists()
