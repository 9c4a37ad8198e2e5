"""config_checks: a bad value stops training with one line naming its field."""
import json

import pytest

from jaxseg.configs import default
from jaxseg import cli, config_checks


@pytest.mark.parametrize("field, value, message", [
    ("data_dir", "", "config.data_dir is empty"),
    ("backbone", "resnet50", "config.backbone: unknown 'resnet50'"),
    ("conv_impl", "fast", "config.conv_impl: 'fast' is not one of auto, native, matmul"),
    ("image_size", 100, "config.image_size: 100 is not a positive multiple of 32"),
    ("epochs", 0, "config.epochs must be >= 1, got 0"),
    ("loss", "focal", "config.loss: unknown 'focal', expected one of dice, bce_dice, lovasz, "
     "bce_lovasz"),
    ("num_folds", 1, "config.num_folds must be >= 2"),
    ("folds", "0,7", "config.folds: '0,7' is not a list of folds in 0..3"),
    ("per_device_batch_size", 0, "config.per_device_batch_size must be >= 1, got 0"),
    ("prefetch_batches", 0, "config.prefetch_batches must be >= 1, got 0"),
    ("metrics_every_steps", 0, "config.metrics_every_steps must be >= 1, got 0"),
    ("shuffle_buffer", 0, "config.shuffle_buffer must be >= 1, got 0"),
    ("plateau_factor", 1.0, "config.plateau_factor must be in (0, 1), got 1.0"),
    ("lr_schedule", "linear", "config.lr_schedule: unknown 'linear', expected one of "
     "plateau, cosine"),
    ("warmup_epochs", -0.5, "config.warmup_epochs must be in [0, epochs=60), got -0.5"),
    ("warmup_epochs", 60, "config.warmup_epochs must be in [0, epochs=60), got 60"),
    ("ema_decay", 1.0, "config.ema_decay must be in [0, 1), got 1.0"),
])
def test_bad_value_names_its_field(field, value, message):
    config = default.get_config()
    config.data_dir = "tiles"
    config_checks.check_train_config(config)  # the defaults pass
    config[field] = value
    with pytest.raises(cli.InputError) as raised:
        config_checks.check_train_config(config)
    assert str(raised.value).startswith(message)


def _config(**fields):
    config = default.get_config()
    config.update(data_dir="tiles", **fields)
    return config


@pytest.mark.parametrize("loss", ["dice", "bce_dice", "lovasz", "bce_lovasz"])
def test_every_loss_is_accepted(loss):
    config_checks.check_train_config(_config(loss=loss))


def test_cosine_schedule_must_decay():
    config = _config(lr_schedule="cosine", min_learning_rate=1e-3)
    with pytest.raises(cli.InputError, match=r"^config.min_learning_rate must be in \[0, "
                       r"learning_rate=0.00025\] for the cosine schedule, got 0.001$"):
        config_checks.check_train_config(config)
    config.lr_schedule = "plateau"  # ReduceLROnPlateau never cuts below it
    config_checks.check_train_config(config)


def _workdir_of(tmp_path, saved: dict):
    """A workdir holding a finished fold of a run made with `saved` as its config.json."""
    workdir = tmp_path / "run"
    (workdir / "fold_0").mkdir(parents=True)
    (workdir / "fold_0" / "result.json").write_text("{}")
    (workdir / "config.json").write_text(json.dumps(saved))
    return workdir


def test_a_run_made_before_the_added_options_resumes_with_them_off(tmp_path):
    """With them off: an option on by default now (precise BatchNorm) would change the
    run, so resuming needs it turned off, as the refusal says."""
    config = _config(precise_bn_batches=0)
    saved = json.loads(config.to_json_best_effort())
    for field, value in config_checks.ADDED_OPTIONS.items():
        if isinstance(value, dict):   # options added inside a group, as augment's
            for inner in value:
                del saved[field][inner]
        else:
            del saved[field]
    workdir = _workdir_of(tmp_path, saved)
    config_checks.check_workdir_config(config, workdir)
    config.precise_bn_batches = default.get_config().precise_bn_batches
    with pytest.raises(cli.InputError, match="holds a run with config.precise_bn_batches=0, "
                       "this one has 8;"):
        config_checks.check_workdir_config(config, workdir)
    config.precise_bn_batches = 0
    config.lr_schedule = "cosine"
    with pytest.raises(cli.InputError, match="holds a run with config.lr_schedule='plateau', "
                       "this one has 'cosine';"):
        config_checks.check_workdir_config(config, workdir)


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_only_a_plateau_run_may_be_extended(tmp_path, schedule):
    """A cosine schedule's rates depend on the number of epochs."""
    config = _config(lr_schedule=schedule)
    workdir = _workdir_of(tmp_path, json.loads(config.to_json_best_effort()))
    config.epochs = 80
    if schedule == "plateau":
        config_checks.check_workdir_config(config, workdir)
        return
    with pytest.raises(cli.InputError, match="config.epochs=60, this one has 80;"):
        config_checks.check_workdir_config(config, workdir)
