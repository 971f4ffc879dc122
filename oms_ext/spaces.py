"""Where a WebUI sampler really starts, and how to hand it the OMS starting latent.

Two noise spaces meet here:

* VP (variance preserving) space, where OMS works (paper Eq. 20):
  ``x_vp = sqrt(abar) * x0 + sqrt(1 - abar) * eps``. DDIM, DDIM CFG++, PLMS and UniPC in the
  WebUIs sample in this space, on integer timesteps ``t`` with ``abar = alphas_cumprod[t]``.
* sigma space (k-diffusion, variance exploding): ``x_kd = x0 + sigma * eps``. Euler, DPM++ and
  the other k-diffusion samplers work here. The two are the same point when
  ``sigma = sqrt((1 - abar) / abar)``, i.e. ``abar = 1 / (1 + sigma^2)``, and
  ``x_kd = x_vp / sqrt(abar)``.

The WebUIs draw unit Gaussian noise ``n`` and scale it themselves before sampling:
``n * sigma0`` for k-diffusion samplers, ``n * sqrt(1 + sigma0^2)`` when the "SGM noise
multiplier" option is on, and ``n`` unchanged for the timestep samplers. The extension replaces
``n``; :func:`noise_for_sampler` returns the tensor that, after the WebUI's own scaling, is
exactly the OMS start ``x_T`` expressed in the sampler's space.

Everything here is plain torch and Python; no WebUI import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from oms_ext.errors import OMSUserError

#: Below this VP alpha_bar the start holds (numerically) no signal: zero-terminal-SNR schedules
#: (the WebUIs' "Zero Terminal SNR" option, ztsnr checkpoints) start at sigma0 ~ 4500, i.e.
#: alpha_bar ~ 5e-8. OMS has nothing to add there and returns the WebUI's noise unchanged.
ZERO_TERMINAL_SNR_ALPHA_BAR = 1e-6

#: The latent channel count of the VAE latent spaces the released OMS modules were trained in
#: (SD1.x / SD2.x and SDXL).
SUPPORTED_LATENT_CHANNELS = 4

Space = Literal["sigma", "timestep"]


class UnsupportedModelError(OMSUserError, ValueError):
    """The loaded model is one OMS cannot help (flow matching, 16-channel latents, ...); the
    message names no file, so it is its own short reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=message)


def check_model_supported(latent_channels: int, is_flow: bool = False, name: str = "") -> None:
    """Raise :class:`UnsupportedModelError` unless OMS applies to this model.

    OMS modules live in the 4-channel SD1.x/SD2.x/SDXL latent spaces and correct the
    non-zero terminal SNR of VP diffusion. Flow-matching models (SD3, Flux, Chroma) start from
    pure noise by construction and use 16-channel latents, so OMS does not apply to them.
    """
    label = name or "this model"
    if is_flow:
        reason = "it is a flow-matching model (like SD3, Flux or Chroma)"
    elif latent_channels != SUPPORTED_LATENT_CHANNELS:
        reason = (
            f"its latents have {latent_channels} channels, OMS modules exist only for "
            f"{SUPPORTED_LATENT_CHANNELS}-channel SD1.x/SD2.x/SDXL latents"
        )
    else:
        return
    raise UnsupportedModelError(
        f"One More Step does not apply to {label}: {reason}. "
        "Generation continues without OMS."
    )


def sigma_to_alpha_bar(sigma: float) -> float:
    """VP alpha_bar of the k-diffusion noise level ``sigma`` (>= 0): ``1 / (1 + sigma^2)``."""
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    return 1.0 / (1.0 + sigma * sigma)


