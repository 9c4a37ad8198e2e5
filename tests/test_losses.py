"""Loss and metrics against segmentation_models' DiceLoss and the recipe's dice_coe."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg import losses

RNG = np.random.default_rng(1)
PROBS = RNG.uniform(size=(4, 16, 16, 1)).astype(np.float32)
MASKS = (RNG.uniform(size=(4, 16, 16, 1)) > 0.7).astype(np.float32)
ONES = np.ones(4, np.float32)


@pytest.fixture(scope="module")
def sm():
    os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
    return pytest.importorskip("segmentation_models")


def test_soft_dice_equals_segmentation_models(sm):
    import tensorflow as tf
    expected = float(sm.losses.DiceLoss(beta=1)(tf.constant(MASKS), tf.constant(PROBS)))
    ours = float(losses.soft_dice_loss(jnp.asarray(PROBS), jnp.asarray(MASKS), jnp.asarray(ONES)))
    assert ours == pytest.approx(expected, abs=1e-6)


def test_bce_dice_equals_segmentation_models(sm):
    import tensorflow as tf
    logits = RNG.normal(size=PROBS.shape).astype(np.float32) * 3
    probs = 1 / (1 + np.exp(-logits))
    expected = float(sm.losses.bce_dice_loss(tf.constant(MASKS), tf.constant(probs)))
    ours = float(losses.loss_from_logits("bce_dice", jnp.asarray(logits), jnp.asarray(MASKS),
                                         jnp.asarray(ONES)))
    assert ours == pytest.approx(expected, abs=1e-4)


def recipe_dice_coe(output, target, smooth=1e-10):
    """The recipe's metric, written out in numpy from its source."""
    output = (output > 0.5).astype(np.float32)
    target = (target > 0.5).astype(np.float32)
    inse = np.sum(output * target)
    return (2.0 * inse + smooth) / (np.sum(output) + np.sum(target) + smooth)


def test_thresholded_metrics_pinned():
    metrics = losses.thresholded_metrics(jnp.asarray(PROBS), jnp.asarray(MASKS), jnp.asarray(ONES))
    assert float(metrics["dice_coe"]) == pytest.approx(recipe_dice_coe(PROBS, MASKS), rel=1e-6)
    accuracy = np.mean((PROBS > 0.5) == (MASKS > 0.5))
    assert float(metrics["accuracy"]) == pytest.approx(accuracy, rel=1e-6)
    assert float(metrics["num_images"]) == 4


def test_per_image_dice_counts_empty_pairs_as_one():
    pred = np.zeros((3, 4, 4, 1), np.float32)
    true = np.zeros((3, 4, 4, 1), np.float32)
    pred[1, :2, :2] = 1.0          # 4 predicted pixels
    true[1, :2, :] = 1.0           # 8 true pixels, 4 shared -> 2*4/12
    true[2, 0, 0] = 1.0            # missed entirely -> 0
    metrics = losses.thresholded_metrics(jnp.asarray(pred), jnp.asarray(true),
                                         jnp.ones(3, jnp.float32))
    assert float(metrics["per_image_dice_sum"]) == pytest.approx(1.0 + 8 / 12 + 0.0)


def test_padding_weight_removes_examples():
    weights = np.array([1, 1, 0, 0], np.float32)
    padded = losses.thresholded_metrics(jnp.asarray(PROBS), jnp.asarray(MASKS),
                                        jnp.asarray(weights))
    real = losses.thresholded_metrics(jnp.asarray(PROBS[:2]), jnp.asarray(MASKS[:2]),
                                      jnp.ones(2, jnp.float32))
    for name in ("dice_coe", "accuracy", "per_image_dice_sum", "num_images"):
        assert float(padded[name]) == pytest.approx(float(real[name]), rel=1e-6)
    padded_loss = losses.soft_dice_loss(jnp.asarray(PROBS), jnp.asarray(MASKS),
                                        jnp.asarray(weights))
    real_loss = losses.soft_dice_loss(jnp.asarray(PROBS[:2]), jnp.asarray(MASKS[:2]),
                                      jnp.ones(2, jnp.float32))
    assert float(padded_loss) == pytest.approx(float(real_loss), rel=1e-6)


def test_device_sums_give_the_global_batch_value():
    """Summing per-device statistics before the ratio reproduces the one-device value."""
    mesh = jax.make_mesh((4,), ("batch",), devices=jax.devices()[:4])
    spec = jax.sharding.PartitionSpec("batch")

    def per_device(p, m, w):
        reduce = lambda x: jax.lax.psum(x, "batch")  # noqa: E731
        return losses.soft_dice_loss(p, m, w, reduce), losses.thresholded_metrics(p, m, w, reduce)

    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec),
                                    out_specs=jax.sharding.PartitionSpec()))
    placed = jax.device_put((PROBS, MASKS, ONES), jax.sharding.NamedSharding(mesh, spec))
    loss, metrics = sharded(*placed)
    assert float(loss) == pytest.approx(float(losses.soft_dice_loss(PROBS, MASKS, ONES)), rel=1e-6)
    single = losses.thresholded_metrics(PROBS, MASKS, ONES)
    for name in single:
        assert float(metrics[name]) == pytest.approx(float(single[name]), rel=1e-6)


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="config.loss"):
        losses.loss_from_logits("focal", jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)),
                                jnp.ones(1))
