"""Read where a WebUI sampler starts, from the sampler object itself (A1111 1.6+ and Forge).

Both WebUI families give every txt2img sampler the same two shapes, duck-typed here:

* k-diffusion samplers (``KDiffusionSampler``): ``get_sigmas(p, steps)`` returns the schedule
  whose first value scales the unit noise; ``func`` is the k-diffusion function; samplers whose
  function takes ``sigma_min``/``sigma_max`` ("DPM fast", "DPM adaptive") integrate from the
  model's largest sigma ``model_wrap.sigmas[-1]`` instead.
* timestep samplers (``CompVisSampler``: DDIM, DDIM CFG++, PLMS, UniPC):
  ``get_timesteps(p, steps)`` (ascending, the last is where sampling starts) and the VP
  schedule the sampling functions read, ``model_wrap_cfg.inner_model.inner_model.alphas_cumprod``
  (the CFG denoiser's timestep denoiser over ``sd_model``; A1111 1.6 has no ``model_wrap``
  shortcut on the sampler); UniPC ignores the timesteps and starts at the last training
  timestep.

Calling the sampler's own methods means every scheduler, step count, "discard penultimate
sigma" and sigma min/max option is honoured exactly as the WebUI will sample.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from oms_ext.spaces import SamplerStart, UnsupportedModelError

#: k-diffusion function parameters that mark samplers ignoring the schedule's first sigma.
_OWN_RANGE_PARAMS = ("sigma_min", "sigma_max")


def _function_name(sampler: Any) -> str:
    func = getattr(sampler, "func", None) or getattr(sampler, "funcname", None)
    return str(getattr(func, "__name__", func or ""))


def _integrates_own_range(sampler: Any) -> bool:
    func = getattr(sampler, "func", None)
    if not callable(func):
        return False
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in _OWN_RANGE_PARAMS)


def sampler_start(
    p: Any,
    sampler: Any,
    *,
    sgm_noise_multiplier: bool,
) -> SamplerStart:
    """The :class:`SamplerStart` of the first pass of ``p`` with ``sampler`` (``p.sampler``).

    ``sgm_noise_multiplier``: the WebUI option ``opts.sgm_noise_multiplier``.
    Raises UnsupportedModelError for a sampler of neither shape.
    """
    steps = int(p.steps)
    if hasattr(sampler, "get_sigmas"):
        sigmas = torch.as_tensor(sampler.get_sigmas(p, steps)).detach().double().cpu()
        own_sigma0 = None
        if _integrates_own_range(sampler):
            own_sigma0 = float(sampler.model_wrap.sigmas[-1])
        return SamplerStart.from_sigmas(
            sigmas,
            sgm_noise_multiplier=sgm_noise_multiplier,
            sampler_sigma0=own_sigma0,
        )
    if hasattr(sampler, "get_timesteps"):
        denoiser = sampler.model_wrap_cfg.inner_model
        alphas = torch.as_tensor(denoiser.inner_model.alphas_cumprod)
        alphas = alphas.detach().double().cpu()
        if _function_name(sampler) == "unipc":
            t0 = alphas.shape[0] - 1
        else:
            t0 = int(torch.as_tensor(sampler.get_timesteps(p, steps))[-1])
        return SamplerStart.from_timestep(t0, alphas)
    raise UnsupportedModelError(
        f"sampler {type(sampler).__name__} has neither get_sigmas nor get_timesteps; "
        "OMS cannot tell where it starts"
    )
