"""The OMS step itself: classifier-free guidance of the module (Eq. 21) and the one VP step
from the module's x0 prediction to the base model's starting latent (Eq. 20 / 34).

Everything here lives in VP (variance preserving) space, ``x_t = sqrt(abar) x0 + sqrt(1 - abar)
eps``; converting the result to a sampler's sigma space is :mod:`oms_ext.spaces`' job.
"""

from __future__ import annotations

import math

import torch

#: Float slack when checking that ``alpha_bar`` and ``s`` lie in their ranges.
RANGE_TOLERANCE = 1e-6


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance of the OMS module output (paper Eq. 21).

    ``psi_cfg = psi(x_S, "") + w * (psi(x_S, C) - psi(x_S, ""))``; ``v_uncond`` and ``v_cond``
    are the module's v predictions (same shape), ``w`` the OMS guidance scale (1 = none).
    """
    if v_uncond.shape != v_cond.shape:
        raise ValueError(
            f"cfg_combine: v_uncond {tuple(v_uncond.shape)} and v_cond {tuple(v_cond.shape)} "
            f"must have the same shape"
        )
    return v_uncond + w * (v_cond - v_uncond)


def oms_start(
    x0_hat: torch.Tensor,
    x_S: torch.Tensor,
    alpha_bar: float | torch.Tensor,
    s: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The starting latent x_T of the base sampler from the OMS prediction (paper Eq. 20 / 34).

    ``x_T = sqrt(abar) * x0_hat + sqrt(max(0, 1 - abar - s^2)) * x_S + s * z``, all in VP
    space. ``x0_hat = -psi_cfg(x_S, C)`` is the module's clean-latent prediction and ``x_S``
    the unit Gaussian noise the module saw (both [B, C, H, W]); ``alpha_bar`` is the base
    model's cumulative alpha at the timestep its sampler really starts from; ``s`` in
    ``[0, sqrt(1 - abar)]`` sets how much fresh noise ``z`` (``noise``, same shape, required
    when s > 0) replaces x_S: s = 0 is the deterministic DDIM step that keeps the seed's
    noise, s = sqrt(1 - abar) the DDPM step. Computed in float32, returned in the dtype and on
    the device of ``x_S``.

    Deliberate differences from the authors' ``oms_step`` (OneMoreStep pipeline), which:
    drops the x_S term (always the DDPM form, so a seed's composition is lost); multiplies z
    by the variance ``1 - abar`` instead of the standard deviation ``sqrt(1 - abar)`` (0.2 %
    too little noise at abar = 0.0047); takes abar at the scheduler's ``timesteps[0]`` rather
    than where the sampler starts; and feeds ``latents * init_noise_sigma`` to the module,
    which is unit noise only for schedulers with ``init_noise_sigma = 1``. Here the caller
    passes the true start abar and the unit noise x_S, and gets Eq. 20 as written.
    """
    a = float(alpha_bar)
    if not (math.isfinite(a) and -RANGE_TOLERANCE <= a <= 1 + RANGE_TOLERANCE):
        raise ValueError(f"oms_start: alpha_bar must lie in [0, 1], got {a}")
    a = min(max(a, 0.0), 1.0)
    s = float(s)
    s_max = math.sqrt(1.0 - a)
    if not (math.isfinite(s) and -RANGE_TOLERANCE <= s <= s_max + RANGE_TOLERANCE):
        raise ValueError(
            f"oms_start: s must lie in [0, sqrt(1 - alpha_bar)] = [0, {s_max}], got {s}"
        )
    s = min(max(s, 0.0), s_max)
    if x0_hat.shape != x_S.shape:
        raise ValueError(
            f"oms_start: x0_hat {tuple(x0_hat.shape)} and x_S {tuple(x_S.shape)} must match"
        )
    if s > 0 and noise is None:
        raise ValueError("oms_start: s > 0 needs fresh noise z: pass noise= (shape of x_S)")
    if noise is not None and noise.shape != x_S.shape:
        raise ValueError(
            f"oms_start: noise {tuple(noise.shape)} must have the shape of x_S {tuple(x_S.shape)}"
        )

    x_s32 = x_S.float()
    out = math.sqrt(a) * x0_hat.to(x_S.device, torch.float32)
    out = out + math.sqrt(max(0.0, 1.0 - a - s * s)) * x_s32
    if s > 0 and noise is not None:
        out = out + s * noise.to(x_S.device, torch.float32)
    return out.to(x_S.dtype)
