"""A laptop/CPU run: Unet-efficientnetb0 on 128 px tiles, a few epochs."""
import ml_collections

# By package rather than by this file's path, so a copy of this file edited elsewhere
# still builds on the installed defaults.
from jaxseg.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.backbone = "efficientnetb0"
    config.image_size = 128
    config.epochs = 10
    config.per_device_batch_size = 8
    config.learning_rate = 1e-3
    config.plateau_patience = 3
    config.early_stopping_patience = 5
    # XLA:CPU's B0 step is faster without rematerialisation (BENCHMARKS.md), whose
    # memory saving it does not need at this size.
    config.remat = False
    # A CPU step takes seconds: reading its metrics at once costs nothing and keeps the
    # progress bar moving.
    config.metrics_every_steps = 1
    return config
