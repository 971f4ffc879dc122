"""A Gaussian toy world in which the right OMS starting point can be checked exactly.

Data: latents [4, 8, 8] whose per-channel mean depends on the prompt (``mu``, +/-1.5), plus an
image-level brightness offset per channel shared by all its pixels (std ``SPREAD``: the
low-frequency component that a sampler starting from zero-mean noise cannot recover) and
small per-pixel variation (std ``PIXEL_STD``). The base model is trained under SD's real
scaled_linear schedule; its exact (closed-form) denoiser stands in for the UNet. Samplers are
the real ones the WebUIs run: k-diffusion's functions with the WebUIs' default schedules, and
a DDIM loop on the WebUIs' VP timesteps (t0 = 951 for 20 steps).

Every start goes through :mod:`oms_ext.spaces` and the WebUI's own scaling of its unit noise.
Noise comes in antithetic pairs (n, -n) and the denoiser is affine, so the batch mean equals
the expected generated mean exactly; no Monte-Carlo error hides a wrong start.

Run ``python tools/toy_world.py`` to print the figures the tests assert on.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import k_diffusion.sampling as kds

from oms_ext import schedules, spaces
from oms_ext.step import oms_start

STEPS = 20
#: Per-prompt channel means of the data (the target OMS must reach), [prompts, channels].
PROMPT_MEANS = torch.tensor([[1.5, -1.5, 1.5, -1.5], [-1.5, 1.5, -1.5, 1.5]], dtype=torch.float64)
SPREAD = 1.5
PIXEL_STD = 0.1
LATENT_HW = (8, 8)
PAIRS_PER_PROMPT = 8

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ToySampler:
    """A WebUI sampler: its label, k-diffusion function (None = DDIM loop) and schedule."""

    label: str
    function: Callable[..., torch.Tensor] | None
    scheduler: str = "automatic"
    default_scheduler: str | None = None
    discard_next_to_last_sigma: bool = False
    stochastic: bool = False


SAMPLERS = (
    ToySampler("Euler", kds.sample_euler),
    ToySampler("Euler a", kds.sample_euler_ancestral, stochastic=True),
    ToySampler("Heun", kds.sample_heun),
    ToySampler(
        "DPM2", kds.sample_dpm_2, default_scheduler="karras", discard_next_to_last_sigma=True
    ),
    ToySampler("DPM++ 2M", kds.sample_dpmpp_2m, default_scheduler="karras"),
    ToySampler("DPM++ SDE", kds.sample_dpmpp_sde, default_scheduler="karras", stochastic=True),
    ToySampler(
        "DPM++ 2M SDE", kds.sample_dpmpp_2m_sde, default_scheduler="exponential", stochastic=True
    ),
    ToySampler("Euler + DDIM schedule", kds.sample_euler, scheduler="ddim"),
    ToySampler(
        "Euler a + Align Your Steps",
        kds.sample_euler_ancestral,
        scheduler="align_your_steps",
        stochastic=True,
    ),
    ToySampler("DDIM", None),
)
SAMPLERS_BY_LABEL = {s.label: s for s in SAMPLERS}


def alphas_cumprod() -> torch.Tensor:
    """SD's scaled_linear VP alpha_bar, float64 [1000]."""
    return schedules.sd_alphas_cumprod()


def batch_means() -> torch.Tensor:
    """Per-sample target means ``mu`` broadcast to [N, 4, 1, 1] (prompt-major order)."""
    per_prompt = 2 * PAIRS_PER_PROMPT
    return PROMPT_MEANS.repeat_interleave(per_prompt, dim=0)[:, :, None, None]


