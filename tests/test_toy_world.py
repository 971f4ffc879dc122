"""OMS starts the WebUI samplers in the right place: proof in a Gaussian toy world.

The toy world (tools/toy_world.py; run it to print the figures) has prompt-dependent latent
means, SD's scaled_linear schedule and the exact denoiser; samplers are k-diffusion's own and
a DDIM loop on the WebUIs' timesteps. Starting points pass through oms_ext.spaces and the
WebUI's scaling of its unit noise, with and without the SGM noise multiplier.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from oms_ext import spaces

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "toy_world.py"
_spec = importlib.util.spec_from_file_location("toy_world", _TOOL)
toy = importlib.util.module_from_spec(_spec)
sys.modules["toy_world"] = toy
_spec.loader.exec_module(toy)

#: The issue's bars: a large pull without OMS, OMS as close as the exact marginal start.
MIN_PULL = 0.20
MAX_OMS_ERROR = 0.05
MAX_GAP_TO_MARGINAL = 0.02

CASES = [
    pytest.param(s.label, sgm, id=f"{s.label}-sgm_{'on' if sgm else 'off'}")
    for s in toy.SAMPLERS
    for sgm in ((False, True) if s.function is not None else (False,))
]
KDIFFUSION_CASES = [c for c in CASES if toy.SAMPLERS_BY_LABEL[c.values[0]].function is not None]


@functools.cache
def figures(label: str, sgm: bool) -> dict[str, float]:
    return toy.figures(toy.SAMPLERS_BY_LABEL[label], sgm)


@pytest.mark.parametrize(("label", "sgm"), CASES)
def test_without_oms_the_generated_mean_is_pulled_towards_zero(label: str, sgm: bool) -> None:
    assert figures(label, sgm)["plain_pull"] >= MIN_PULL


@pytest.mark.parametrize(("label", "sgm"), CASES)
def test_oms_start_reaches_the_target_mean_as_well_as_the_training_marginal(
    label: str, sgm: bool
) -> None:
    row = figures(label, sgm)
    assert row["oms"] < MAX_OMS_ERROR
    assert abs(row["oms"] - row["marginal"]) <= MAX_GAP_TO_MARGINAL


@pytest.mark.parametrize(("label", "sgm"), KDIFFUSION_CASES)
def test_vp_start_fed_unconverted_to_a_kdiffusion_sampler_misses_the_target(
    label: str, sgm: bool
) -> None:
    assert figures(label, sgm)["comfyui"] >= MAX_OMS_ERROR


@pytest.mark.parametrize("label", ["DDIM", "Euler + DDIM schedule"])
def test_oms_at_timestep_999_misses_the_target_when_the_sampler_starts_at_951(label: str) -> None:
    start = toy.sampler_start(toy.SAMPLERS_BY_LABEL[label], sgm=False)
    assert spaces.nearest_timestep(start) == 951
    assert figures(label, False)["oms_at_999"] >= MAX_OMS_ERROR


@pytest.mark.parametrize("sgm", [False, True])
def test_handed_back_noise_becomes_the_vp_start_in_sigma_space_after_webui_scaling(
    sgm: bool,
) -> None:
    start = toy.sampler_start(toy.SAMPLERS_BY_LABEL["DPM++ 2M"], sgm)
    abar = spaces.start_alpha_bar(start)
    x_vp = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    latent = spaces.webui_start_latent(spaces.noise_for_sampler(x_vp, start), start)
    torch.testing.assert_close(latent, x_vp / math.sqrt(abar), rtol=1e-12, atol=0)


def _residual_correlations(denoiser_spread: float) -> tuple[float, float]:
    """Correlation of the denoising residual with the noisy input, image-mean and pixel parts.

    The posterior mean leaves a residual uncorrelated with its input (orthogonality).
    """
    generator = torch.Generator().manual_seed(2)
    mu = toy.batch_means().repeat(32, 1, 1, 1)
    x0 = torch.cat([toy.sample_data(toy.batch_means(), generator) for _ in range(32)])
    sigma = 3.0
    x = x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    denoise = toy.exact_denoiser(mu, spread=denoiser_spread)
    residual = x0 - denoise(x, torch.full((x.shape[0],), sigma))
    d = x - mu

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    r_mean, d_mean = residual.mean(dim=(2, 3)), d.mean(dim=(2, 3))
    r_pix = residual - residual.mean(dim=(2, 3), keepdim=True)
    d_pix = d - d.mean(dim=(2, 3), keepdim=True)
    return corr(r_mean, d_mean), corr(r_pix, d_pix)


def test_exact_denoiser_leaves_a_residual_uncorrelated_with_its_input() -> None:
    mean_corr, pixel_corr = _residual_correlations(toy.SPREAD)
    assert abs(mean_corr) < 0.06
    assert abs(pixel_corr) < 0.02


def test_denoiser_with_the_wrong_image_spread_fails_the_orthogonality_check() -> None:
    mean_corr, _ = _residual_correlations(0.2 * toy.SPREAD)
    assert abs(mean_corr) > 0.2
