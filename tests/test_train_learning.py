"""Training learns what OMS needs: the caption's data mean, and from it the start x_T of the
base model's training marginal q(x_T | caption) (paper Sec. 3.2-3.3).

Synthetic latents (no VAE): each caption sets the channel means of its latents; a tiny module
is trained with the real loop on the tiny test text encoder. The untrained module fails the
same checks (negative control), so they test learning, not the set-up.
"""

from __future__ import annotations

import math

import pytest
import torch

from oms_ext import oms_start
from oms_ext.schedules import sd_alphas_cumprod
from oms_ext.train import TrainSettings, module_config, train
from oms_ext.unet import build_unet
from tests.train_helpers import channel_mean_latents, one_thread, tiny_encoder  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

MEANS = {
    "a dark night": [-1.0, -0.8, -1.2, -0.9],
    "a bright beach": [1.0, 0.9, 1.1, 0.8],
    "a red car": [1.2, -0.6, 0.7, -0.9],
}
TOLERANCE = 0.10  # relative, per caption and channel
SAMPLES = 256  # x_S draws per caption, in antithetic pairs (x, -x)
ABAR_T = float(sd_alphas_cumprod()[-1])  # SD's alpha_bar at t = 999, 0.0047


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    encoder = tiny_encoder()
    examples = channel_mean_latents(MEANS, per_caption=16)
    config = module_config("tiny", encoder.hidden_size)
    return encoder, examples, config, tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def trained(setup):
    encoder, examples, config, out = setup
    settings = TrainSettings(
        output_dir=out, steps=300, batch_size=16, resolution=64, learning_rate=1e-3,
        save_every=0, cpu=True, progress=False,
    )  # fmt: skip
    return train(settings, examples, encoder, config, family="sd1").model


def _data_stats(examples, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of the caption's latents."""
    x = torch.stack([e.latent for e in examples if e.caption == caption])
    return x.mean(dim=(0, 2, 3)), x.transpose(0, 1).reshape(4, -1).var(dim=1)


def _x_s(seed: int) -> torch.Tensor:
    half = torch.randn((SAMPLES // 2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    return torch.cat([half, -half])  # the x_S term then averages to exactly 0


@torch.no_grad()
def _predicted(model, encoder, caption: str, x_s: torch.Tensor) -> torch.Tensor:
    return -model(x_s, encoder([caption] * len(x_s)))


def _relative_errors(model, encoder, examples) -> dict[str, float]:
    """Largest relative error of x0_hat's channel means against the data's, per caption."""
    errors = {}
    for i, caption in enumerate(MEANS):
        mean, _ = _data_stats(examples, caption)
        got = _predicted(model, encoder, caption, _x_s(i)).mean(dim=(0, 2, 3))
        errors[caption] = float(((got - mean).abs() / mean.abs()).max())
    return errors


def _start_moment_errors(model, encoder, examples) -> dict[str, tuple[float, float]]:
    """Per caption: largest relative error of x_T's channel means against those of q(x_T | c)
    = N(sqrt(abar) mu_c, abar var_c + 1 - abar), and of its channel stds."""
    errors = {}
    for i, caption in enumerate(MEANS):
        mean, var = _data_stats(examples, caption)
        x_s = _x_s(100 + i)
        x_t = oms_start(_predicted(model, encoder, caption, x_s), x_s, ABAR_T)
        want_mean = math.sqrt(ABAR_T) * mean
        want_std = (ABAR_T * var + 1 - ABAR_T).sqrt()
        got_mean = x_t.mean(dim=(0, 2, 3))
        got_std = x_t.transpose(0, 1).reshape(4, -1).std(dim=1)
        errors[caption] = (
            float(((got_mean - want_mean).abs() / want_mean.abs()).max()),
            float(((got_std - want_std).abs() / want_std).max()),
        )
    return errors


def test_x0_hat_has_each_captions_channel_means(trained, setup) -> None:
    encoder, examples, _, _ = setup
    errors = _relative_errors(trained, encoder, examples)
    assert max(errors.values()) <= TOLERANCE, errors


def test_oms_start_has_the_moments_of_the_training_marginal(trained, setup) -> None:
    encoder, examples, _, _ = setup
    errors = _start_moment_errors(trained, encoder, examples)
    assert max(m for m, _ in errors.values()) <= TOLERANCE, errors
    # At abar_T the std is nearly all noise (sqrt(1 - abar)); sampling error ~1 %.
    assert max(s for _, s in errors.values()) <= 0.03, errors


def test_untrained_module_fails_the_same_checks(setup) -> None:
    encoder, examples, config, _ = setup
    torch.manual_seed(0)
    untrained = build_unet(config).eval()
    assert min(_relative_errors(untrained, encoder, examples).values()) > TOLERANCE
    start = _start_moment_errors(untrained, encoder, examples)
    assert min(m for m, _ in start.values()) > TOLERANCE
