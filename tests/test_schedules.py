"""The learning rate of each step: the cosine schedule is optax's, the plateau rate is
the controller's, unchanged."""
import numpy as np
import optax
import pytest

from jaxseg import schedules
from jaxseg.configs import default

STEPS_PER_EPOCH, EPOCHS = 7, 5


def _config(**fields):
    config = default.get_config()
    config.update(epochs=EPOCHS, learning_rate=3e-4, min_learning_rate=1e-6, **fields)
    return config


@pytest.mark.parametrize("warmup_epochs", [0.0, 0.5, 2.25])
def test_cosine_rates_are_optaxs_warmup_cosine_decay_schedule(warmup_epochs):
    config = _config(lr_schedule="cosine", warmup_epochs=warmup_epochs)
    rates = np.concatenate([schedules.epoch_learning_rates(config, epoch, STEPS_PER_EPOCH,
                                                           plateau_lr=1.0)
                            for epoch in range(EPOCHS)])
    truth = optax.warmup_cosine_decay_schedule(
        0.0, 3e-4, round(warmup_epochs * STEPS_PER_EPOCH), EPOCHS * STEPS_PER_EPOCH, 1e-6)
    np.testing.assert_allclose(rates, [float(truth(step)) for step in range(len(rates))],
                               rtol=1e-5, atol=1e-12)
    # After the last step, where a finished run's next epoch would start.
    assert schedules.cosine_rate(config, EPOCHS * STEPS_PER_EPOCH, STEPS_PER_EPOCH) == 1e-6


def test_plateau_rate_holds_for_the_whole_epoch():
    rates = schedules.epoch_learning_rates(_config(), 3, STEPS_PER_EPOCH, plateau_lr=2.5e-5)
    assert rates.tolist() == [2.5e-5] * STEPS_PER_EPOCH
