"""The train loop end to end on tiny records, and the data-parallel step's exactness."""
import contextlib
import functools
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg import (checkpoints, cli, colour, data, models, parallel, predict, processes, records,
                    steps, thresholds, train, warp)
from jaxseg.ensembles import load_ensemble
from jaxseg.progress import HISTORY_KEYS
from jaxseg.configs import cpu as cpu_config

SIZE = 64


def toy_tiles(count: int, seed: int):
    """Bright discs on darker tissue-like noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for _ in range(count):
        image = rng.integers(60, 120, (SIZE, SIZE, 3)).astype(np.uint8)
        cy, cx, r = rng.integers(12, SIZE - 12, 2).tolist() + [int(rng.integers(5, 10))]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[mask] = np.clip(image[mask].astype(int) + 110, 0, 255).astype(np.uint8)
        yield image, mask


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    for index, count in enumerate([8, 8, 8, 12]):
        records.write_records(out, f"slide{index}", toy_tiles(count, index))
    return out


def tiny_config(data_dir, **overrides):
    config = cpu_config.get_config()
    config.data_dir = str(data_dir)
    config.image_size = SIZE
    config.epochs = 2
    config.num_folds = 2
    config.per_device_batch_size = 1
    config.learning_rate = 1e-3
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


# Precise BatchNorm on, so that the run covers it too (tests/test_precise_bn.py checks its
# statistics); reruns in the run's workdir must keep it.
FINISHED_RUN = dict(precise_bn_batches=2)


@pytest.fixture(scope="module")
def finished_run(record_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    summary = train.train_and_evaluate(tiny_config(record_dir, **FINISHED_RUN), workdir)
    return workdir, summary


def test_run_writes_every_artefact(finished_run, record_dir):
    workdir, summary = finished_run
    assert json.loads((workdir / "config.json").read_text())["backbone"] == "efficientnetb0"
    files = data.list_record_files(str(record_dir))
    expected_splits = data.kfold_splits(files, 2, 0)
    for fold in (0, 1):
        fold_dir = workdir / f"fold_{fold}"
        for name in ("history.json", "curves.png", "result.json", "train_files.txt",
                     "val_files.txt"):
            assert (fold_dir / name).is_file(), name
        assert any((fold_dir / "tensorboard").iterdir())
        assert any((fold_dir / "best").iterdir()) and any((fold_dir / "latest").iterdir())
        history = json.loads((fold_dir / "history.json").read_text())
        assert history["epoch"] == [1, 2]
        for key in HISTORY_KEYS:
            assert len(history[key]) == 2, key
        train_files, val_files = expected_splits[fold]
        assert (fold_dir / "train_files.txt").read_text().split() == train_files
        assert (fold_dir / "val_files.txt").read_text().split() == val_files
        result = summary["folds"][str(fold)]
        assert result["num_val_examples"] == sum(records.count_from_name(f) for f in val_files)
        assert result["best_val_dice_coe"] == max(history["val_dice_coe"])
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk["mean_best_val_dice_coe"] == pytest.approx(
        np.mean([summary["folds"][f]["best_val_dice_coe"] for f in ("0", "1")]))


def _tensorboard_events(fold_dir) -> dict[str, dict[int, object]]:
    """{tag: {epoch: scalar or decoded uint8 image list}} from a fold's event files."""
    import tensorflow as tf
    events: dict = {}
    for path in (fold_dir / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                events.setdefault(value.tag, {})[event.step] = (
                    [tf.io.decode_png(png).numpy() for png in tensor[2:]]
                    if value.metadata.plugin_data.plugin_name == "images" else float(tensor))
    return events


def test_tensorboard_gets_scalars_and_validation_predictions_every_epoch(finished_run,
                                                                          record_dir):
    workdir, _ = finished_run
    fold_dir = workdir / "fold_0"
    events = _tensorboard_events(fold_dir)
    history = json.loads((fold_dir / "history.json").read_text())
    assert [events["val_dice_coe"][epoch] for epoch in (1, 2)] == pytest.approx(
        history["val_dice_coe"])
    assert events["images_per_second"][2] > 0
    first_val_file = (fold_dir / "val_files.txt").read_text().split()[0]
    first = next(data.validation_batches([first_val_file], image_size=SIZE, batch_size=1))
    image, mask = first["image"][0], first["mask"][0]
    for epoch in (1, 2):
        panels = events["validation"][epoch]
        assert 1 <= len(panels) <= tiny_config(record_dir).tensorboard_images
        assert panels[0].shape == (SIZE, 3 * SIZE, 3)
        np.testing.assert_array_equal(panels[0][:, :SIZE], image)
        np.testing.assert_array_equal(panels[0][:, SIZE:2 * SIZE], np.repeat(mask * 255, 3, -1))
        prediction = panels[0][:, 2 * SIZE:]
        assert (prediction == prediction[..., :1]).all()  # a grey probability map


def test_each_step_program_compiles_once_for_all_folds(finished_run):
    _, summary = finished_run
    compiles = summary["compile_seconds"]
    assert len(compiles["jit(train_step)"]) == 1, compiles
    assert len(compiles["jit(eval_step)"]) == 1, compiles
    assert len(compiles["jit(create_train_state)"]) == 1, compiles
    assert len(compiles["jit(batch_norm_statistics_step)"]) == 1, compiles


def test_each_fold_chooses_its_threshold_on_its_validation_tiles(finished_run):
    """The best model's Dice per tile at each threshold; at 0.5 it is the best epoch's
    val_per_image_dice (the same model, the same tiles), and predict --threshold=run
    takes the folds' mean."""
    workdir, summary = finished_run
    for fold in ("0", "1"):
        result = summary["folds"][fold]
        curve = result["val_per_image_dice_by_threshold"]
        assert list(curve) == [str(t) for t in thresholds.THRESHOLDS]
        assert result["threshold"] == thresholds.THRESHOLDS[int(np.argmax(list(curve.values())))]
        assert curve["0.5"] == pytest.approx(result["val_per_image_dice"], abs=1e-5)
    ensemble = load_ensemble(str(workdir))
    expected = np.mean([summary["folds"][f]["threshold"] for f in ("0", "1")])
    assert predict.chosen_threshold("run", ensemble) == pytest.approx(expected)
    assert predict.chosen_threshold("0.3", ensemble) == 0.3
    for bad in ("1.5", "0", "half"):
        with pytest.raises(cli.InputError, match=f"--threshold must be a probability in "
                           f"\\(0, 1\\) or 'run', got '{bad}'"):
            predict.chosen_threshold(bad, ensemble)


def test_finished_folds_are_not_retrained(finished_run, record_dir, capsys):
    workdir, summary = finished_run
    again = train.train_and_evaluate(tiny_config(record_dir, **FINISHED_RUN), workdir)
    assert "finished earlier" in capsys.readouterr().out
    assert again["folds"] == summary["folds"]


def test_layer_implementation_may_change_on_resume(finished_run, record_dir, capsys):
    """They never change results; runs from before these fields lack them in config.json."""
    workdir, summary = finished_run
    config_path = workdir / "config.json"
    saved = json.loads(config_path.read_text())
    for field in (*models.IMPL_FIELDS, "remat"):
        del saved[field]
    config_path.write_text(json.dumps(saved))
    again = train.train_and_evaluate(
        tiny_config(record_dir, conv_impl="native", remat=False, **FINISHED_RUN), workdir)
    assert "finished earlier" in capsys.readouterr().out
    assert again["folds"] == summary["folds"]


def test_changed_config_in_same_workdir_is_refused(finished_run, record_dir):
    workdir, _ = finished_run
    with pytest.raises(ValueError, match="config.image_size"):
        train.train_and_evaluate(tiny_config(record_dir, image_size=96, **FINISHED_RUN),
                                 workdir)


def test_a_record_file_cut_at_a_record_boundary_stops_the_run_first(record_dir, tmp_path):
    """slide1 is one of fold 0's training files: the cut copy reads cleanly and training
    repeats its dataset, so without the count check the run would train on 5 of its 8
    tiles and say nothing."""
    data_dir = tmp_path / "records"
    shutil.copytree(record_dir, data_dir)
    cut = data_dir / "slide1-8.tfrec"
    assert str(cut) in data.kfold_splits(data.list_record_files(data_dir), 2, 0)[0][0]
    raw = cut.read_bytes()
    cut.write_bytes(raw[:len(raw) // 8 * 5])
    with pytest.raises(ValueError, match=f"^{cut}: holds 5 records, its name promises 8"):
        train.train_and_evaluate(tiny_config(data_dir, folds="0"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_more_folds_than_files_is_a_clear_error(record_dir, tmp_path):
    with pytest.raises(ValueError, match="fold"):
        train.train_and_evaluate(tiny_config(record_dir, num_folds=5), tmp_path / "run")


def compiled_step(model, variables, batch, num_devices, tx, freeze_encoder=False,
                  ema_decay=0.0):
    """The data-parallel train step over the first `num_devices` devices, its initial
    state and the batch placed on them, as the train loop builds them."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), (parallel.AXIS,))
    step = parallel.data_parallel(
        functools.partial(steps.train_step, model=model, tx=tx, loss_name="dice",
                          freeze_encoder=freeze_encoder, ema_decay=ema_decay),
        mesh, num_args=3, batch_args=(1,), donate_args=(0,))
    state = parallel.replicate(steps.create_train_state(variables, tx, 0, ema=ema_decay > 0),
                               mesh)
    return step, state, parallel.to_global_batch(batch, mesh)


def toy_batch(count, seed):
    """A validation-like batch as it crosses to the device: uint8 pixels and masks."""
    tiles = list(toy_tiles(count, seed))
    return {"image": np.stack([t[0] for t in tiles]),
            "mask": np.stack([t[1] for t in tiles])[..., None].astype(np.uint8)}


def init_variables(model):
    return jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)),
                                     train=False))


def one_step(model, variables, batch, num_devices):
    """One plain gradient step (identity transform, learning rate 1): the parameter change
    is the gradient itself, which Adam's first step would flatten to +-lr."""
    step, state, placed = compiled_step(model, variables, batch, num_devices, optax.identity())
    state, metrics = step(state, placed, np.float32(1.0))
    return jax.device_get((state.params, state.batch_stats, metrics))


def test_eight_devices_equal_one_device():
    """Synchronised BatchNorm plus the device-summed Dice make an 8-way step the same
    computation as the whole global batch on one device."""
    model = models.build_model({"backbone": "efficientnetb0", "drop_connect_rate": 0.0},
                               bn_axis_name=parallel.AXIS)
    variables = init_variables(model)
    batch = toy_batch(8, 99)
    on_one = one_step(model, variables, batch, 1)
    on_eight = one_step(model, variables, batch, 8)
    gradients = [jax.tree.map(np.subtract, variables["params"], run[0]) for run in (on_one, on_eight)]
    for one, eight in zip(jax.tree.leaves(gradients[0]), jax.tree.leaves(gradients[1])):
        scale = max(float(np.abs(one).max()), 1e-6)
        np.testing.assert_allclose(eight, one, atol=1e-2 * scale)  # float32 noise ~1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                 on_one[1:], on_eight[1:])
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(gradients[0])) > 1e-4


def test_loss_falls_on_a_learnable_toy_set():
    model = models.build_model({"backbone": "efficientnetb0"}, bn_axis_name=parallel.AXIS)
    step, state, batch = compiled_step(model, init_variables(model), toy_batch(8, 5), 1,
                                       steps.make_optimizer())
    losses = []
    for _ in range(15):
        state, metrics = step(state, batch, np.float32(3e-3))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses


def test_frozen_encoder_keeps_weights_and_statistics():
    model = models.build_model({"backbone": "efficientnetb0"}, bn_axis_name=parallel.AXIS)
    variables = init_variables(model)
    step, state, batch = compiled_step(model, variables, toy_batch(2, 7), 2,
                                       steps.make_optimizer(), freeze_encoder=True)
    state, _ = step(state, batch, np.float32(1e-2))
    after = jax.device_get(state)
    jax.tree.map(np.testing.assert_array_equal, after.params["encoder"],
                 variables["params"]["encoder"])
    jax.tree.map(np.testing.assert_array_equal, after.batch_stats["encoder"],
                 variables["batch_stats"]["encoder"])
    decoder_moved = [float(np.abs(a - b).max()) for name in after.params if name != "encoder"
                     for a, b in zip(jax.tree.leaves(after.params[name]),
                                     jax.tree.leaves(variables["params"][name]))]
    assert max(decoder_moved) > 0


class _PixelModel(nn.Module):
    """Logits linear in each pixel's colour: a step whose gradient sees every pixel."""

    @nn.compact
    def __call__(self, images, train, freeze_encoder=False):
        return nn.Dense(1)(images / 255.0)


def test_train_step_colours_uint8_images_as_the_host_would_before_sending_floats():
    """Images cross as uint8 with colour factors (the recipe's, a hue shift, a stain
    jitter, none); the step's result is that of the same jitter applied to float images
    on the host and sent as they are."""
    batch = toy_batch(4, 11)
    factors = np.tile(np.array(colour.IDENTITY, np.float32), (4, 1))
    factors[:3, :colour.HUE] = [[1.3, 1.0, 0.8], [1.0, 1.2, 1.0], [0.7, 0.9, 1.25]]
    factors[1, colour.HUE] = 0.1
    factors[2, colour.HED_SCALE], factors[2, colour.HED_SHIFT] = [1.1, 0.9, 1.0], [0.05, 0, -0.02]
    batch["colour_factors"] = factors
    jittered = {"image": np.asarray(colour.jitter(batch["image"], batch["colour_factors"])),
                "mask": batch["mask"].astype(np.float32)}
    model = _PixelModel()
    variables = {"batch_stats": {},
                 **model.init(jax.random.PRNGKey(0), jittered["image"][:1], train=False)}
    results = [one_step(model, variables, sent, 2) for sent in (batch, jittered)]
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 *results)
    assert results[0][2]["loss"] != one_step(model, variables, toy_batch(4, 11), 2)[2]["loss"]


def test_train_step_warps_images_and_masks_as_the_host_would_before_sending_floats():
    """A shift-scale-rotate drawn for some examples moves image and mask inside the step
    exactly as `warp.shift_scale_rotate` on the host followed by sending floats."""
    batch = toy_batch(4, 12)
    params = np.tile(np.array(warp.IDENTITY, np.float32), (4, 1))
    params[0], params[2] = (25.0, 1.1, 0.05, 0.0), (-60.0, 0.9, 0.0, -0.1)
    batch["warp"] = params
    images, masks = warp.shift_scale_rotate(batch["image"].astype(np.float32),
                                            batch["mask"].astype(np.float32), params)
    warped = {"image": np.asarray(images), "mask": np.asarray(masks)}
    assert not np.array_equal(warped["mask"], batch["mask"])
    model = _PixelModel()
    variables = {"batch_stats": {},
                 **model.init(jax.random.PRNGKey(0), warped["image"][:1], train=False)}
    results = [one_step(model, variables, sent, 2) for sent in (batch, warped)]
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 *results)
    assert results[0][2]["loss"] != one_step(model, variables, toy_batch(4, 12), 2)[2]["loss"]


class _StopAfter:
    """A preemption watch whose notice arrives after the given step."""

    def __init__(self, step: int | None):
        self.step, self.calls = step, 0

    def stop_after_step(self) -> bool:
        self.calls += 1
        return self.calls == self.step


def _run_epoch(monkeypatch, losses, metrics_every, stop_after=None):
    """train_epoch over fake steps whose loss is losses[k] at step k; returns (result,
    progress, reads): reads holds, for each time the host read metrics back, how many steps
    had been queued then and how many steps it read."""
    mesh = parallel.make_mesh()
    queued, reads = [0], []
    device_get = jax.device_get

    def step_fn(state, batch, learning_rate):
        queued[0] += 1
        value = jnp.mean(batch["image"]) * 0 + losses[queued[0] - 1]
        return state + 1, {"loss": value, "dice_coe": value / 10, "accuracy": value / 100}

    def counted_device_get(tree):
        reads.append((queued[0], len(tree)))
        return device_get(tree)

    monkeypatch.setattr(jax, "device_get", counted_device_get)
    batches = ({"image": np.zeros((jax.device_count(), 2, 2, 3), np.float32)}
               for _ in losses)
    fold_data = data.FoldData(0, [], [], len(losses), 1, 8, 8)
    progress = train.EpochProgress()
    result = train.train_epoch(
        jnp.zeros(()), step_fn, batches, np.full(len(losses), 1e-3), fold_data, 0, 1, mesh,
        "nothing saved", progress, _StopAfter(stop_after), prefetch=2,
        metrics_every=metrics_every)
    return result, progress, reads


@pytest.mark.parametrize("metrics_every", [1, 3, 10])
def test_epoch_reads_metrics_back_in_groups_after_queuing_the_next_step(monkeypatch,
                                                                         metrics_every):
    losses = [0.5, 0.25, 1.0, 2.0, 4.0, 0.125, 8.0]
    (state, preempted), progress, reads = _run_epoch(monkeypatch, losses, metrics_every)
    assert int(state) == 7 and not preempted
    assert progress.steps_done == 7
    assert progress.totals == pytest.approx({"loss": 15.875, "dice_coe": 1.5875,
                                             "accuracy": 0.15875})
    # Every group but the last is read once the step after it is queued.
    expected, read = [], 0
    while read < 7:
        group = min(metrics_every, 7 - read)
        read += group
        expected.append((min(read + 1, 7), group))
    assert reads == expected


def test_a_nan_loss_names_its_step_though_read_late(monkeypatch):
    losses = [0.5, 0.5, 0.5, 0.5, float("nan"), 0.5, 0.5]
    with pytest.raises(cli.Diverged, match="fold 0, epoch 1, step 5: loss is nan"):
        _run_epoch(monkeypatch, losses, metrics_every=3)


def test_preemption_reads_every_step_it_ran(monkeypatch):
    (state, preempted), progress, _ = _run_epoch(monkeypatch, [1.0] * 7, metrics_every=3,
                                                 stop_after=4)
    assert preempted and int(state) == 4 and progress.steps_done == 4
    assert progress.totals["loss"] == 4.0


@pytest.mark.parametrize("metrics_every, expected_reads", [(10, [3]), (2, [2, 1]),
                                                           (1, [1, 1, 1])])
def test_validation_reads_its_metrics_back_in_groups(monkeypatch, metrics_every,
                                                     expected_reads):
    mesh = parallel.make_mesh()
    reads = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda tree: reads.append(len(tree)) or
                        device_get(tree))

    def eval_fn(variables, batch):
        value = jnp.mean(batch["image"])
        return {"loss": value, "dice_coe": value, "accuracy": value,
                "num_images": jnp.max(batch["count"]),
                "per_image_dice_sum": value * 2}, batch["image"]

    batches = ({"image": np.full((8, 2, 2, 3), value, np.float32),
                "count": np.full(8, count, np.float32)}
               for value, count in [(0.5, 8), (0.25, 8), (1.0, 3)])
    metrics, (first_batch, _) = train.validate({}, eval_fn, batches, mesh, prefetch=1,
                                               metrics_every=metrics_every, num_batches=3)
    assert reads == expected_reads
    assert (np.asarray(first_batch["image"]) == 0.5).all()
    assert metrics["num_val_examples"] == 19
    assert metrics["val_loss"] == pytest.approx((8 * 0.5 + 8 * 0.25 + 3 * 1.0) / 19)
    assert metrics["val_per_image_dice"] == pytest.approx((1.0 + 0.5 + 2.0) / 19)


# --- Weight EMA and the cosine schedule --------------------------------------------------

def test_ema_update_moves_like_tensorflows_exponential_moving_average():
    """Through the warm-up (decay (1 + n) / (10 + n) below 0.7 up to step 20) and after."""
    import tensorflow as tf
    trajectory = np.random.default_rng(3).normal(size=(30, 5)).astype(np.float32)
    variable = tf.Variable(trajectory[0])
    num_updates = tf.Variable(0, dtype=tf.int64)
    truth = tf.train.ExponentialMovingAverage(0.7, num_updates=num_updates)
    truth.apply([variable])  # the shadow starts at the initial value
    average = {"w": trajectory[0]}
    for step, value in enumerate(trajectory[1:], start=1):
        variable.assign(value)
        num_updates.assign(step)
        truth.apply([variable])
        average = steps.ema_update(average, {"w": value}, 0.7, jnp.int32(step))
        np.testing.assert_allclose(average["w"], truth.average(variable).numpy(), rtol=1e-6)


def test_ema_is_the_average_of_the_trajectory_and_leaves_training_as_it_was():
    """Five Adam steps with and without EMA: the same parameters, optimiser state and
    metrics, a state without EMA of the fields checkpoints held before EMA existed, and
    an average equal to numpy's over the parameters after each step."""
    batch = toy_batch(4, 13)
    model = _PixelModel()
    variables = {"batch_stats": {}, **model.init(jax.random.PRNGKey(0),
                                                 batch["image"][:1].astype(np.float32),
                                                 train=False)}
    runs = {}
    for decay in (0.0, 0.3):
        step, state, placed = compiled_step(model, variables, batch, 2, steps.make_optimizer(),
                                            ema_decay=decay)
        trajectory, outputs = [], []
        for _ in range(5):
            state, metrics = step(state, placed, np.float32(0.05))
            trajectory.append(jax.device_get(state.params))
            outputs.append(metrics)
        runs[decay] = jax.device_get(state), trajectory, jax.device_get(outputs)
    (off, _, off_metrics), (on, trajectory, on_metrics) = runs[0.0], runs[0.3]
    assert type(off) is steps.TrainState and type(on) is steps.EmaTrainState
    jax.tree.map(np.testing.assert_array_equal,
                 (off.step, off.params, off.batch_stats, off.opt_state, off.rng, off_metrics),
                 (on.step, on.params, on.batch_stats, on.opt_state, on.rng, on_metrics))
    expected = jax.tree.map(np.float64, jax.device_get(variables["params"]))
    for count, params in enumerate(trajectory, start=1):
        keep = min(0.3, (1 + count) / (10 + count))  # the warm-up rules the first two
        expected = jax.tree.map(lambda mean, value: keep * mean + (1 - keep) * value,
                                expected, params)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                 on.ema_params, expected)
    assert on.variables["params"] is on.ema_params and off.variables["params"] is off.params
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(on.ema_params),
                                                    jax.tree.leaves(on.params)))


