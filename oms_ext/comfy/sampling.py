"""The OMS start inside ComfyUI's sampling: an OUTER_SAMPLE wrapper on the MODEL.

ComfyUI's ``CFGGuider.sample`` (comfy/samplers.py) runs the MODEL's ``OUTER_SAMPLE`` wrappers
with the noise, the latent, the sampler and the real sigmas, for KSampler, KSamplerAdvanced,
SamplerCustom and SamplerCustomAdvanced alike. Every ComfyUI sampler (``KSAMPLER.sample``)
then starts in sigma space from ``model_sampling.noise_scaling(sigmas[0], noise, latent,
max_denoise)``: for discrete VP models (``EPS`` and ``V_PREDICTION`` in
comfy/model_sampling.py) that is ``noise * sqrt(1 + s0^2)`` when ``sigmas[0]`` is the model's
sigma_max (``Sampler.max_denoise``) and ``noise * s0`` otherwise, plus the (empty) latent.

The wrapper runs the OMS module on the seed's noise x_S, takes Eq. 20 at the alpha_bar of
``sigmas[0]`` and hands the sampler the noise that ComfyUI's own scaling turns into the OMS
start: with s = 0 the sampler starts from ``x0_hat + s0 * x_S`` in both cases. What OMS must
not touch (img2img, masks, no noise, zero terminal SNR, flow/EDM models, other latent spaces)
is passed on unchanged with one log line and a notice the user sees.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from oms_ext.errors import OMSUserError
from oms_ext.runtime.args import NOISE_FRESH, OMSArgs
from oms_ext.runtime.runner import fresh_noise_seed, is_out_of_memory
from oms_ext.spaces import (
    SUPPORTED_LATENT_CHANNELS,
    SamplerStart,
    needs_oms,
    noise_for_sampler,
    sigma_to_alpha_bar,
)
from oms_ext.step import oms_start

log = logging.getLogger("one_more_step")

#: Key of the OMS wrapper on the MODEL; a second Apply node replaces it.
WRAPPER_KEY = "one_more_step"
#: ComfyUI latent formats (comfy/latent_formats.py class names) and the OMS latent family.
#: SD2.x models have SD1.x's latent format too (comfy/supported_models.py SD20), so ComfyUI
#: tells the two apart by nothing OMS reads: both are "sd1" here.
LATENT_FAMILIES = {"SD15": "sd1", "SDXL": "sdxl"}
#: The latent family of each checkpoint family a module names.
LATENT_FAMILY_OF = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl"}
FAMILY_NAMES = {"sd1": "SD1.x/SD2.x", "sd2": "SD1.x/SD2.x", "sdxl": "SDXL"}


class Skip(Exception):
    """OMS leaves this sampling alone; ``str(self)`` says why in one line."""


@dataclass(frozen=True)
class ApplySettings:
    """The Apply node's inputs: OMS prompt and negative, OMS CFG (Eq. 21) and noise mode."""

    prompt: str
    negative: str
    cfg: float
    noise_mode: str

    def __post_init__(self) -> None:
        # The same bounds and messages as everywhere else (OMSArgsError names the field).
        OMSArgs(
            enabled=True,
            prompt=self.prompt,
            negative_prompt=self.negative,
            cfg=self.cfg,
            noise_mode=self.noise_mode,
        )

    @property
    def fresh_noise(self) -> bool:
        return self.noise_mode == NOISE_FRESH


@dataclass
class LastRun:
    """What the wrapper did in the latest sampling: ``x0_hat`` [B, 4, h, w] (float32, CPU) when
    OMS ran, the latent ``family``, and the message it gave."""

    x0_hat: torch.Tensor | None
    family: str | None
    message: str


def latent_family(latent_format: Any) -> str | None:
    """The OMS family of a ComfyUI latent format object ("sd1", "sdxl"), None for any other."""
    return LATENT_FAMILIES.get(type(latent_format).__name__)


def check_model_sampling(model_sampling: Any) -> None:
    """Raise :class:`Skip` unless ``model_sampling`` is a discrete VP schedule with EPS or
    V_PREDICTION noise scaling and a non-zero terminal SNR (comfy/model_sampling.py)."""
    import comfy.model_sampling as ms

    discrete = isinstance(model_sampling, ms.ModelSamplingDiscrete) and not isinstance(
        model_sampling, ms.ModelSamplingDiscreteEDM
    )
    vp_prediction = isinstance(model_sampling, ms.EPS) and not isinstance(
        model_sampling, ms.EDM | ms.X0
    )
    if not (discrete and vp_prediction):
        raise Skip(
            f"the model samples with {type(model_sampling).__name__} (flow matching, EDM or "
            "another non-discrete schedule); OMS applies to discrete eps/v-prediction models"
        )
    sigma_max = float(model_sampling.sigma_max)
    if not needs_oms(sigma_to_alpha_bar(sigma_max)):
        raise Skip(
            f"the model has a zero-terminal-SNR schedule (sigma_max = {sigma_max:.0f}); it "
            "starts from pure noise and needs no OMS"
        )


