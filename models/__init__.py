"""The networks the trainer wraps in DDP, their registry and config, and the losses.

``build_model(name, in_channels, num_classes, **options)`` or ``build_model_from_config(cfg, ...)``
give a module that maps float NCHW to logits NCHW of the same H and W; ``build_loss(cfg, freqs)``
gives the matching loss. See ``models/unet.py`` for the architectures and their parameter counts.
"""

from models.init import init_weights
from models.losses import (
    LossConfig,
    SegmentationLoss,
    build_loss,
    class_weights_from_frequencies,
)
from models.registry import (
    ModelConfig,
    build_model,
    build_model_from_config,
    compile_model,
    list_models,
    register_model,
    unwrap_model,
)
from models.unet import UNet

__all__ = [
    "LossConfig",
    "ModelConfig",
    "SegmentationLoss",
    "UNet",
    "build_loss",
    "build_model",
    "build_model_from_config",
    "class_weights_from_frequencies",
    "compile_model",
    "init_weights",
    "list_models",
    "register_model",
    "unwrap_model",
]