def antithetic_normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Unit Gaussian noise in which, within each prompt, the second half is minus the first."""
    prompts, per_prompt = PROMPT_MEANS.shape[0], 2 * PAIRS_PER_PROMPT
    half = torch.randn(
        (prompts, PAIRS_PER_PROMPT, *shape[1:]), generator=generator, dtype=torch.float64
    )
    return torch.cat([half, -half], dim=1).reshape(prompts * per_prompt, *shape[1:])


def latent_shape() -> tuple[int, ...]:
    return (PROMPT_MEANS.shape[0] * 2 * PAIRS_PER_PROMPT, PROMPT_MEANS.shape[1], *LATENT_HW)


def sample_data(mu: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Clean latents x0 = mu + SPREAD * m (per image and channel) + PIXEL_STD * z (per pixel)."""
    shape = latent_shape()
    offset = antithetic_normal((*shape[:2], 1, 1), generator)
    pixels = antithetic_normal(shape, generator)
    return mu + SPREAD * offset + PIXEL_STD * pixels


def exact_denoiser(mu: torch.Tensor, spread: float = SPREAD) -> Denoiser:
    """The exact k-diffusion denoiser E[x0 | x0 + sigma * eps = x] of the toy data (sigma space).

    Per channel the data covariance has eigenvalue spread^2 * pixels + PIXEL_STD^2 along the
    constant image and PIXEL_STD^2 across it; the posterior mean shrinks each part by
    ``lambda / (lambda + sigma^2)`` towards ``mu``. ``spread`` other than SPREAD gives a
    deliberately wrong model (for tests).
    """
    pixels = LATENT_HW[0] * LATENT_HW[1]
    lam_mean = spread**2 * pixels + PIXEL_STD**2
    lam_pixel = PIXEL_STD**2

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        var = sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2
        d = x - mu
        d_mean = d.mean(dim=(2, 3), keepdim=True)
        shrink_mean = lam_mean / (lam_mean + var)
        shrink_pixel = lam_pixel / (lam_pixel + var)
        return mu + shrink_mean * d_mean + shrink_pixel * (d - d_mean)

    return denoise


def ddim_loop(denoise: Denoiser, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) in VP space over the WebUIs' ascending ``timesteps``.

    Like the WebUIs it steps from ``timesteps[-1]`` down to ``timesteps[0]`` and returns x there.
    The model is used as an eps predictor built from the sigma-space denoiser.
    """
    ac = alphas_cumprod()
    ts = timesteps.tolist()
    for t, t_prev in zip(ts[:0:-1], ts[-2::-1], strict=True):
        a, a_prev = float(ac[t]), float(ac[t_prev])
        sigma = math.sqrt((1 - a) / a)
        x0 = denoise(x / math.sqrt(a), torch.full((x.shape[0],), sigma, dtype=x.dtype))
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def sampler_start(sampler: ToySampler, sgm: bool) -> spaces.SamplerStart:
    """Where the WebUI starts this sampler at STEPS steps (SD1.5 schedule)."""
    ac = alphas_cumprod()
    if sampler.function is None:
        return spaces.SamplerStart.from_timestep(int(schedules.webui_timesteps(STEPS)[-1]), ac)
    return spaces.SamplerStart.from_sigmas(
        sigmas_for(sampler), sgm_noise_multiplier=sgm, alphas_cumprod=ac
    )


def sigmas_for(sampler: ToySampler) -> torch.Tensor:
    return schedules.kdiffusion_sigmas(
        sampler.scheduler,
        STEPS,
        schedules.model_sigmas_from_alphas_cumprod(alphas_cumprod()),
        default_scheduler=sampler.default_scheduler,
        discard_next_to_last_sigma=sampler.discard_next_to_last_sigma,
    )


def run_sampler(
    sampler: ToySampler, start_latent: torch.Tensor, mu: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Sample from ``start_latent`` (already in the sampler's own space) with the exact model."""
    denoise = exact_denoiser(mu)
    if sampler.function is None:
        return ddim_loop(denoise, start_latent, schedules.webui_timesteps(STEPS))
    kwargs = {}
    if sampler.stochastic:
        kwargs["noise_sampler"] = lambda sigma, sigma_next: antithetic_normal(
            tuple(start_latent.shape), generator
        )
    return sampler.function(denoise, start_latent, sigmas_for(sampler), disable=True, **kwargs)


