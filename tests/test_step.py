"""Eq. 21 (OMS guidance) and Eq. 20 (the one VP step to the base model's start)."""

import math

import pytest
import torch

from oms_ext.step import cfg_combine, oms_start

SHAPE = (2, 4, 9, 7)
A999 = 0.00466009508818388


def _randn(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_cfg_combine_is_uncond_plus_w_times_difference() -> None:
    u, c = _randn(1), _randn(2)
    torch.testing.assert_close(cfg_combine(u, c, 2.5), u + 2.5 * (c - u))


def test_cfg_combine_at_w1_is_the_conditional_output() -> None:
    u, c = _randn(1), _randn(2)
    torch.testing.assert_close(cfg_combine(u, c, 1.0), c)


def test_cfg_combine_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        cfg_combine(_randn(1), _randn(2, (1, 4, 9, 7)), 2.0)


def test_oms_start_with_s0_is_ddim_and_keeps_the_seed_noise() -> None:
    x0, x_s = _randn(1), _randn(2)
    expected = math.sqrt(A999) * x0 + math.sqrt(1 - A999) * x_s
    torch.testing.assert_close(oms_start(x0, x_s, A999), expected)


def test_oms_start_with_max_s_is_ddpm_and_ignores_x_S() -> None:
    x0, z = _randn(1), _randn(3)
    s = math.sqrt(1 - A999)
    a = oms_start(x0, _randn(2), A999, s=s, noise=z)
    b = oms_start(x0, _randn(4), A999, s=s, noise=z)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, math.sqrt(A999) * x0 + s * z)


def test_oms_start_with_intermediate_s_mixes_seed_and_fresh_noise() -> None:
    x0, x_s, z = _randn(1), _randn(2), _randn(3)
    a, s = 0.1, 0.6
    expected = math.sqrt(a) * x0 + math.sqrt(1 - a - s * s) * x_s + s * z
    torch.testing.assert_close(oms_start(x0, x_s, a, s=s, noise=z), expected)


def test_oms_start_at_zero_terminal_snr_returns_x_S() -> None:
    x_s = _randn(2)
    torch.testing.assert_close(oms_start(_randn(1), x_s, 0.0), x_s)


def test_oms_start_accepts_a_0dim_tensor_alpha_bar() -> None:
    x0, x_s = _randn(1), _randn(2)
    torch.testing.assert_close(oms_start(x0, x_s, torch.tensor(A999)), oms_start(x0, x_s, A999))


@pytest.mark.parametrize("alpha_bar", [-0.01, 1.01, float("nan")])
def test_oms_start_rejects_alpha_bar_outside_0_1(alpha_bar: float) -> None:
    with pytest.raises(ValueError, match="alpha_bar"):
        oms_start(_randn(1), _randn(2), alpha_bar)


@pytest.mark.parametrize("s", [-0.01, 1.0])
def test_oms_start_rejects_s_outside_0_to_sqrt_1_minus_alpha_bar(s: float) -> None:
    with pytest.raises(ValueError, match=r"s must lie in \[0, sqrt\(1 - alpha_bar\)\]"):
        oms_start(_randn(1), _randn(2), 0.1, s=s, noise=_randn(3))


def test_oms_start_tolerates_s_a_rounding_error_above_its_maximum() -> None:
    s = math.sqrt(1 - A999) + 1e-9
    out = oms_start(_randn(1), _randn(2), A999, s=s, noise=_randn(3))
    assert torch.isfinite(out).all()


def test_oms_start_requires_noise_when_s_is_positive() -> None:
    with pytest.raises(ValueError, match="noise="):
        oms_start(_randn(1), _randn(2), A999, s=0.5)


def test_oms_start_rejects_noise_of_another_shape() -> None:
    with pytest.raises(ValueError, match="noise"):
        oms_start(_randn(1), _randn(2), A999, s=0.5, noise=_randn(3, (1, 4, 9, 7)))


def test_oms_start_rejects_x0_hat_of_another_shape() -> None:
    with pytest.raises(ValueError, match="x0_hat"):
        oms_start(_randn(1, (1, 4, 9, 7)), _randn(2), A999)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_oms_start_returns_x_S_dtype_computed_in_float32(dtype: torch.dtype) -> None:
    x0, x_s = _randn(1), _randn(2).to(dtype)
    out = oms_start(x0, x_s, A999)
    assert out.dtype == dtype
    expected = (math.sqrt(A999) * x0 + math.sqrt(1 - A999) * x_s.float()).to(dtype)
    assert torch.equal(out, expected)
