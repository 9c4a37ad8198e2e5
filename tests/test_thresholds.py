"""The threshold a fold chooses: per-tile Dice at each threshold, as the eval metric counts it."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import cli, losses, thresholds


def _batch(seed: int, count: int = 6, size: int = 16):
    rng = np.random.default_rng(seed)
    probabilities = rng.integers(0, 256, (count, size, size, 1)).astype(np.uint8)
    masks = (rng.random((count, size, size, 1)) < 0.4).astype(np.uint8)
    masks[0] = 0
    probabilities[0] = 100     # empty truth, empty prediction above 0.4: Dice 1 there
    weights = np.ones(count, np.float32)
    weights[-1] = 0            # a padded row counts nowhere
    return probabilities, masks, weights


@pytest.mark.parametrize("seed", [0, 1])
def test_dice_sums_are_the_eval_metrics_per_image_dice_at_every_threshold(seed):
    probabilities, masks, weights = _batch(seed)
    sums = thresholds.dice_sums(probabilities, masks, weights)
    assert sums.shape == (len(thresholds.THRESHOLDS),)
    for index, threshold in enumerate(thresholds.THRESHOLDS):
        # The eval step's metric at 0.5, moved: p > t is (p - t + 0.5) > 0.5.
        shifted = jnp.asarray(probabilities / 255.0 - threshold + 0.5, jnp.float32)
        expected = losses.thresholded_metrics(shifted, jnp.asarray(masks, jnp.float32),
                                              jnp.asarray(weights))["per_image_dice_sum"]
        assert sums[index] == pytest.approx(float(expected), abs=1e-5), threshold


def test_a_batch_of_padding_counts_nothing():
    """The all-padding batches a process runs to keep in step with the others."""
    probabilities, masks, weights = _batch(0)
    assert not thresholds.dice_sums(probabilities, masks, np.zeros_like(weights)).any()


def test_the_best_threshold_and_its_curve_come_back(monkeypatch):
    """A model that is right only above 0.6: the curve peaks there."""
    size = 8
    truth = np.zeros((4, size, size, 1), np.uint8)
    truth[:, 2:6, 2:6] = 1
    probabilities = np.where(truth > 0, 200, 150).astype(np.uint8)   # 0.78 inside, 0.59 out
    batch = {"mask": truth, "weight": np.ones(4, np.float32), "image": truth}
    monkeypatch.setattr(thresholds.parallel, "prefetch_to_devices",
                        lambda batches, mesh, size: iter(batches))
    monkeypatch.setattr(thresholds.reporting, "local_rows", np.asarray)
    chosen = thresholds.choose({}, lambda variables, b: ({}, probabilities), iter([batch]),
                               None, prefetch=1)
    curve = chosen["val_per_image_dice_by_threshold"]
    assert list(curve) == [str(t) for t in thresholds.THRESHOLDS]
    assert chosen["threshold"] == 0.6
    assert curve["0.6"] == 1.0 and curve["0.5"] == pytest.approx(2 * 16 / (64 + 16))


def test_a_run_threshold_is_the_folds_mean_or_names_the_folds_without():
    assert thresholds.run_threshold([{"fold": 0, "threshold": 0.4},
                                     {"fold": 1, "threshold": 0.5}], "run") == pytest.approx(0.45)
    with pytest.raises(cli.InputError, match=r"^run: fold\(s\) 1 chose no threshold"):
        thresholds.run_threshold([{"fold": 0, "threshold": 0.4}, {"fold": 1}], "run")
