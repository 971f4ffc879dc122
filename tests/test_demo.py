"""The no-WebUI demo runs the real OMS path, draws it, and is honest about its random weights."""

import contextlib
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oms_ext import demo
from oms_ext.demo import RANDOM_TEST_MODULE, main
from oms_ext.preview import preview_images


def test_demo_without_module_says_it_uses_random_weights_and_prints_every_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--width", "64", "--height", "96"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM-WEIGHT" in out
    assert "latent [1, 4, 12, 8]" in out
    assert "DDIM, 20 steps (t0 = 951): alpha_bar0 = 0.008155" in out
    assert out.count("noise handed to the sampler") == 4


# --- the picture (--out) -------------------------------------------------------------------

WIDTH, HEIGHT, SEED = 64, 96, 1


def _seed_noise() -> torch.Tensor:
    """The demo's x_S for SEED at WIDTH x HEIGHT, drawn here independently of the demo."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn((1, 4, HEIGHT // 8, WIDTH // 8), generator=generator)


def _run_demo(out: Path, *extra: str) -> tuple[np.ndarray, str]:
    argv = ["--width", str(WIDTH), "--height", str(HEIGHT), "--seed", str(SEED), "--out", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*argv, *extra]) == 0
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        return np.asarray(picture.convert("RGB")), stdout.getvalue()


def _crop(pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    return pixels[top:bottom, left:right]


@pytest.fixture(scope="module")
def random_module_picture(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, str]:
    return _run_demo(tmp_path_factory.mktemp("demo") / "oms.png")


def test_picture_has_the_size_of_three_panels_under_a_banner(
    random_module_picture: tuple[np.ndarray, str],
) -> None:
    pixels, stdout = random_module_picture
    layout = demo.picture_layout(HEIGHT, WIDTH, panels=3, banner=True)
    assert pixels.shape == (layout.size[1], layout.size[0], 3)
    assert pixels.shape[1] >= 3 * WIDTH
    assert f"({layout.size[0]} x {layout.size[1]} px)" in stdout


def test_first_panel_is_the_seed_noise_decoded_by_the_preview(
    random_module_picture: tuple[np.ndarray, str],
) -> None:
    pixels, _ = random_module_picture
    layout = demo.picture_layout(HEIGHT, WIDTH, panels=3, banner=True)
    expected = preview_images(_seed_noise(), "sd1")[0].numpy()
    np.testing.assert_array_equal(_crop(pixels, layout.panel_boxes[0]), expected)


def test_start_panel_looks_like_the_noise_and_the_prediction_does_not(
    random_module_picture: tuple[np.ndarray, str],
) -> None:
    # x_T = 0.068 x0_hat + 0.998 x_S in VP scale: nearly the seed's noise. Decoded in the
    # sampler's sigma scale (x 14.6) it would be saturated and far from x_S.
    pixels, _ = random_module_picture
    layout = demo.picture_layout(HEIGHT, WIDTH, panels=3, banner=True)
    x_s, x0_hat, x_t = (_crop(pixels, box).astype(float) for box in layout.panel_boxes)
    assert np.abs(x_t - x_s).mean() < 0.25 * np.abs(x0_hat - x_s).mean()


def test_random_module_banner_is_drawn_across_the_top(
    random_module_picture: tuple[np.ndarray, str],
) -> None:
    pixels, _ = random_module_picture
    layout = demo.picture_layout(HEIGHT, WIDTH, panels=3, banner=True)
    banner = _crop(pixels, layout.banner_box).reshape(-1, 3)
    red = np.all(banner == demo.BANNER_BACKGROUND, axis=1).mean()
    text = np.all(banner > 200, axis=1).mean()
    assert red > 0.5  # the banner's background
    assert text > 0.01  # and white letters on it


def test_every_label_and_the_caption_have_text(
    random_module_picture: tuple[np.ndarray, str],
) -> None:
    pixels, _ = random_module_picture
    layout = demo.picture_layout(HEIGHT, WIDTH, panels=3, banner=True)
    for box in (*layout.label_boxes, layout.caption_box):
        area = _crop(pixels, box).reshape(-1, 3)
        assert np.any(area != demo.BACKGROUND, axis=1).mean() > 0.01


def test_demo_prints_the_prediction_summary(random_module_picture: tuple[np.ndarray, str]) -> None:
    _, stdout = random_module_picture
    assert re.search(
        r"x0_hat preview \(sd1 latent colours\): mean brightness \d+/255 \(Rec\. 601 luma\), "
        r"dominant colour [a-z ]+\n",
        stdout,
    )


def test_picture_of_another_module_has_no_banner_and_uses_the_family_colours(
    tmp_path: Path,
) -> None:
    other = tmp_path / "other-module"
    shutil.copytree(
        RANDOM_TEST_MODULE, other, ignore=shutil.ignore_patterns("reference.safetensors")
    )
    pixels, _ = _run_demo(tmp_path / "oms.png", "--module", str(other), "--family", "sdxl")
    layout = demo.picture_layout(HEIGHT, WIDTH, panels=3, banner=False)
    assert layout.banner_box is None
    assert pixels.shape == (layout.size[1], layout.size[0], 3)
    expected = preview_images(_seed_noise(), "sdxl")[0].numpy()
    np.testing.assert_array_equal(_crop(pixels, layout.panel_boxes[0]), expected)


def test_naming_the_test_module_explicitly_still_draws_the_banner(tmp_path: Path) -> None:
    pixels, _ = _run_demo(tmp_path / "oms.png", "--module", str(RANDOM_TEST_MODULE))
    layout = demo.picture_layout(HEIGHT, WIDTH, panels=3, banner=True)
    assert pixels.shape == (layout.size[1], layout.size[0], 3)
    banner = _crop(pixels, layout.banner_box).reshape(-1, 3)
    assert np.all(banner == demo.BANNER_BACKGROUND, axis=1).mean() > 0.5


def test_out_must_be_a_png(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", "oms.jpg"])
    assert exit_info.value.code == 2
    assert "--out must name a .png file" in capsys.readouterr().err


def test_draw_picture_refuses_panels_of_different_sizes() -> None:
    panels = [
        demo.Panel("a", torch.zeros(8, 8, 3, dtype=torch.uint8)),
        demo.Panel("b", torch.zeros(8, 9, 3, dtype=torch.uint8)),
    ]
    with pytest.raises(ValueError, match="one size"):
        demo.draw_picture(panels, "caption", None)
