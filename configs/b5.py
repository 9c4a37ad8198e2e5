"""The Keras recipe: Unet-efficientnetb5 on 512 px tiles, 4 folds by slide, 60 epochs."""
import runpy
from pathlib import Path

# By path rather than `import configs.default`, so the file works from any directory.
default = runpy.run_path(str(Path(__file__).with_name("default.py")))


def get_config():
    return default["get_config"]()
