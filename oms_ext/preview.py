"""A cheap RGB preview of a latent: what the OMS prediction x0_hat says about the image to come.

OMS predicts a clean latent ``x0_hat = -psi_cfg(x_S, C)`` from the seed's noise (paper Eq. 21).
Its low frequencies are the light and colour layout of the image the base model will draw.
Decoding it with the VAE would need the checkpoint; the WebUIs' cheapest live preview
(AUTOMATIC1111's "Approx cheap") instead uses a linear map of the 4 latent channels to RGB, and
so does this module:

    rgb = latent_channels @ factors + bias        (per latent pixel; rgb in image units)

``factors`` is 4 x 3 (row = latent channel, column = R, G, B) and ``rgb`` is in the decoder's
image units, -1 = black and +1 = white; it is clamped and mapped to 0..255 as
``(rgb + 1) * 127.5``, as AUTOMATIC1111 and ComfyUI do for their previews.

Coefficients (numbers only, with their sources):

* SD1.x and SD2.x (one VAE, one latent space): the factors keturn derived empirically from
  Stable Diffusion v1.4 outputs and posted at
  https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2
  ("Decoding latents to RGB without upscaling", Hugging Face forum). AUTOMATIC1111's
  "Approx cheap" live preview uses the same numbers, no bias
  (modules/sd_vae_approx.py, ``cheap_approximation``,
  https://github.com/AUTOMATIC1111/stable-diffusion-webui/blob/master/modules/sd_vae_approx.py).
* SDXL: ComfyUI's ``latent_rgb_factors`` and ``latent_rgb_factors_bias`` of its ``SDXL``
  latent format (comfy/latent_formats.py,
  https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/latent_formats.py), a fit with
  a bias term. AUTOMATIC1111's file above holds a similar SDXL matrix without bias.

Latent scaling: AUTOMATIC1111 and ComfyUI apply these maps to the latent the sampler works on,
i.e. the VAE latent already multiplied by the VAE scale factor (0.18215 for SD1.x/SD2.x,
0.13025 for SDXL):
AUTOMATIC1111 hands the same tensor to ``cheap_approximation`` and to ``decode_first_stage``
(which divides by the scale factor), ComfyUI applies them to the sampler's denoised estimate in
model space (after ``process_in`` multiplied by the scale factor). OMS's x0_hat lives in that
same scaled UNet space, so it goes in as it is; a raw VAE encoder output would first have to be
multiplied by the scale factor.

The maps are rough (by keturn's own account the SD1 one comes out somewhat undersaturated),
and the preview has the latent's resolution (1/8 of the image), upscaled smoothly: it shows
brightness and colour layout, not detail. Plain torch; no WebUI import, no PIL.
"""

from __future__ import annotations

import colorsys
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

#: Channels of the SD1.x/SD2.x/SDXL latent spaces.
LATENT_CHANNELS = 4
#: Image pixels per latent pixel along each side (the VAEs downsample by 8).
VAE_DOWNSCALE = 8


@dataclass(frozen=True)
class LatentRGBMap:
    """A linear latent -> RGB approximation: ``rgb = latent @ factors + bias``.

    Attributes:
        factors: 4 rows (latent channels) of (R, G, B) weights.
        bias: (R, G, B) offset; zeros where the published map has none.
        vae_scale_factor: the VAE scale factor already applied to the latents the map expects
            (they are the scaled latents the UNet sees).
        source: where the numbers were published.
    """

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float]
    vae_scale_factor: float
    source: str


SD1_RGB_MAP = LatentRGBMap(
    factors=(
        (0.298, 0.207, 0.208),
        (0.187, 0.286, 0.173),
        (-0.158, 0.189, 0.264),
        (-0.184, -0.271, -0.473),
    ),
    bias=(0.0, 0.0, 0.0),
    vae_scale_factor=0.18215,
    source="https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2",
)

SDXL_RGB_MAP = LatentRGBMap(
    factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    bias=(0.1084, -0.0175, -0.0011),
    vae_scale_factor=0.13025,
    source="https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/latent_formats.py",
)

#: Latent families and their maps; SD2.x shares SD1.x's VAE and so its latent space.
RGB_MAPS: Mapping[str, LatentRGBMap] = MappingProxyType(
    {"sd1": SD1_RGB_MAP, "sd2": SD1_RGB_MAP, "sdxl": SDXL_RGB_MAP}
)
FAMILIES: tuple[str, ...] = tuple(RGB_MAPS)

#: Rec. 601 luma weights of gamma-encoded R'G'B' (also PIL's ``convert("L")``).
REC601_LUMA = (0.299, 0.587, 0.114)


