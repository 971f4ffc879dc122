"""The no-WebUI demo runs the real OMS path and is honest about its random weights."""

import pytest

from oms_ext.demo import main


def test_demo_without_module_says_it_uses_random_weights_and_prints_every_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--width", "64", "--height", "96"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM-WEIGHT" in out
    assert "latent [1, 4, 12, 8]" in out
    assert "DDIM, 20 steps (t0 = 951): alpha_bar0 = 0.008155" in out
    assert out.count("noise handed to the sampler") == 4