# Weight EMA, the cosine schedule (a 2-step warm-up, then 6 steps of cosine) and precise
# BatchNorm of the averaged weights, one fold of two 4-step epochs in deterministic order;
# with the Lovasz hinge and every augmentation that is off by default.
EVERY_OPTION_RUN = dict(folds="0", steps_per_epoch=4, deterministic=True, ema_decay=0.9,
                      lr_schedule="cosine", warmup_epochs=0.5, precise_bn_batches=1,
                      loss="bce_lovasz")
EVERY_AUGMENTATION = dict(hed_prob=0.5, hue_prob=0.5, shift_scale_rotate_prob=0.5,
                          blur_prob=0.5, noise_prob=0.5)


def test_run_with_every_option_resumed_mid_epoch_ends_like_an_uninterrupted_one(
        record_dir, tmp_path, monkeypatch):
    """The run stopped by a preemption notice after step 2 of epoch 2, then run again,
    ends with the same state (average included) and history as the run left alone; the
    history's rates are optax's schedule at each epoch's first step; `best/` holds the
    averaged weights, with the statistics precise BatchNorm computed for them."""
    config = tiny_config(record_dir, **EVERY_OPTION_RUN)
    config.augment.update(EVERY_AUGMENTATION)
    states = {}  # (run, epochs done) -> the state each latest checkpoint saved
    save_latest = checkpoints.FoldCheckpoints.save_latest

    def recording_save_latest(self, epochs_done, state, host_state):
        states[self.fold_dir.parent.name, epochs_done] = jax.device_get(state)
        save_latest(self, epochs_done, state, host_state)

    monkeypatch.setattr(checkpoints.FoldCheckpoints, "save_latest", recording_save_latest)
    train.train_and_evaluate(config, tmp_path / "uninterrupted")
    watch = processes.PreemptionWatch
    monkeypatch.setattr(processes, "PreemptionWatch",
                        lambda mesh: contextlib.nullcontext(_StopAfter(6)))
    with pytest.raises(train.Preempted, match="at fold 0 epoch 2 step 2;"):
        train.train_and_evaluate(config, tmp_path / "preempted")
    monkeypatch.setattr(processes, "PreemptionWatch", watch)
    train.train_and_evaluate(config, tmp_path / "preempted")

    final, reference = states["preempted", 2], states["uninterrupted", 2]
    assert type(final) is steps.EmaTrainState
    jax.tree.map(np.testing.assert_array_equal, final, reference)
    histories = [json.loads((tmp_path / run / "fold_0" / "history.json").read_text())
                 for run in ("preempted", "uninterrupted")]
    assert histories[0] == histories[1]
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, 2, 8,
                                                  config.min_learning_rate)
    assert histories[0]["lr"] == pytest.approx([float(schedule(0)), float(schedule(4))],
                                               rel=1e-6)
    fold_dir = tmp_path / "preempted" / "fold_0"
    best_epoch = json.loads((fold_dir / "result.json").read_text())["best_epoch"]
    best = checkpoints.load_best_variables(fold_dir)
    at_best = states["preempted", best_epoch]
    jax.tree.map(np.testing.assert_array_equal, best,
                 {"params": at_best.ema_params, "batch_stats": at_best.batch_stats})
