"""config_checks: a bad value stops training with one line naming its field."""
import pytest

from jaxseg.configs import default
from jaxseg import cli, config_checks


@pytest.mark.parametrize("field, value, message", [
    ("data_dir", "", "config.data_dir is empty"),
    ("backbone", "resnet50", "config.backbone: unknown 'resnet50'"),
    ("conv_impl", "fast", "config.conv_impl: 'fast' is not one of auto, native, matmul"),
    ("image_size", 100, "config.image_size: 100 is not a positive multiple of 32"),
    ("epochs", 0, "config.epochs must be >= 1, got 0"),
    ("loss", "focal", "config.loss: unknown 'focal'"),
    ("num_folds", 1, "config.num_folds must be >= 2"),
    ("folds", "0,7", "config.folds: '0,7' is not a list of folds in 0..3"),
    ("per_device_batch_size", 0, "config.per_device_batch_size must be >= 1, got 0"),
    ("prefetch_batches", 0, "config.prefetch_batches must be >= 1, got 0"),
    ("metrics_every_steps", 0, "config.metrics_every_steps must be >= 1, got 0"),
    ("shuffle_buffer", 0, "config.shuffle_buffer must be >= 1, got 0"),
    ("plateau_factor", 1.0, "config.plateau_factor must be in (0, 1), got 1.0"),
])
def test_bad_value_names_its_field(field, value, message):
    config = default.get_config()
    config.data_dir = "tiles"
    config_checks.check_train_config(config)  # the defaults pass
    config[field] = value
    with pytest.raises(cli.InputError) as raised:
        config_checks.check_train_config(config)
    assert str(raised.value).startswith(message)