def start_latents(
    sampler: ToySampler, sgm: bool, mu: torch.Tensor, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The latents each experiment hands the sampler, in the sampler's space.

    plain: the WebUI's noise, scaled by the WebUI. oms: OMS x_T (Eq. 20, s = 0) with the oracle
    x0_hat = mu, handed back through ``noise_for_sampler`` and scaled by the WebUI. marginal:
    a draw from the exact training marginal at the same alpha_bar (Eq. 20 applied to a real
    data sample is exactly the forward process), converted the same way. comfyui: the
    VP x_T given to a k-diffusion sampler as its latent without conversion (the ComfyUI port's
    mistake). oms_at_999: OMS computed at alphas_cumprod[999] although the sampler starts
    elsewhere (the mistake for DDIM, whose first step is t = 951).
    """
    start = sampler_start(sampler, sgm)
    abar = spaces.start_alpha_bar(start)
    noise = antithetic_normal(latent_shape(), generator)
    x0 = sample_data(mu, generator)
    x_oms = oms_start(mu.expand_as(noise), noise, abar)
    x_marginal = oms_start(x0, noise, abar)
    x_oms_999 = oms_start(mu.expand_as(noise), noise, float(alphas_cumprod()[999]))

    def handed(x_vp: torch.Tensor) -> torch.Tensor:
        return spaces.webui_start_latent(spaces.noise_for_sampler(x_vp, start), start)

    latents = {
        "plain": spaces.webui_start_latent(noise, start),
        "oms": handed(x_oms),
        "marginal": handed(x_marginal),
        "oms_at_999": handed(x_oms_999),
    }
    if start.space == "sigma":
        latents["comfyui"] = x_oms
    return latents


def relative_mean_error(samples: torch.Tensor, mu: torch.Tensor) -> float:
    """Worst |generated mean - target| / |target| over prompts and channels."""
    prompts = PROMPT_MEANS.shape[0]
    generated = samples.mean(dim=(2, 3)).reshape(prompts, -1, samples.shape[1]).mean(dim=1)
    return float(((generated - PROMPT_MEANS) / PROMPT_MEANS).abs().max())


def mean_pull(samples: torch.Tensor) -> float:
    """How far the generated mean falls short of the target, as a fraction (0 = none)."""
    prompts = PROMPT_MEANS.shape[0]
    generated = samples.mean(dim=(2, 3)).reshape(prompts, -1, samples.shape[1]).mean(dim=1)
    return float(1 - (generated / PROMPT_MEANS).mean())


def figures(sampler: ToySampler, sgm: bool, seed: int = 0) -> dict[str, float]:
    """Relative mean error of each start for one sampler (see :func:`start_latents`)."""
    generator = torch.Generator().manual_seed(seed)
    mu = batch_means()
    latents = start_latents(sampler, sgm, mu, generator)
    out = {}
    for name, latent in latents.items():
        samples = run_sampler(sampler, latent, mu, generator)
        out[name] = relative_mean_error(samples, mu)
        if name == "plain":
            out["plain_pull"] = mean_pull(samples)
    return out


def main() -> None:
    columns = ("plain_pull", "oms", "marginal", "comfyui", "oms_at_999")
    print(
        f"Toy world: target channel means +/-{float(PROMPT_MEANS.abs().max())}, image-level "
        f"spread {SPREAD}, pixel std {PIXEL_STD}, latent {LATENT_HW}, {STEPS} steps, "
        "SD scaled_linear schedule, exact denoiser."
    )
    print("Pull of the generated channel means towards 0 without OMS, and relative error of")
    print("the generated means (worst prompt/channel) from each start:\n")
    print(
        "| sampler | SGM mult. | sigma0 / t0 | pull, no OMS | OMS | exact marginal "
        "| VP x_T unconverted | OMS at t=999 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for sampler in SAMPLERS:
        for sgm in (False, True) if sampler.function is not None else (False,):
            start = sampler_start(sampler, sgm)
            where = f"t0={start.t0}" if start.space == "timestep" else f"{start.sigma0:.4f}"
            row = figures(sampler, sgm)
            cells = " | ".join(f"{row[c]:.2%}" if c in row else "n/a" for c in columns)
            print(f"| {sampler.label} | {'on' if sgm else 'off'} | {where} | {cells} |")


if __name__ == "__main__":
    main()
