"""The Keras recipe: Unet-efficientnetb5 on 512 px tiles, 4 folds by slide, 60 epochs."""
from configs import default


def get_config():
    return default.get_config()
