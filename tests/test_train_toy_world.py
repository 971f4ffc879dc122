"""End to end in a toy world (tools/toy_world_training.py): a diffusion model trained here on
SD's schedule, sampled from pure noise, pulls dark and bright images toward grey; started from
the x_T of an OMS module trained by oms_ext.train, it keeps each caption's brightness."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.train_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
_TOOL = Path(__file__).resolve().parents[1] / "tools" / "toy_world_training.py"
_spec = importlib.util.spec_from_file_location("toy_world_training", _TOOL)
toy = importlib.util.module_from_spec(_spec)
sys.modules["toy_world_training"] = toy
_spec.loader.exec_module(toy)

BUDGET = toy.Budget(images=32, base_steps=1000, oms_steps=400, samples=32)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return toy.run(BUDGET, tmp_path_factory.mktemp("oms"))


@pytest.mark.parametrize("caption", ["a dark image", "a bright image"])
def test_pure_noise_pulls_brightness_toward_the_middle(result, caption: str) -> None:
    parts = result[caption]
    data, pure = float(parts["data"].mean()), float(parts["pure noise"].mean())
    assert abs(pure) < 0.5 * abs(data), (data, pure)


@pytest.mark.parametrize("caption", list(toy.CAPTIONS))
def test_oms_start_keeps_each_captions_brightness(result, caption: str) -> None:
    parts = result[caption]
    data, oms = float(parts["data"].mean()), float(parts["OMS"].mean())
    assert abs(oms - data) < 0.3, (data, oms)  # 10 % of the dark-to-bright range
