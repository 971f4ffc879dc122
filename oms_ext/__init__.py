"""One More Step (OMS, arXiv 2311.15744) in plain PyTorch, independent of any WebUI.

The package never imports the WebUIs' ``modules`` or ``backend`` packages; the WebUI script
turns their objects into plain values and calls the functions exported here.
"""

__version__ = "0.1.0"

from oms_ext.loading import OMSLoadError, OMSModel, load_module, load_oms
from oms_ext.step import cfg_combine, oms_start
from oms_ext.unet import OMSUNet, UNetConfig, build_unet, config_from_state_dict_shapes

__all__ = [
    "OMSLoadError",
    "OMSModel",
    "OMSUNet",
    "UNetConfig",
    "build_unet",
    "cfg_combine",
    "config_from_state_dict_shapes",
    "load_module",
    "load_oms",
    "oms_start",
]
