"""Training an OMS module from a folder of captioned images (``python -m oms_ext.train``).

Host-neutral like the rest of the core; diffusers (the VAE) and accelerate (the loop) are
imported only when training runs. See the README's "Train your own module".
"""

from oms_ext.train.errors import TrainError
from oms_ext.train.latents import LatentExample
from oms_ext.train.presets import PRESETS, module_config
from oms_ext.train.trainer import TrainResult, TrainSettings, train

__all__ = [
    "PRESETS",
    "LatentExample",
    "TrainError",
    "TrainResult",
    "TrainSettings",
    "module_config",
    "train",
]