def rgb_map_for(family: str) -> LatentRGBMap:
    """The latent -> RGB map of ``family`` ("sd1", "sd2" or "sdxl")."""
    try:
        return RGB_MAPS[family]
    except (KeyError, TypeError):
        valid = ", ".join(repr(name) for name in FAMILIES)
        raise ValueError(f"unknown latent family {family!r}; valid families: {valid}") from None


def latent_to_rgb(latent: torch.Tensor, family: str) -> torch.Tensor:
    """Linear RGB approximation of latents, in image units (-1 black .. +1 white), unclamped.

    ``latent``: [B, 4, h, w] or [4, h, w], scaled UNet-space latents of ``family`` (see the
    module docstring), any float dtype and device. Returns float32 [B, 3, h, w] (or [3, h, w])
    on the latent's device, one RGB pixel per latent pixel.
    """
    rgb_map = rgb_map_for(family)
    x = _checked_latent(latent).to(torch.float32)
    factors = torch.tensor(rgb_map.factors, dtype=torch.float32, device=x.device)
    bias = torch.tensor(rgb_map.bias, dtype=torch.float32, device=x.device)
    rgb = torch.einsum("...chw,cr->...rhw", x, factors)
    return rgb + bias[:, None, None]


def preview_images(
    latent: torch.Tensor, family: str, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """RGB previews of latents as 8-bit images, upscaled smoothly to ``size``.

    ``latent``: [B, 4, h, w] or [4, h, w] (scaled UNet-space latents, any float dtype and
    device). ``size``: (height, width) of the images in pixels, any positive integers;
    default (8 h, 8 w), the size of the image the latent decodes to. The RGB approximation
    (:func:`latent_to_rgb`) is upscaled with antialiased bilinear interpolation, then clamped
    to [-1, 1] and mapped to 0..255 (rounded). Returns a uint8 tensor on the CPU, [B, H, W, 3]
    (or [H, W, 3] for an unbatched latent), channels R, G, B.
    """
    rgb = latent_to_rgb(latent, family)
    unbatched = rgb.ndim == 3
    if unbatched:
        rgb = rgb.unsqueeze(0)
    height, width = _checked_size(size, rgb.shape[-2:])
    if (height, width) != tuple(rgb.shape[-2:]):
        rgb = torch.nn.functional.interpolate(
            rgb, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
    images = ((rgb.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    images = images.permute(0, 2, 3, 1).contiguous().cpu()
    return images[0] if unbatched else images


@dataclass(frozen=True)
class PreviewSummary:
    """Brightness and dominant colour of one preview image.

    Attributes:
        brightness: mean Rec. 601 luma ``0.299 R + 0.587 G + 0.114 B`` of the preview's
            gamma-encoded 0..255 pixels, in 0..255.
        mean_rgb: mean (R, G, B), each 0..255.
        colour: :func:`colour_name` of ``mean_rgb``.
    """

    brightness: float
    mean_rgb: tuple[float, float, float]
    colour: str

    def text(self) -> str:
        """One line for people, e.g. ``mean brightness 41/255 (Rec. 601 luma), dominant colour
        dark blue``."""
        return (
            f"mean brightness {self.brightness:.0f}/255 (Rec. 601 luma), "
            f"dominant colour {self.colour}"
        )


def summarize_preview(image: torch.Tensor) -> PreviewSummary:
    """Brightness and dominant colour of one preview image, uint8 [H, W, 3] (R, G, B)."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != torch.uint8:
        raise ValueError(
            "summarize_preview expects one uint8 RGB image [H, W, 3], got "
            f"{image.dtype} {tuple(image.shape)}"
        )
    mean = image.reshape(-1, 3).to(torch.float64).mean(dim=0)
    r, g, b = (float(v) for v in mean)
    brightness = REC601_LUMA[0] * r + REC601_LUMA[1] * g + REC601_LUMA[2] * b
    return PreviewSummary(brightness=brightness, mean_rgb=(r, g, b), colour=colour_name(r, g, b))


def summarize_latent(latent: torch.Tensor, family: str) -> list[PreviewSummary]:
    """:func:`summarize_preview` of each latent's preview, at the latent's own resolution.

    ``latent``: [B, 4, h, w] or [4, h, w]; returns B summaries (one for an unbatched latent).
    """
    images = preview_images(latent, family, size=tuple(latent.shape[-2:]))
    if images.ndim == 3:
        images = images.unsqueeze(0)
    return [summarize_preview(image) for image in images]


#: Below this chroma (max - min of the mean R, G, B, in 0..255) a colour is a grey.
GREY_CHROMA = 24.0
#: Greys by Rec. 601 luma (0..255): the first whose upper bound exceeds the luma.
GREY_NAMES: tuple[tuple[float, str], ...] = (
    (40.0, "black"),
    (100.0, "dark grey"),
    (160.0, "grey"),
    (215.0, "light grey"),
    (256.0, "white"),
)
#: Hue names by HSV hue in degrees: the first whose upper bound exceeds the hue.
HUE_NAMES: tuple[tuple[float, str], ...] = (
    (15.0, "red"),
    (45.0, "orange"),
    (70.0, "yellow"),
    (165.0, "green"),
    (195.0, "cyan"),
    (255.0, "blue"),
    (290.0, "purple"),
    (335.0, "magenta"),
    (360.0, "red"),
)
#: HSV value (max channel / 255) below which a colour is called "dark ...".
DARK_VALUE = 0.45
#: HSV value at or above which a colour is "bright ..." (if not a grey).
BRIGHT_VALUE = 0.8


def colour_name(r: float, g: float, b: float) -> str:
    """A plain colour word for an RGB colour (each channel 0..255).

    The mapping, in order:

    1. Chroma ``max - min`` below :data:`GREY_CHROMA` (24): a grey, named by its Rec. 601
       luma: black (< 40), dark grey (< 100), grey (< 160), light grey (< 215), white.
    2. Otherwise a hue word from the HSV hue (degrees): red (< 15 or >= 335), orange (< 45),
       yellow (< 70), green (< 165), cyan (< 195), blue (< 255), purple (< 290), magenta.
    3. Prefixed by the HSV value ``max / 255``: "dark" below 0.45, "bright" from 0.8 on,
       nothing in between.

    Examples: (20, 30, 90) "dark blue", (250, 140, 20) "bright orange", (128, 128, 128)
    "grey".
    """
    values = (float(r), float(g), float(b))
    if not all(0.0 <= v <= 255.0 for v in values):
        raise ValueError(f"colour_name expects R, G, B in 0..255, got {values}")
    r, g, b = values
    if max(values) - min(values) < GREY_CHROMA:
        luma = REC601_LUMA[0] * r + REC601_LUMA[1] * g + REC601_LUMA[2] * b
        return next(name for bound, name in GREY_NAMES if luma < bound)
    hue, _, value = colorsys.rgb_to_hsv(r / 255.0, g / 255.0, b / 255.0)
    degrees = hue * 360.0
    name = next(name for bound, name in HUE_NAMES if degrees < bound)
    if value < DARK_VALUE:
        return f"dark {name}"
    if value >= BRIGHT_VALUE:
        return f"bright {name}"
    return name


def _checked_latent(latent: torch.Tensor) -> torch.Tensor:
    if not isinstance(latent, torch.Tensor):
        raise ValueError(f"expected a latent torch.Tensor, got {type(latent).__name__}")
    if latent.ndim not in (3, 4):
        raise ValueError(
            f"expected a latent [B, {LATENT_CHANNELS}, h, w] or [{LATENT_CHANNELS}, h, w], "
            f"got shape {tuple(latent.shape)}"
        )
    channels = latent.shape[-3]
    if channels != LATENT_CHANNELS:
        raise ValueError(
            f"expected {LATENT_CHANNELS} latent channels (SD1.x/SD2.x/SDXL), got {channels} "
            f"(shape {tuple(latent.shape)})"
        )
    if not latent.is_floating_point():
        raise ValueError(f"expected a floating-point latent, got {latent.dtype}")
    if latent.numel() == 0:
        raise ValueError(f"the latent is empty (shape {tuple(latent.shape)})")
    if not bool(torch.isfinite(latent).all()):
        raise ValueError("the latent holds NaN or infinite values; there is nothing to preview")
    return latent


def _checked_size(
    size: tuple[int, int] | None, latent_size: torch.Size | tuple[int, int]
) -> tuple[int, int]:
    if size is None:
        return latent_size[0] * VAE_DOWNSCALE, latent_size[1] * VAE_DOWNSCALE
    try:
        height, width = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width) in pixels, got {size!r}") from None
    checked = []
    for name, value in (("height", height), ("width", width)):
        try:
            pixels = operator.index(value)
        except TypeError:
            pixels = 0
        if isinstance(value, bool) or pixels < 1:
            raise ValueError(f"size {name} must be a positive integer (pixels), got {value!r}")
        checked.append(pixels)
    return checked[0], checked[1]