def check_inputs(noise: torch.Tensor, latent: torch.Tensor, denoise_mask: Any) -> None:
    """Raise :class:`Skip` for inputs OMS must leave alone: nested latents, an inpainting
    mask, a non-empty latent (img2img), all-zero noise (add_noise off), other channel counts."""
    if getattr(latent, "is_nested", False) or getattr(noise, "is_nested", False):
        raise Skip("the latent is a nested (multi-shape) latent")
    if denoise_mask is not None:
        raise Skip("the latent has a denoise mask (inpainting)")
    if torch.count_nonzero(latent) > 0:
        raise Skip("the latent is not empty (img2img or a second pass)")
    if torch.count_nonzero(noise) == 0:
        raise Skip("the sampler adds no noise (add_noise is off)")
    if noise.ndim != 4 or noise.shape[1] != SUPPORTED_LATENT_CHANNELS:
        raise Skip(
            f"the latent has shape {tuple(noise.shape)}; OMS modules exist for 4-channel "
            "SD1.x/SD2.x/SDXL image latents only"
        )


def check_family(family: str | None, module_families: tuple[str, ...] | None) -> str:
    """The latent family, or :class:`Skip` when it is none OMS knows or not the module's."""
    if family is None:
        raise Skip("the model's latent space is not SD1.x/SD2.x or SDXL")
    if module_families is not None and family not in {LATENT_FAMILY_OF[f] for f in module_families}:
        wanted = " or ".join(dict.fromkeys(FAMILY_NAMES[f] for f in module_families))
        raise Skip(
            f"the OMS module is made for {wanted} latents, the model is {FAMILY_NAMES[family]}"
        )
    return family


def max_denoise(sampler: Any, model_sampling: Any, sigmas: torch.Tensor) -> bool:
    """Whether the sampler scales the noise by ``sqrt(1 + s0^2)`` (True) or ``s0``: asks the
    sampler's own ``max_denoise`` (comfy/samplers.py ``Sampler.max_denoise``: sigmas[0]
    within rel. 1e-5 of sigma_max, or above it) with the patched model_sampling."""
    model_wrap = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=model_sampling))
    return bool(sampler.max_denoise(model_wrap, sigmas))


def sampler_noise(x_T_vp: torch.Tensor, sigma0: float, scaled_to_max: bool) -> torch.Tensor:
    """The noise to hand a ComfyUI sampler so that its ``noise_scaling`` starts it from the
    VP latent ``x_T_vp`` (at alpha_bar = 1 / (1 + sigma0^2)) in sigma space,
    ``x_T_vp * sqrt(1 + sigma0^2)``: ``x_T_vp`` itself when the sampler multiplies by
    ``sqrt(1 + sigma0^2)``, ``x_T_vp * sqrt(1 + sigma0^2) / sigma0`` when by ``sigma0``."""
    start = SamplerStart(space="sigma", sigma0=sigma0, sgm_noise_multiplier=scaled_to_max)
    return noise_for_sampler(x_T_vp, start)


def fresh_z(seed: int | None, shape: tuple[int, ...]) -> torch.Tensor:
    """The fresh noise z of "Fresh noise" (float32, CPU): drawn from the sampler's seed
    through :func:`~oms_ext.runtime.runner.fresh_noise_seed`, so it never equals x_S."""
    generator = torch.Generator("cpu").manual_seed(fresh_noise_seed(int(seed or 0)))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


