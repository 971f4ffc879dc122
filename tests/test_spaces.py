"""Sampler starts, VP <-> sigma conversions and the WebUIs' schedules (oms_ext.spaces/schedules)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import k_diffusion.sampling as kds
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oms_ext import schedules, spaces
from oms_ext.step import oms_start

AC = schedules.sd_alphas_cumprod()
MODEL_SIGMAS = schedules.model_sigmas_from_alphas_cumprod(AC)
SIGMA_MIN, SIGMA_MAX = float(MODEL_SIGMAS[0]), float(MODEL_SIGMAS[-1])
#: sigma0 of a zero-terminal-SNR schedule (the WebUIs' option, ztsnr checkpoints).
ZTSNR_SIGMA0 = 4518.8

sigmas_st = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
alpha_bars_st = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)


def _latent(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- conversions -------------------------------------------------------------------------


@given(sigmas_st)
def test_sigma_to_alpha_bar_round_trips(sigma: float) -> None:
    assert math.isclose(
        spaces.alpha_bar_to_sigma(spaces.sigma_to_alpha_bar(sigma)), sigma, rel_tol=1e-9
    )


@given(alpha_bars_st)
def test_alpha_bar_to_sigma_round_trips(alpha_bar: float) -> None:
    assert math.isclose(
        spaces.sigma_to_alpha_bar(spaces.alpha_bar_to_sigma(alpha_bar)), alpha_bar, rel_tol=1e-9
    )


@settings(max_examples=50, deadline=None)
@given(alpha_bars_st, st.integers(0, 2**31 - 1))
def test_latent_converters_round_trip(alpha_bar: float, seed: int) -> None:
    x_vp = _latent(seed, torch.float64)
    x_kd = spaces.sampler_latent_from_vp(x_vp, alpha_bar)
    torch.testing.assert_close(spaces.vp_from_sigma_latent(x_kd, alpha_bar), x_vp)


def test_sigma_latent_is_x0_plus_sigma_noise_for_a_vp_latent() -> None:
    x0, eps = _latent(1, torch.float64), _latent(2, torch.float64)
    sigma = 7.0
    abar = spaces.sigma_to_alpha_bar(sigma)
    x_vp = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    torch.testing.assert_close(spaces.sampler_latent_from_vp(x_vp, abar), x0 + sigma * eps)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_alpha_bar_to_sigma_rejects_values_outside_zero_one(bad: float) -> None:
    with pytest.raises(ValueError, match="alpha_bar"):
        spaces.alpha_bar_to_sigma(bad)


# --- SamplerStart ------------------------------------------------------------------------


def test_start_alpha_bar_of_a_sigma_start_is_one_over_one_plus_sigma_squared() -> None:
    start = spaces.SamplerStart.from_sigmas(
        torch.tensor([SIGMA_MAX, 1.0, 0.0], dtype=torch.float64)
    )
    assert math.isclose(spaces.start_alpha_bar(start), float(AC[999]), rel_tol=1e-9)


def test_start_alpha_bar_of_a_timestep_start_is_alphas_cumprod_at_t0() -> None:
    start = spaces.SamplerStart.from_timestep(951, AC)
    assert spaces.start_alpha_bar(start) == float(AC[951])


def test_from_sigmas_takes_the_sampler_start_when_it_ignores_the_schedule() -> None:
    # DPM fast/adaptive: noise scaled by the schedule's first sigma, integration from sigma_max.
    start = spaces.SamplerStart.from_sigmas([11.0, 1.0, 0.0], sampler_sigma0=SIGMA_MAX)
    assert (start.sigma0, start.noise_sigma) == (SIGMA_MAX, 11.0)
    x_vp = _latent(3, torch.float64)
    latent = spaces.webui_start_latent(spaces.noise_for_sampler(x_vp, start), start)
    torch.testing.assert_close(latent, x_vp / math.sqrt(spaces.start_alpha_bar(start)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"space": "vp", "sigma0": 1.0}, "space"),
        ({"space": "sigma"}, "sigma0 is required"),
        ({"space": "sigma", "sigma0": 0.0}, "sigma0 must be a finite sigma > 0"),
        ({"space": "sigma", "sigma0": float("inf")}, "sigma0"),
        ({"space": "sigma", "sigma0": 1.0, "t0": 3}, "t0 must be None"),
        ({"space": "timestep", "t0": 951}, "alphas_cumprod is required"),
        ({"space": "timestep", "t0": 1000, "alphas_cumprod": AC}, r"\[0, 999\]"),
        ({"space": "timestep", "t0": 95.1, "alphas_cumprod": AC}, "int timestep"),
        ({"space": "timestep", "t0": 951, "alphas_cumprod": AC, "sigma0": 1.0}, "None"),
        (
            {"space": "timestep", "t0": 951, "alphas_cumprod": AC, "sgm_noise_multiplier": True},
            "k-diffusion",
        ),
        ({"space": "timestep", "t0": 1, "alphas_cumprod": AC[None]}, "1-D"),
        ({"space": "timestep", "t0": 1, "alphas_cumprod": AC + 1}, r"\[0, 1\]"),
    ],
)
def test_sampler_start_rejects_inconsistent_descriptions(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spaces.SamplerStart(**kwargs)


def test_from_sigmas_rejects_an_empty_schedule() -> None:
    with pytest.raises(ValueError, match="empty"):
        spaces.SamplerStart.from_sigmas([])


def test_nearest_timestep_of_the_ddim_schedule_start_is_951() -> None:
    sigmas = schedules.kdiffusion_sigmas("ddim", 20, MODEL_SIGMAS)
    start = spaces.SamplerStart.from_sigmas(sigmas, alphas_cumprod=AC)
    assert spaces.nearest_timestep(start) == 951
    assert spaces.nearest_timestep(spaces.SamplerStart.from_sigmas(sigmas)) is None


# --- noise_for_sampler -------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=0.05, max_value=100.0), st.booleans(), st.integers(0, 2**31 - 1))
def test_noise_after_webui_scaling_is_the_sigma_space_latent(
    sigma0: float, sgm: bool, seed: int
) -> None:
    start = spaces.SamplerStart.from_sigmas([sigma0, 0.0], sgm_noise_multiplier=sgm)
    x_vp = _latent(seed, torch.float64)
    latent = spaces.webui_start_latent(spaces.noise_for_sampler(x_vp, start), start)
    expected = spaces.sampler_latent_from_vp(x_vp, spaces.start_alpha_bar(start))
    torch.testing.assert_close(latent, expected, rtol=1e-12, atol=1e-12)


def test_noise_without_sgm_multiplier_is_scaled_by_sqrt_one_plus_sigma_squared_over_sigma() -> None:
    start = spaces.SamplerStart.from_sigmas([SIGMA_MAX, 0.0])
    x_vp = _latent(4)
    factor = math.sqrt(1 + SIGMA_MAX**2) / SIGMA_MAX
    torch.testing.assert_close(spaces.noise_for_sampler(x_vp, start), x_vp * factor)


def test_noise_with_sgm_multiplier_is_the_vp_latent_itself() -> None:
    start = spaces.SamplerStart.from_sigmas([SIGMA_MAX, 0.0], sgm_noise_multiplier=True)
    x_vp = _latent(5)
    assert torch.equal(spaces.noise_for_sampler(x_vp, start), x_vp)


def test_noise_for_a_timestep_sampler_is_the_vp_latent_itself() -> None:
    x_vp = _latent(6)
    start = spaces.SamplerStart.from_timestep(999, AC)
    assert torch.equal(spaces.noise_for_sampler(x_vp, start), x_vp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_noise_for_sampler_keeps_dtype_and_device(dtype: torch.dtype) -> None:
    x_vp = _latent(7, dtype)
    out = spaces.noise_for_sampler(x_vp, spaces.SamplerStart.from_sigmas([SIGMA_MAX, 0.0]))
    assert (out.dtype, out.device, out.shape) == (dtype, x_vp.device, x_vp.shape)


def test_device_is_kept_on_meta_tensors() -> None:
    x_vp = torch.empty(1, 4, 8, 8, device="meta")
    out = spaces.noise_for_sampler(x_vp, spaces.SamplerStart.from_sigmas([SIGMA_MAX, 0.0]))
    assert out.device.type == "meta"


# --- zero terminal SNR -------------------------------------------------------------------


def test_zero_terminal_snr_start_needs_no_oms() -> None:
    abar = spaces.sigma_to_alpha_bar(ZTSNR_SIGMA0)
    assert 4e-8 < abar < 6e-8
    assert not spaces.needs_oms(abar)
    assert not spaces.needs_oms(0.0)
    assert spaces.needs_oms(float(AC[999]))


@pytest.mark.parametrize("sgm", [False, True])
def test_zero_terminal_snr_start_returns_the_input_unchanged(sgm: bool) -> None:
    start = spaces.SamplerStart.from_sigmas([ZTSNR_SIGMA0, 0.0], sgm_noise_multiplier=sgm)
    x = _latent(8)
    assert spaces.noise_for_sampler(x, start) is x


def test_oms_step_at_alpha_bar_zero_returns_x_S_exactly() -> None:
    x_S, x0_hat = _latent(9), 3 * _latent(10)
    assert torch.equal(oms_start(x0_hat, x_S, 0.0), x_S)


@given(st.floats(min_value=0.0, max_value=1e-4))
def test_oms_step_tends_to_x_S_as_alpha_bar_vanishes(alpha_bar: float) -> None:
    x_S, x0_hat = _latent(9), 3 * _latent(10)
    gap = (oms_start(x0_hat, x_S, alpha_bar) - x_S).abs()
    bound = math.sqrt(alpha_bar) * x0_hat.abs() + (1 - math.sqrt(1 - alpha_bar)) * x_S.abs()
    assert bool((gap <= bound + 1e-6).all())


def test_zero_terminal_snr_pipeline_hands_the_seed_noise_back() -> None:
    x_S, x0_hat = _latent(11), 3 * _latent(12)
    start = spaces.SamplerStart.from_sigmas([ZTSNR_SIGMA0, 0.0])
    noise = spaces.noise_for_sampler(oms_start(x0_hat, x_S, spaces.start_alpha_bar(start)), start)
    torch.testing.assert_close(noise, x_S, rtol=0, atol=3e-3)


@settings(max_examples=30, deadline=None)
@given(st.floats(min_value=1e-4, max_value=0.5), st.integers(0, 2**31 - 1))
def test_oms_step_with_s_zero_keeps_x_S_contribution_exactly(alpha_bar: float, seed: int) -> None:
    x_S, x0_hat = _latent(seed, torch.float64), _latent(seed + 1, torch.float64)
    x_T = oms_start(x0_hat, x_S, alpha_bar, s=0.0)
    x_S_part = (x_T - math.sqrt(alpha_bar) * x0_hat) / math.sqrt(1 - alpha_bar)
    torch.testing.assert_close(x_S_part, x_S, rtol=1e-5, atol=1e-5)


# --- unsupported models ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "is_flow", "name"),
    [(16, True, "Flux"), (16, False, "SD3"), (16, True, "Chroma"), (4, True, "a flow model")],
)
def test_flow_and_16_channel_models_are_unsupported(
    channels: int, is_flow: bool, name: str
) -> None:
    with pytest.raises(spaces.UnsupportedModelError, match=f"{name}.*continues without OMS"):
        spaces.check_model_supported(channels, is_flow=is_flow, name=name)


def test_unsupported_model_error_is_a_value_error() -> None:
    assert issubclass(spaces.UnsupportedModelError, ValueError)


def test_four_channel_vp_models_are_supported() -> None:
    spaces.check_model_supported(4, is_flow=False, name="SD1.5")


# --- schedules: fact checks against the WebUIs and k-diffusion ------------------------------


def test_sd_schedule_matches_the_published_terminal_alpha_bar() -> None:
    assert math.isclose(float(AC[999]), 0.0046601, rel_tol=1e-4)
    assert math.isclose(SIGMA_MAX, 14.6146, rel_tol=1e-5)
    assert math.isclose(SIGMA_MIN, 0.0292, rel_tol=1e-2)


@pytest.mark.parametrize(
    ("scheduler", "sigma0"),
    [("automatic", 14.614640), ("sgm_uniform", 14.614640), ("karras", 14.614643),
     ("align_your_steps", 14.615)],
)
def test_first_sigma_at_4_steps_matches_the_measured_webui_start(
    scheduler: str, sigma0: float
) -> None:
    # Measured in Forge and AUTOMATIC1111 (SD1.5, 4 steps); the WebUIs round in float32.
    sigmas = schedules.kdiffusion_sigmas(scheduler, 4, MODEL_SIGMAS)
    assert math.isclose(float(sigmas[0]), sigma0, rel_tol=3e-7)


def test_webui_timesteps_start_at_951_for_20_steps_and_751_for_4() -> None:
    assert int(schedules.webui_timesteps(20)[-1]) == 951
    assert int(schedules.webui_timesteps(4)[-1]) == 751
    assert int(schedules.webui_timesteps(20)[0]) == 1


def test_ddim_scheduler_starts_at_the_sigma_of_timestep_951_for_20_steps() -> None:
    sigmas = schedules.kdiffusion_sigmas("ddim", 20, MODEL_SIGMAS)
    assert float(sigmas[0]) == float(MODEL_SIGMAS[951])
    assert sigmas.shape == (21,)


def test_discarding_the_penultimate_sigma_moves_the_ddim_schedule_start_to_988() -> None:
    sigmas = schedules.kdiffusion_sigmas("ddim", 20, MODEL_SIGMAS, discard_next_to_last_sigma=True)
    assert float(sigmas[0]) == float(MODEL_SIGMAS[988])
    # 21 steps give 22 model sigmas (1, 48, ..., 988) + 0, minus the penultimate: the WebUIs
    # then run 21 steps, not 20.
    assert sigmas.shape == (22,)
    assert float(sigmas[-1]) == 0.0 and float(sigmas[-2]) == float(MODEL_SIGMAS[48])


def test_automatic_uses_the_sampler_default_scheduler() -> None:
    torch.testing.assert_close(
        schedules.kdiffusion_sigmas("automatic", 20, MODEL_SIGMAS, default_scheduler="karras"),
        schedules.karras_sigmas(20, SIGMA_MIN, SIGMA_MAX),
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (schedules.karras_sigmas, kds.get_sigmas_karras),
        (schedules.exponential_sigmas, kds.get_sigmas_exponential),
        (schedules.polyexponential_sigmas, kds.get_sigmas_polyexponential),
    ],
)
@pytest.mark.parametrize("n", [1, 4, 20, 37])
def test_formula_schedules_match_k_diffusion(ours, theirs, n: int) -> None:
    torch.testing.assert_close(
        ours(n, SIGMA_MIN, SIGMA_MAX), theirs(n, SIGMA_MIN, SIGMA_MAX).double(), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("n", [2, 4, 20, 37])
def test_uniform_schedule_matches_k_diffusion_discrete_schedule(n: int) -> None:
    from k_diffusion.external import DiscreteSchedule

    theirs = DiscreteSchedule(MODEL_SIGMAS.float(), quantize=False).get_sigmas(n)
    torch.testing.assert_close(
        schedules.uniform_sigmas(n, MODEL_SIGMAS), theirs.double(), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("n", [4, 20])
def test_beta_schedule_matches_scipy_quantiles(n: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    levels = [1 - i / (n - 1) for i in range(n)]
    expected = [SIGMA_MIN + stats.beta.ppf(q, 0.6, 0.6) * (SIGMA_MAX - SIGMA_MIN) for q in levels]
    got = schedules.beta_sigmas(n, SIGMA_MIN, SIGMA_MAX)
    torch.testing.assert_close(got[:-1], torch.tensor(expected, dtype=torch.float64))


def test_align_your_steps_keeps_its_table_at_its_length_and_interpolates_otherwise() -> None:
    table = schedules.AYS_SIGMAS["sd15"]  # 11 values: the WebUIs use it as is for n = 11
    same = schedules.align_your_steps_sigmas(len(table), table)
    assert same[:-1].tolist() == list(table)
    resampled = schedules.align_your_steps_sigmas(21, table)
    # 21 points put every other one on a table value, geometric means in between.
    torch.testing.assert_close(resampled[:-1:2], torch.tensor(table, dtype=torch.float64))
    assert math.isclose(float(resampled[1]), math.sqrt(table[0] * table[1]), rel_tol=1e-12)


def test_ddim_scheduler_starts_at_timestep_751_for_4_steps() -> None:
    sigmas = schedules.kdiffusion_sigmas("ddim", 4, MODEL_SIGMAS)
    assert float(sigmas[0]) == float(MODEL_SIGMAS[751])


@pytest.mark.parametrize("name", [n for n in schedules.SCHEDULER_NAMES if n != "ddim"])
@pytest.mark.parametrize("steps", [4, 20])
def test_every_other_scheduler_descends_from_about_sigma_max(name: str, steps: int) -> None:
    sigmas = schedules.scheduler_sigmas(name, steps, MODEL_SIGMAS)
    assert sigmas.shape == (steps + 1,)
    assert bool((sigmas[:-1] > sigmas[1:]).all())
    assert abs(float(sigmas[0]) / SIGMA_MAX - 1) < 1e-4


def test_unknown_scheduler_is_rejected_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'foo'.*karras"):
        schedules.scheduler_sigmas("foo", 20, MODEL_SIGMAS)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_step_counts_must_be_positive_ints(bad) -> None:
    with pytest.raises(ValueError, match="steps"):
        schedules.karras_sigmas(bad, SIGMA_MIN, SIGMA_MAX)


def test_lcm_table_ends_at_the_model_sigma_max() -> None:
    table = schedules.lcm_model_sigmas(MODEL_SIGMAS)
    assert table.shape == (50,)
    assert float(table[-1]) == SIGMA_MAX and float(table[0]) == float(MODEL_SIGMAS[19])


# --- the README's start table --------------------------------------------------------------


def _start_table_tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "start_table.py"
    spec = importlib.util.spec_from_file_location("start_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["start_table"] = module
    spec.loader.exec_module(module)
    return module


def test_readme_start_table_is_what_the_script_generates() -> None:
    tool = _start_table_tool()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert tool.readme_block(readme) == tool.render(), "run: python tools/start_table.py --write"


@pytest.mark.parametrize(
    ("sampler", "scheduler", "t"),
    [("DDIM", "karras", 951), ("PLMS", "automatic", 951), ("UniPC", "automatic", 999),
     ("Euler", "ddim", 951), ("DPM2", "ddim", 988), ("DPM++ 2M", "automatic", 999),
     ("LCM", "ddim", 999), ("DPM fast", "ddim", 999)],
)
def test_start_table_places_samplers_where_the_webuis_start_them(
    sampler: str, scheduler: str, t: int
) -> None:
    tool = _start_table_tool()
    by_label = {s.label: s for s in tool.SAMPLERS}
    assert spaces.nearest_timestep(tool.sampler_start(by_label[sampler], scheduler)) == t
