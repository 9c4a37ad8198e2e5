"""The recipe's network, segmentation_models' Unet on a qubvel/efficientnet encoder, in Flax:
`efficientnet` (the encoder), `unet` (the decoder and the whole model), `layers` (variants
of some layers that XLA:CPU runs faster) and `build` (the model a config describes)."""
from jaxseg.models.build import IMPL_FIELDS, build_model, init_variables
from jaxseg.models.efficientnet import BACKBONES, EfficientNet
from jaxseg.models.unet import INPUT_MULTIPLE, SKIP_FEATURES, TOP_FEATURE, Unet, UnetDecoder

__all__ = ["BACKBONES", "IMPL_FIELDS", "INPUT_MULTIPLE", "SKIP_FEATURES", "TOP_FEATURE",
           "EfficientNet", "Unet", "UnetDecoder", "build_model", "init_variables"]
