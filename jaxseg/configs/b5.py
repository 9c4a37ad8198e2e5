"""The Keras recipe: Unet-efficientnetb5 on 512 px tiles, 4 folds by slide, 60 epochs."""
import ml_collections

# By package rather than by this file's path, so a copy of this file edited elsewhere
# still builds on the installed defaults.
from jaxseg.configs import default


def get_config() -> ml_collections.ConfigDict:
    return default.get_config()
