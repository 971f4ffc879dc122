"""The One More Step nodes: loader, apply and preview (ComfyUI's V1 node classes)."""

from __future__ import annotations

from typing import Any

import torch

from oms_ext.comfy import models
from oms_ext.comfy.clip import ClipTextEncoder
from oms_ext.comfy.notices import notify
from oms_ext.comfy.sampling import WRAPPER_KEY, ApplySettings, OneMoreStepWrapper
from oms_ext.errors import OMSUserError
from oms_ext.preview import preview_images
from oms_ext.runtime.args import CFG_MAX, CFG_MIN, NOISE_MODES, OMSArgsError

CATEGORY = "sampling/one_more_step"
OMS_MODEL = "OMS_MODEL"


def _outer_sample() -> str:
    import comfy.patcher_extension

    return comfy.patcher_extension.WrappersMP.OUTER_SAMPLE


class OneMoreStepLoader:
    DESCRIPTION = (
        "Loads a One More Step module (arXiv 2311.15744) from models/oms, or downloads a "
        "release into it. The module predicts the picture a plain noise image should start "
        "from, so very dark, very bright and single-colour prompts come out as asked."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (OMS_MODEL,)
    RETURN_NAMES = ("oms_model",)
    OUTPUT_TOOLTIPS = ("The OMS module, for One More Step Apply.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "module": (
                    models.module_names(),
                    {
                        "tooltip": "A module in models/oms (a released folder or a "
                        ".safetensors file), or a release, downloaded on first use: "
                        "oms_b_openclip_15_21 for SD1.x/SD2.x, oms_b_openclip_xl and "
                        "oms_b_mixclip_xl for SDXL."
                    },
                ),
                "precision": (
                    list(models.PRECISIONS),
                    {
                        "default": "auto",
                        "tooltip": "auto: as ComfyUI picks for its diffusion models on this "
                        "device (float16 on most GPUs, float32 on the CPU). A NaN from half "
                        "precision is retried in float32.",
                    },
                ),
            }
        }

    def load(self, module: str, precision: str) -> tuple[models.OMSModule]:
        try:
            return (models.load_module(module, precision),)
        except OMSUserError as e:
            raise ValueError(f"One More Step: {e}") from e


class OneMoreStepApply:
    DESCRIPTION = (
        "Makes every sampler that uses this MODEL start from the One More Step prediction "
        "instead of plain noise (KSampler, KSamplerAdvanced, SamplerCustom, "
        "SamplerCustomAdvanced). Left alone, with a notice: img2img and other non-empty "
        "latents, inpainting masks, add_noise off, zero-terminal-SNR, flow and EDM models, "
        "latents other than SD1.x/SD2.x/SDXL. A second Apply replaces the first."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, sampling from the OMS start.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to sample with."}),
                "oms_model": (OMS_MODEL, {"tooltip": "From One More Step Loader."}),
                "oms_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What the start should look like: usually your prompt, or "
                        "just its light and colour ('a dark night', 'pure white').",
                    },
                ),
                "oms_negative": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "The OMS unconditional prompt (empty, as the authors use).",
                    },
                ),
                "oms_cfg": (
                    "FLOAT",
                    {
                        "default": 2.0,
                        "min": CFG_MIN,
                        "max": CFG_MAX,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Guidance of the OMS prompt (paper Eq. 21); 1 = none.",
                    },
                ),
                "noise_mode": (
                    list(NOISE_MODES),
                    {
                        "default": NOISE_MODES[0],
                        "tooltip": "Keep seed noise: the start keeps the seed's noise, so the "
                        "composition stays. Fresh noise: new noise drawn from the seed, as "
                        "the authors' code does.",
                    },
                ),
            },
            "optional": {
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "The checkpoint's CLIP as the module's text encoder: an "
                        "SD2.x checkpoint's for the SD1.x/SD2.x release (instead of loading its "
                        "own); required by a module you trained on the checkpoint's own text "
                        "encoder (SD1.x CLIP-L, SDXL's pair)."
                    },
                ),
            },
        }

    def apply(
        self,
        model: Any,
        oms_model: models.OMSModule,
        oms_prompt: str,
        oms_negative: str,
        oms_cfg: float,
        noise_mode: str,
        clip: Any = None,
    ) -> tuple[Any]:
        try:
            settings = ApplySettings(oms_prompt, oms_negative, float(oms_cfg), noise_mode)
        except OMSArgsError as e:
            raise ValueError(f"One More Step: {e}") from e
        if clip is None and oms_model.needs_clip:
            raise ValueError(
                f"One More Step: {oms_model.name} reads the checkpoint's own text encoder; "
                "connect the checkpoint's CLIP to the clip input"
            )
        encoder = _clip_encoder(clip, oms_model) if clip is not None else None
        wrapper = OneMoreStepWrapper(oms_model, settings, notify, encoder)
        patched = model.clone()
        patched.remove_wrappers_with_key(_outer_sample(), WRAPPER_KEY)
        patched.add_wrapper_with_key(_outer_sample(), WRAPPER_KEY, wrapper)
        return (patched,)


def _clip_encoder(clip: Any, oms_model: models.OMSModule) -> ClipTextEncoder:
    encoder = ClipTextEncoder(clip)
    width = oms_model.model.cross_attention_dim
    if encoder.hidden_size != width:
        raise ValueError(
            f"One More Step: the CLIP input gives {encoder.hidden_size}-wide text states, "
            f"{oms_model.name} reads {width}-wide ones; connect an SD2.x checkpoint's CLIP "
            "(for the SD1.x/SD2.x module) or leave the input empty to use the module's own"
        )
    return encoder


class OneMoreStepPreview:
    DESCRIPTION = (
        "The picture One More Step predicted in the latest sampling with this MODEL, as a "
        "quick latent-to-RGB image (the map of the WebUI preview). Connect the sampler's "
        "LATENT so it runs after sampling."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The OMS prediction x0_hat, one image per latent.",)
    FUNCTION = "preview"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL output of One More Step Apply."}),
                "samples": (
                    "LATENT",
                    {"tooltip": "The sampler's output (orders this node after sampling)."},
                ),
            }
        }

    def preview(self, model: Any, samples: dict[str, Any]) -> tuple[torch.Tensor]:
        wrappers = model.get_wrappers(_outer_sample(), WRAPPER_KEY)
        if not wrappers:
            raise ValueError(
                "One More Step Preview: this MODEL has no One More Step; connect the MODEL "
                "output of One More Step Apply"
            )
        last = wrappers[-1].last
        latent = samples["samples"]
        if last is None or last.x0_hat is None:
            why = last.message if last is not None else "the model has not sampled yet"
            notify(f"[OMS] No OMS preview: {why}")
            size = (latent.shape[0], latent.shape[-2] * 8, latent.shape[-1] * 8, 3)
            return (torch.full(size, 0.5),)
        images = preview_images(last.x0_hat, last.family)
        return (images.float() / 255.0,)


NODE_CLASS_MAPPINGS = {
    "OneMoreStepLoader": OneMoreStepLoader,
    "OneMoreStepApply": OneMoreStepApply,
    "OneMoreStepPreview": OneMoreStepPreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "OneMoreStepLoader": "One More Step Loader",
    "OneMoreStepApply": "One More Step Apply",
    "OneMoreStepPreview": "One More Step Preview",
}
