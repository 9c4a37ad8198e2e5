"""A laptop/CPU run: Unet-efficientnetb0 on 128 px tiles, a few epochs."""
from configs import default


def get_config():
    config = default.get_config()
    config.backbone = "efficientnetb0"
    config.image_size = 128
    config.epochs = 10
    config.per_device_batch_size = 8
    config.learning_rate = 1e-3
    config.plateau_patience = 3
    config.early_stopping_patience = 5
    return config
