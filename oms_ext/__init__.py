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

from oms_ext.openclip_convert import clip_encoder_from_openclip_state_dict, wrap_openclip_tower
from oms_ext.text import (
    PromptEncoder,
    TextEncoderNotFound,
    load_prompt_encoder,
    tokenizer_from_openclip_vocab,
    wrap_transformers_clip,
)

__all__ += [
    "PromptEncoder",
    "TextEncoderNotFound",
    "clip_encoder_from_openclip_state_dict",
    "load_prompt_encoder",
    "tokenizer_from_openclip_vocab",
    "wrap_openclip_tower",
    "wrap_transformers_clip",
]