def alpha_bar_to_sigma(alpha_bar: float) -> float:
    """k-diffusion sigma of the VP level ``alpha_bar`` in (0, 1]: ``sqrt((1 - abar) / abar)``."""
    alpha_bar = _checked_alpha_bar(alpha_bar, allow_zero=False)
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def sampler_latent_from_vp(x_vp: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Sigma-space latent ``x_kd = x_vp / sqrt(abar)`` of the VP latent ``x_vp`` at ``abar``.

    Shapes and dtype are kept. Inverse of :func:`vp_from_sigma_latent`.
    """
    alpha_bar = _checked_alpha_bar(alpha_bar, allow_zero=False)
    return x_vp * (1.0 / math.sqrt(alpha_bar))


def vp_from_sigma_latent(x_kd: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """VP latent ``x_vp = x_kd * sqrt(abar)`` of the sigma-space latent ``x_kd`` at ``abar``."""
    alpha_bar = _checked_alpha_bar(alpha_bar, allow_zero=False)
    return x_kd * math.sqrt(alpha_bar)


def needs_oms(alpha_bar: float) -> bool:
    """Whether a start at VP ``alpha_bar`` carries signal for OMS to supply.

    False for zero-terminal-SNR starts (``alpha_bar < ZERO_TERMINAL_SNR_ALPHA_BAR``): Eq. 20
    then reduces to ``x_T = x_S`` and the WebUI's noise must be passed on unchanged.
    """
    return _checked_alpha_bar(alpha_bar, allow_zero=True) >= ZERO_TERMINAL_SNR_ALPHA_BAR


@dataclass(frozen=True)
class SamplerStart:
    """A plain description of where a WebUI sampler starts sampling.

    Attributes:
        space: "sigma" for k-diffusion samplers (Euler, DPM++, LCM, Restart, ...), "timestep"
            for VP samplers on integer timesteps (DDIM, DDIM CFG++, PLMS, UniPC).
        sigma0: k-diffusion sigma of the sampler's first step (sigma space only).
        t0: VP timestep index of the first step, 0-based into ``alphas_cumprod`` (timestep
            space only; 951 for the WebUIs' DDIM at 20 steps, 999 for UniPC).
        alphas_cumprod: the model's VP alpha_bar per timestep, shape [T]; required for
            timestep starts, optional for sigma starts (then used only by
            :func:`nearest_timestep` for reporting).
        sgm_noise_multiplier: the WebUI option that scales the unit noise by
            ``sqrt(1 + sigma^2)`` instead of ``sigma`` (sigma space only).
        noise_sigma: the sigma the WebUI multiplies the unit noise by, when it differs from
            ``sigma0``. The WebUIs scale the noise for "DPM fast" and "DPM adaptive" by the
            scheduler's first sigma, but those samplers integrate from the model's sigma_max
            (then ``sigma0`` is sigma_max). None means "same as sigma0".
    """

    space: Space
    sigma0: float | None = None
    t0: int | None = None
    # Left out of ==: tensors have no single truth value; equal starts share their schedule.
    alphas_cumprod: torch.Tensor | None = field(default=None, compare=False)
    sgm_noise_multiplier: bool = False
    noise_sigma: float | None = None

    def __post_init__(self) -> None:
        if self.space not in ("sigma", "timestep"):
            raise ValueError(
                f"SamplerStart.space must be 'sigma' or 'timestep', got {self.space!r}"
            )
        if self.alphas_cumprod is not None:
            _check_alphas_cumprod(self.alphas_cumprod)
        if self.space == "sigma":
            self._validate_sigma_start()
        else:
            self._validate_timestep_start()

    def _validate_sigma_start(self) -> None:
        if self.t0 is not None:
            raise ValueError("SamplerStart.t0 must be None for space='sigma' (use sigma0)")
        if self.sigma0 is None:
            raise ValueError("SamplerStart.sigma0 is required for space='sigma'")
        for name in ("sigma0", "noise_sigma"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"SamplerStart.{name} must be a finite sigma > 0, got {value}")

    def _validate_timestep_start(self) -> None:
        if self.sigma0 is not None or self.noise_sigma is not None:
            raise ValueError(
                "SamplerStart.sigma0 and noise_sigma must be None for space='timestep' (use t0)"
            )
        if self.sgm_noise_multiplier:
            raise ValueError(
                "SamplerStart.sgm_noise_multiplier applies to k-diffusion (space='sigma') "
                "samplers only; timestep samplers use the unit noise as is"
            )
        if self.alphas_cumprod is None:
            raise ValueError("SamplerStart.alphas_cumprod is required for space='timestep'")
        if isinstance(self.t0, bool) or not isinstance(self.t0, int):
            raise ValueError(f"SamplerStart.t0 must be an int timestep index, got {self.t0!r}")
        num_timesteps = self.alphas_cumprod.shape[0]
        if not 0 <= self.t0 < num_timesteps:
            raise ValueError(
                f"SamplerStart.t0 must lie in [0, {num_timesteps - 1}] for alphas_cumprod of "
                f"length {num_timesteps}, got {self.t0}"
            )

    @classmethod
    def from_sigmas(
        cls,
        sigmas: torch.Tensor | Sequence[float],
        *,
        sgm_noise_multiplier: bool = False,
        alphas_cumprod: torch.Tensor | None = None,
        sampler_sigma0: float | None = None,
    ) -> SamplerStart:
        """Start of a k-diffusion sampler from the schedule the WebUI built for it.

        ``sigmas``: the descending sigma schedule (``p.sampler.get_sigmas(p, steps)``); its
        first value is what the WebUI multiplies the unit noise by. ``sampler_sigma0``: the
        sigma the sampler really integrates from, when it ignores the schedule ("DPM fast",
        "DPM adaptive": the model's sigma_max).
        """
        values = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if values.numel() == 0:
            raise ValueError("SamplerStart.from_sigmas: the sigma schedule is empty")
        first = float(values[0])
        if sampler_sigma0 is None or float(sampler_sigma0) == first:
            return cls(
                space="sigma",
                sigma0=first,
                alphas_cumprod=alphas_cumprod,
                sgm_noise_multiplier=sgm_noise_multiplier,
            )
        return cls(
            space="sigma",
            sigma0=float(sampler_sigma0),
            alphas_cumprod=alphas_cumprod,
            sgm_noise_multiplier=sgm_noise_multiplier,
            noise_sigma=first,
        )

    @classmethod
    def from_timestep(cls, t0: int, alphas_cumprod: torch.Tensor) -> SamplerStart:
        """Start of a VP timestep sampler (DDIM, DDIM CFG++, PLMS, UniPC) at index ``t0``."""
        return cls(space="timestep", t0=t0, alphas_cumprod=alphas_cumprod)


def start_alpha_bar(start: SamplerStart) -> float:
    """VP alpha_bar at the sampler's real first step: the ``abar`` of OMS's Eq. 20.

    ``1 / (1 + sigma0^2)`` for sigma starts, ``alphas_cumprod[t0]`` for timestep starts.
    """
    if start.space == "sigma":
        return sigma_to_alpha_bar(start.sigma0)
    return float(start.alphas_cumprod[start.t0])


def noise_for_sampler(x_T_vp: torch.Tensor, start: SamplerStart) -> torch.Tensor:
    """The tensor to hand the WebUI in place of its unit noise, for the OMS start ``x_T_vp``.

    ``x_T_vp`` is the OMS start in VP space at ``start_alpha_bar(start)`` (Eq. 20). After the
    WebUI's own scaling (:func:`webui_start_latent`) the sampler starts exactly from
    ``x_T_vp`` in its own space:

    * timestep samplers: ``x_T_vp`` unchanged (they sample in VP space);
    * k-diffusion with the SGM noise multiplier: ``x_T_vp`` unchanged, since the WebUI
      multiplies by ``sqrt(1 + sigma0^2) = 1 / sqrt(abar)``;
    * k-diffusion without it: ``x_T_vp * sqrt(1 + sigma0^2) / sigma0``, so that
      ``noise * sigma0 = x_T_vp / sqrt(abar)``, the sigma-space latent.

    Zero-terminal-SNR starts (:func:`needs_oms` false) return ``x_T_vp`` itself. Dtype and
    device are kept.
    """
    if start.space == "timestep" or not needs_oms(start_alpha_bar(start)):
        return x_T_vp
    target_scale = math.sqrt(1.0 + start.sigma0**2)
    return x_T_vp * (target_scale / _webui_noise_scale(start))


def webui_start_latent(noise: torch.Tensor, start: SamplerStart) -> torch.Tensor:
    """What the WebUI makes of the unit noise ``noise`` before its first sampler step.

    ``noise * sigma`` (k-diffusion), ``noise * sqrt(1 + sigma^2)`` (SGM noise multiplier) or
    ``noise`` (timestep samplers), with ``sigma`` the scheduler's first sigma. The result lives
    in the sampler's space (sigma space or VP space).
    """
    if start.space == "timestep":
        return noise
    return noise * _webui_noise_scale(start)


def nearest_timestep(start: SamplerStart) -> int | None:
    """The VP timestep index whose alpha_bar is closest (in log sigma) to the start, if known.

    For reporting only; None when a sigma start carries no ``alphas_cumprod``.
    """
    if start.space == "timestep":
        return start.t0
    if start.alphas_cumprod is None:
        return None
    ac = start.alphas_cumprod.double()
    log_sigmas = 0.5 * torch.log((1 - ac) / ac)
    return int(torch.argmin((log_sigmas - math.log(start.sigma0)).abs()))


def _webui_noise_scale(start: SamplerStart) -> float:
    sigma = start.sigma0 if start.noise_sigma is None else start.noise_sigma
    return math.sqrt(1.0 + sigma**2) if start.sgm_noise_multiplier else sigma


def _checked_alpha_bar(alpha_bar: float, *, allow_zero: bool) -> float:
    alpha_bar = float(alpha_bar)
    low_ok = alpha_bar >= 0 if allow_zero else alpha_bar > 0
    if not (math.isfinite(alpha_bar) and low_ok and alpha_bar <= 1):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"alpha_bar must lie in {bound}, got {alpha_bar}")
    return alpha_bar


def _check_alphas_cumprod(alphas_cumprod: torch.Tensor) -> None:
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.ndim != 1:
        raise ValueError("SamplerStart.alphas_cumprod must be a 1-D tensor [T] of VP alpha_bar")
    if alphas_cumprod.numel() == 0 or not alphas_cumprod.is_floating_point():
        raise ValueError("SamplerStart.alphas_cumprod must be a non-empty float tensor")
    if bool(((alphas_cumprod < 0) | (alphas_cumprod > 1) | alphas_cumprod.isnan()).any()):
        raise ValueError("SamplerStart.alphas_cumprod values must lie in [0, 1]")
