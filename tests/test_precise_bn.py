"""Precise BatchNorm: the statistics it computes are the mean of the batches' own
statistics over every device, as numpy computes them from the layer's inputs."""
import jax
import flax.linen as nn
import numpy as np

from jaxseg import parallel, steps
from jaxseg.models.efficientnet import BatchNormActivation, ModuleDef


class _DenseNorm(nn.Module):
    """A Dense layer whose outputs one BatchNorm normalises: statistics numpy can check."""
    norm: ModuleDef = BatchNormActivation

    @nn.compact
    def __call__(self, images, train, freeze_encoder=False):
        features = nn.Dense(2, name="dense")(images / 255.0)
        return self.norm(activation=None, axis_name=parallel.AXIS, name="bn")(features,
                                                                               not train)


def test_statistics_are_the_mean_of_each_batchs_statistics_over_all_devices():
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (4, 6, 6, 3), np.uint8),
                "mask": np.zeros((4, 6, 6, 1), np.uint8)} for _ in range(3)]
    model = _DenseNorm()
    variables = jax.device_get(model.init(jax.random.PRNGKey(1), np.zeros((1, 6, 6, 3)),
                                          train=False))
    mesh = parallel.make_mesh(jax.devices()[:2])
    statistics_fn = steps.CompiledSteps(model, "dice", mesh).batch_norm_statistics(False)
    accumulated = parallel.replicate(jax.tree.map(np.zeros_like, variables["batch_stats"]),
                                     mesh)
    placed = parallel.replicate(variables, mesh)
    for index, batch in enumerate(batches):
        accumulated = statistics_fn(placed, parallel.to_global_batch(batch, mesh), accumulated,
                                    np.int32(index), np.float32(1 / 3))
    kernel, bias = (variables["params"]["dense"][name] for name in ("kernel", "bias"))
    features = [batch["image"].astype(np.float64) / 255 @ kernel + bias for batch in batches]
    expected_mean = np.mean([f.mean(axis=(0, 1, 2)) for f in features], axis=0)
    expected_var = np.mean([f.var(axis=(0, 1, 2)) for f in features], axis=0)
    result = jax.device_get(accumulated)["bn"]
    np.testing.assert_allclose(result["mean"], expected_mean, rtol=1e-5)
    np.testing.assert_allclose(result["var"], expected_var, rtol=1e-4)
    # The moving averages the recipe keeps would be 1% of the way there.
    assert not np.allclose(variables["batch_stats"]["bn"]["mean"], expected_mean, rtol=0.1)