class OneMoreStepWrapper:
    """The OUTER_SAMPLE wrapper. ``module``: the loader's OMS model (see
    :class:`oms_ext.comfy.models.OMSModule`); ``notify(text)`` logs a skip and tells the
    user; ``encoder``: a borrowed ComfyUI CLIP (:class:`oms_ext.comfy.clip.ClipTextEncoder`)
    or None for the module's own."""

    def __init__(
        self,
        module: Any,
        settings: ApplySettings,
        notify: Callable[[str], None],
        encoder: Any = None,
    ) -> None:
        self.module = module
        self.settings = settings
        self.notify = notify
        self.encoder = encoder
        self.last: LastRun | None = None

    def __call__(
        self,
        executor: Any,
        noise: torch.Tensor,
        latent_image: torch.Tensor,
        sampler: Any,
        sigmas: torch.Tensor,
        denoise_mask: Any = None,
        callback: Any = None,
        disable_pbar: bool = False,
        seed: int | None = None,
        **kwargs: Any,
    ) -> Any:
        patcher = executor.class_obj.model_patcher
        start = self.start_noise(patcher, noise, latent_image, sampler, sigmas, denoise_mask, seed)
        return executor(
            start,
            latent_image,
            sampler,
            sigmas,
            denoise_mask,
            callback,
            disable_pbar,
            seed,
            **kwargs,
        )

    def start_noise(
        self,
        patcher: Any,
        noise: torch.Tensor,
        latent: torch.Tensor,
        sampler: Any,
        sigmas: torch.Tensor,
        denoise_mask: Any,
        seed: int | None,
    ) -> torch.Tensor:
        """The noise to sample from: the OMS start, or ``noise`` itself when OMS skips."""
        try:
            x0_hat, noise_out, message = self._oms_noise(
                patcher, noise, latent, sampler, sigmas, denoise_mask, seed
            )
        except Skip as e:
            message = f"[OMS] One More Step skipped: {e}"
            self.notify(message)
            self.last = LastRun(None, None, message)
            return noise
        log.info(message)
        self.last = LastRun(
            x0_hat, latent_family(patcher.get_model_object("latent_format")), message
        )
        return noise_out

    def _oms_noise(
        self,
        patcher: Any,
        noise: torch.Tensor,
        latent: torch.Tensor,
        sampler: Any,
        sigmas: torch.Tensor,
        denoise_mask: Any,
        seed: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        import comfy.samplers

        if sigmas.shape[-1] < 2:
            raise Skip("the sampler runs no step")
        if not isinstance(sampler, comfy.samplers.KSAMPLER):
            raise Skip(f"the sampler {type(sampler).__name__} is not one of ComfyUI's KSAMPLERs")
        check_inputs(noise, latent, denoise_mask)
        model_sampling = patcher.get_model_object("model_sampling")
        check_model_sampling(model_sampling)
        check_family(latent_family(patcher.get_model_object("latent_format")), self.module.families)
        sigma0 = float(sigmas[0])
        alpha_bar = sigma_to_alpha_bar(sigma0)
        if not needs_oms(alpha_bar):
            raise Skip(f"the sampler starts at sigma {sigma0:.0f} (zero terminal SNR)")
        to_max = max_denoise(sampler, model_sampling, sigmas)
        x0_hat, x_T = self._run_guarded(noise, alpha_bar, seed)
        out = sampler_noise(x_T, sigma0, to_max).to(noise.device, noise.dtype)
        message = (
            f"[OMS] One More Step applied: sigma0 = {sigma0:.4f}, alpha_bar0 = {alpha_bar:.6g}, "
            f"OMS prompt {self.settings.prompt!r}"
        )
        return x0_hat, out, message

    def _run_guarded(
        self, noise: torch.Tensor, alpha_bar: float, seed: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, x_T) or :class:`Skip`: a user-side problem, out of memory or NaN skip OMS
        (the image is still made); NaN/inf from half precision is retried once in float32."""
        try:
            module = self.module
            x0_hat, x_T = self._run(module, noise, alpha_bar, seed)
            if not _finite(x_T) and module.dtype != torch.float32:
                log.warning("[OMS] %s gave NaN/inf, running OMS in float32", module.dtype)
                module = module.in_float32()
                x0_hat, x_T = self._run(module, noise, alpha_bar, seed)
        except OMSUserError as e:
            raise Skip(e.reason) from e
        except (RuntimeError, MemoryError) as e:
            if isinstance(e, MemoryError) or is_out_of_memory(e):
                raise Skip("out of memory while running the OMS module") from e
            raise Skip(f"the OMS module failed ({type(e).__name__}: {e})") from e
        if not _finite(x_T):
            raise Skip("the OMS module produced NaN/inf values")
        return x0_hat, x_T

    @torch.no_grad()
    def _run(
        self, module: Any, noise: torch.Tensor, alpha_bar: float, seed: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0_hat = -psi_cfg(x_S, C) (Eq. 21) and x_T (Eq. 20, VP space), float32 on the CPU."""
        model = module.ready(self.encoder)
        x_S = noise.float().cpu()
        s = self.settings
        x0_hat = model.predict_x0(x_S.to(model.device), s.prompt, s.cfg, s.negative)
        x0_hat = x0_hat.float().cpu()
        if s.fresh_noise:
            z = fresh_z(seed, tuple(x_S.shape))
            x_T = oms_start(x0_hat, x_S, alpha_bar, s=math.sqrt(1.0 - alpha_bar), noise=z)
        else:
            x_T = oms_start(x0_hat, x_S, alpha_bar)
        return x0_hat, x_T
