"""Loss and metrics against segmentation_models' DiceLoss, the recipe's dice_coe and the
Lovasz hinge's definition (Berman et al. 2018)."""
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
    with pytest.raises(ValueError, match="config.loss: unknown loss 'focal', expected one of "
                                         "dice, bce_dice, lovasz, bce_lovasz"):
        losses.loss_from_logits("focal", jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)),
                                jnp.ones(1))


def _vertex_logits(mask, mispredicted):
    """Logits whose hinge errors are 1 on `mispredicted` (logit 0) and 0 elsewhere (logit
    = the pixel's sign), so the prediction is a vertex of the Lovasz extension."""
    return np.where(mispredicted, 0.0, 2.0 * mask - 1.0).astype(np.float32)


def test_lovasz_hinge_at_vertices_is_the_jaccard_loss():
    """At a 0/1 error vector the Lovasz extension equals the set function it extends: the
    Jaccard loss |M| / |truth ∪ M| of the mispredicted set M (0 when both are empty)."""
    rng = np.random.default_rng(7)
    cases = [(rng.uniform(size=(12, 12, 1)) > 0.6, rng.uniform(size=(12, 12, 1)) > 0.8)
             for _ in range(4)]
    empty = np.zeros((12, 12, 1), bool)
    cases += [(empty, empty),                                 # all background, all right
              (empty, rng.uniform(size=(12, 12, 1)) > 0.9),    # all background, some wrong
              (cases[0][0], empty)]                            # glomeruli, all right
    for mask, mispredicted in cases:
        logits = _vertex_logits(mask.astype(np.float32), mispredicted)
        union = np.sum(mask | mispredicted)
        expected = np.sum(mispredicted) / union if union else 0.0
        ours = losses.lovasz_hinge(jnp.asarray(logits[None]), jnp.asarray(mask[None], jnp.float32),
                                   jnp.ones(1, jnp.float32))
        assert float(ours) == pytest.approx(expected, abs=1e-6)


def reference_lovasz_hinge(logits, mask):
    """One image's Lovasz hinge, written plainly in float64 from the paper's Algorithm 1:
    sort the hinge errors in decreasing order, and weight each by the increase of the
    Jaccard loss when its pixel joins the mispredicted set."""
    labels = mask.ravel().astype(np.float64)
    errors = 1.0 - logits.ravel().astype(np.float64) * (2.0 * labels - 1.0)
    order = np.argsort(-errors, kind="stable")
    truth = labels.sum()
    loss, previous_jaccard, seen_foreground, seen_background = 0.0, 0.0, 0.0, 0.0
    for pixel in order:
        seen_foreground += labels[pixel]
        seen_background += 1.0 - labels[pixel]
        jaccard = 1.0 - (truth - seen_foreground) / (truth + seen_background)
        loss += max(errors[pixel], 0.0) * (jaccard - previous_jaccard)
        previous_jaccard = jaccard
    return loss


def _lovasz_batch(seed, size=6):
    """Random logits and masks of varied foreground share, one image all background."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(size, 16, 16, 1)) * 2).astype(np.float32)
    share = rng.uniform(0.05, 0.6, size=(size, 1, 1, 1))
    masks = (rng.uniform(size=(size, 16, 16, 1)) < share).astype(np.float32)
    masks[1] = 0.0
    return logits, masks


def test_lovasz_hinge_equals_the_reference_algorithm_over_real_images():
    logits, masks = _lovasz_batch(3)
    weights = np.array([1, 1, 1, 1, 0, 0], np.float32)   # the last two are padding
    expected = np.mean([reference_lovasz_hinge(logits[i], masks[i]) for i in range(4)])
    args = jnp.asarray(logits), jnp.asarray(masks), jnp.asarray(weights)
    assert float(losses.lovasz_hinge(*args)) == pytest.approx(expected, abs=1e-5)
    assert float(losses.loss_from_logits("lovasz", *args)) == pytest.approx(expected, abs=1e-5)
    real = logits[:4].astype(np.float64), masks[:4]
    bce = np.mean(np.maximum(real[0], 0) - real[0] * real[1] + np.log1p(np.exp(-np.abs(real[0]))))
    assert float(losses.loss_from_logits("bce_lovasz", *args)) == pytest.approx(expected + bce,
                                                                                abs=1e-5)


def test_lovasz_device_sums_give_the_global_batch_value():
    """Eight devices, one image each (two of them padding), give the one-device loss."""
    logits, masks = _lovasz_batch(5, size=8)
    weights = np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float32)
    mesh = jax.make_mesh((8,), ("batch",), devices=jax.devices()[:8])
    spec = jax.sharding.PartitionSpec("batch")

    def per_device(x, m, w):
        reduce = lambda v: jax.lax.psum(v, "batch")  # noqa: E731
        return (losses.lovasz_hinge(x, m, w, reduce),
                losses.loss_from_logits("bce_lovasz", x, m, w, reduce))

    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec),
                                    out_specs=jax.sharding.PartitionSpec()))
    placed = jax.device_put((logits, masks, weights), jax.sharding.NamedSharding(mesh, spec))
    lovasz, bce_lovasz = sharded(*placed)
    assert float(lovasz) == pytest.approx(float(losses.lovasz_hinge(logits, masks, weights)),
                                          rel=1e-6)
    assert float(bce_lovasz) == pytest.approx(
        float(losses.loss_from_logits("bce_lovasz", logits, masks, weights)), rel=1e-6)


def test_lovasz_gradient_is_finite_and_reaches_only_real_images():
    logits, masks = _lovasz_batch(9)
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)
    grad = np.asarray(jax.grad(losses.lovasz_hinge)(jnp.asarray(logits), jnp.asarray(masks),
                                                    jnp.asarray(weights)))
    assert np.all(np.isfinite(grad))
    assert np.all(np.any(grad[:5] != 0, axis=(1, 2, 3)))   # every real image moves
    assert np.all(grad[5] == 0)                            # padding does not
