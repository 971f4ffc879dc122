"""One More Step (OMS, arXiv 2311.15744) in plain PyTorch, independent of any WebUI.

The package never imports the WebUIs' ``modules`` or ``backend`` packages; the WebUI script
turns their objects into plain values and calls the functions exported here.
"""

__version__ = "0.1.0"

from oms_ext.loading import OMSLoadError, OMSModel, load_module, load_oms
from oms_ext.openclip_convert import clip_encoder_from_openclip_state_dict, wrap_openclip_tower
from oms_ext.spaces import (
    SamplerStart,
    UnsupportedModelError,
    alpha_bar_to_sigma,
    check_model_supported,
    needs_oms,
    noise_for_sampler,
    sampler_latent_from_vp,
    sigma_to_alpha_bar,
    start_alpha_bar,
    vp_from_sigma_latent,
)
from oms_ext.step import cfg_combine, oms_start
from oms_ext.text import (
    PromptEncoder,
    TextEncoderNotFound,
    load_prompt_encoder,
    tokenizer_from_openclip_vocab,
    wrap_transformers_clip,
)
from oms_ext.unet import OMSUNet, UNetConfig, build_unet, config_from_state_dict_shapes

__all__ = [
    "OMSLoadError",
    "OMSModel",
    "OMSUNet",
    "PromptEncoder",
    "SamplerStart",
    "TextEncoderNotFound",
    "UNetConfig",
    "UnsupportedModelError",
    "alpha_bar_to_sigma",
    "build_unet",
    "cfg_combine",
    "check_model_supported",
    "clip_encoder_from_openclip_state_dict",
    "config_from_state_dict_shapes",
    "load_module",
    "load_oms",
    "load_prompt_encoder",
    "needs_oms",
    "noise_for_sampler",
    "oms_start",
    "sampler_latent_from_vp",
    "sigma_to_alpha_bar",
    "start_alpha_bar",
    "tokenizer_from_openclip_vocab",
    "vp_from_sigma_latent",
    "wrap_openclip_tower",
    "wrap_transformers_clip",
]
