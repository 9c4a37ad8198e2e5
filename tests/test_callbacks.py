"""The host-side controllers take the same decisions as the real tf.keras callbacks."""
import dataclasses

import numpy as np
import pytest

from jaxseg.callbacks import EarlyStopping, EarlyStoppingState, PlateauState, ReduceLROnPlateau

tf_keras = pytest.importorskip("tf_keras")

RNG = np.random.default_rng(0)
SEQUENCES = {
    "flat": [0.5] * 40,
    "improving_then_flat": [1.0 - 0.01 * i for i in range(10)] + [0.9] * 30,
    "tiny_improvements": [0.5 - 0.00005 * i for i in range(40)],
    "noisy": list(0.6 + 0.05 * RNG.standard_normal(40)),
    "up_down": [0.5, 0.4, 0.45, 0.39, 0.41] * 8,
}


def keras_model(lr: float):
    model = tf_keras.Sequential([tf_keras.layers.Dense(1, input_shape=(1,))])
    model.compile(optimizer=tf_keras.optimizers.Adam(learning_rate=lr), loss="mse")
    return model


@pytest.mark.parametrize("name", sorted(SEQUENCES))
@pytest.mark.parametrize("patience,cooldown", [(8, 0), (3, 0), (2, 2)])
def test_plateau_matches_keras(name, patience, cooldown):
    values = SEQUENCES[name]
    model = keras_model(2.5e-4)
    keras_cb = tf_keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", factor=0.1, patience=patience, min_lr=1e-5, cooldown=cooldown)
    keras_cb.set_model(model)
    keras_cb.on_train_begin()
    ours = ReduceLROnPlateau(factor=0.1, patience=patience, min_lr=1e-5, cooldown=cooldown)
    lr = 2.5e-4
    keras_lrs, our_lrs = [], []
    for epoch, value in enumerate(values):
        keras_cb.on_epoch_end(epoch, {"val_loss": value})
        keras_lrs.append(float(tf_keras.backend.get_value(model.optimizer.lr)))
        lr = ours.update(value, lr)
        our_lrs.append(lr)
    np.testing.assert_allclose(our_lrs, keras_lrs, rtol=1e-6)


def test_plateau_cuts_at_patience_and_stops_at_min_lr():
    plateau = ReduceLROnPlateau(factor=0.1, patience=8, min_lr=1e-5)
    lr, lrs = 2.5e-4, []
    for value in [1.0] + [1.0] * 30:
        lr = plateau.update(value, lr)
        lrs.append(lr)
    assert lrs[7] == 2.5e-4 and lrs[8] == pytest.approx(2.5e-5)
    assert lrs[16] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-5)


@pytest.mark.parametrize("name", sorted(SEQUENCES))
@pytest.mark.parametrize("patience", [15, 3, 1])
def test_early_stopping_matches_keras(name, patience):
    dice = [1.0 - v for v in SEQUENCES[name]]
    model = keras_model(1e-3)
    keras_cb = tf_keras.callbacks.EarlyStopping(monitor="val_dice_coe", mode="max",
                                                patience=patience, restore_best_weights=True)
    keras_cb.set_model(model)
    keras_cb.on_train_begin()
    ours = EarlyStopping(patience=patience)
    for epoch, value in enumerate(dice):
        keras_cb.on_epoch_end(epoch, {"val_dice_coe": value})
        improved, stop = ours.update(epoch, value)
        assert stop == bool(model.stop_training), (epoch, value)
        assert ours.state.best_epoch == keras_cb.best_epoch
        if stop:
            break


def test_state_round_trip_continues_identically():
    values = SEQUENCES["noisy"]
    whole, split = ReduceLROnPlateau(patience=3), ReduceLROnPlateau(patience=3)
    lr_whole = lr_split = 1e-3
    for value in values[:17]:
        lr_whole = whole.update(value, lr_whole)
        lr_split = split.update(value, lr_split)
    resumed = ReduceLROnPlateau(patience=3,
                                state=PlateauState(**dataclasses.asdict(split.state)))
    for value in values[17:]:
        lr_whole = whole.update(value, lr_whole)
        lr_split = resumed.update(value, lr_split)
        assert lr_split == lr_whole
    stop_a, stop_b = EarlyStopping(patience=4), EarlyStopping(patience=4)
    for epoch, value in enumerate(values[:10]):
        stop_a.update(epoch, value)
        stop_b.update(epoch, value)
    stop_c = EarlyStopping(patience=4,
                           state=EarlyStoppingState(**dataclasses.asdict(stop_b.state)))
    for epoch, value in enumerate(values[10:], start=10):
        assert stop_a.update(epoch, value) == stop_c.update(epoch, value)
