"""Cheap RGB previews of latents and their one-line summaries (oms_ext.preview)."""

from __future__ import annotations

import colorsys

import pytest
import torch

from oms_ext import preview
from oms_ext.preview import colour_name, preview_images, summarize_latent, summarize_preview

#: Colours as the decoder's image units (-1 = 0, +1 = 255 per channel).
BLACK, WHITE, RED = (-1.0, -1.0, -1.0), (1.0, 1.0, 1.0), (1.0, -1.0, -1.0)


def _uniform_latent(values: torch.Tensor, h: int = 4, w: int = 5) -> torch.Tensor:
    """[4, h, w] latent holding the 4 channel ``values`` everywhere."""
    return values.to(torch.float32).view(4, 1, 1).expand(4, h, w).contiguous()


def _latent_for_colour(family: str, rgb: tuple[float, float, float]) -> torch.Tensor:
    """The smallest latent pixel whose approximation is ``rgb`` (image units), via the pseudo-
    inverse of the family's 4 x 3 map; the map has rank 3, so every colour is reachable."""
    rgb_map = preview.rgb_map_for(family)
    factors = torch.tensor(rgb_map.factors, dtype=torch.float64)
    bias = torch.tensor(rgb_map.bias, dtype=torch.float64)
    target = torch.tensor(rgb, dtype=torch.float64) - bias
    return target @ torch.linalg.pinv(factors)


def _mean_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(-1, 3).to(torch.float64).mean(dim=0)


# --- known latents -> expected colours ---------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_zero_latent_is_mid_grey_in_the_sd1_sd2_space(family: str) -> None:
    images = preview_images(torch.zeros(1, 4, 3, 3), family)
    assert torch.all(images == 128)


def test_zero_latent_is_a_warm_grey_in_the_sdxl_space_because_its_map_has_a_bias() -> None:
    r, g, b = _mean_rgb(preview_images(torch.zeros(1, 4, 3, 3), "sdxl")).tolist()
    assert r > g and r > b
    assert colour_name(r, g, b) == "grey"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize(
    ("rgb", "expected"), [(BLACK, (0, 0, 0)), (WHITE, (255, 255, 255)), (RED, (255, 0, 0))]
)
def test_a_latent_built_for_a_colour_previews_as_that_colour(
    family: str, rgb: tuple[float, float, float], expected: tuple[int, int, int]
) -> None:
    latent = _uniform_latent(_latent_for_colour(family, rgb))
    images = preview_images(latent, family)
    assert torch.all(images == torch.tensor(expected, dtype=torch.uint8))


def test_values_beyond_the_image_range_are_clamped_not_wrapped() -> None:
    very_white = _uniform_latent(_latent_for_colour("sd1", WHITE) * 5)
    very_black = _uniform_latent(_latent_for_colour("sd1", BLACK) * 5)
    assert torch.all(preview_images(very_white, "sd1") == 255)
    assert torch.all(preview_images(very_black, "sd1") == 0)


# Published observations of what raising or lowering one latent channel does to the decoded
# image (Haoming02/sd-webui-latent-playground, README: SD1 channels read as -K, -M, C, Y;
# SDXL's as Y', -Cr, -Cb, pattern). The sources name colours loosely (SDXL's second channel
# is "blue" there, cyan-blue here), so the preview's hue shift must lie within 45 degrees of
# the named colour's hue on the RGB colour wheel.
HUE_OF = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0,
          "purple": 270.0, "magenta": 300.0}
CHANNEL_OBSERVATIONS = [
    ("sd1", 1, "green", "magenta"),
    ("sd1", 2, "cyan", "red"),
    ("sd1", 3, "yellow", "blue"),
    ("sdxl", 1, "blue", "red"),
    ("sdxl", 2, "yellow", "purple"),
]


def _hue_shift_degrees(family: str, channel: int, step: float) -> float:
    base = torch.zeros(4)
    pushed = base.clone()
    pushed[channel] = step
    shift = _mean_rgb(preview_images(_uniform_latent(pushed), family)) - _mean_rgb(
        preview_images(_uniform_latent(base), family)
    )
    # Hue depends only on differences between channels: lift the shift into 0..1 first.
    r, g, b = ((shift - shift.min()) / (shift.max() - shift.min())).tolist()
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360.0


def _hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 360.0 - abs(a - b))


@pytest.mark.parametrize(("family", "channel", "higher", "lower"), CHANNEL_OBSERVATIONS)
def test_raising_or_lowering_a_channel_shifts_the_hue_as_published(
    family: str, channel: int, higher: str, lower: str
) -> None:
    assert _hue_distance(_hue_shift_degrees(family, channel, 1.5), HUE_OF[higher]) < 45
    assert _hue_distance(_hue_shift_degrees(family, channel, -1.5), HUE_OF[lower]) < 45


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_first_channel_is_brightness_as_published(family: str) -> None:
    def brightness(value: float) -> float:
        latent = _uniform_latent(torch.tensor([value, 0.0, 0.0, 0.0]))
        return summarize_latent(latent, family)[0].brightness

    assert brightness(-1.5) + 40 < brightness(0.0) < brightness(1.5) - 40


# --- sizes, batches, dtypes --------------------------------------------------------------


def test_default_size_is_eight_times_the_latent_also_for_odd_sizes() -> None:
    images = preview_images(torch.randn(2, 4, 12, 9), "sd1")
    assert images.shape == (2, 96, 72, 3)
    assert images.dtype == torch.uint8


@pytest.mark.parametrize("size", [(100, 70), (7, 13), (12, 9), (1, 1)])
def test_any_requested_size_is_honoured(size: tuple[int, int]) -> None:
    assert preview_images(torch.randn(1, 4, 12, 9), "sdxl", size=size).shape == (1, *size, 3)


def test_upscaling_keeps_a_uniform_latent_uniform() -> None:
    latent = _uniform_latent(_latent_for_colour("sd1", (0.2, -0.4, 0.6)), h=5, w=3)
    images = preview_images(latent, "sd1", size=(37, 29))
    assert torch.all(images == images[0, 0])


def test_upscaling_is_smooth_not_blocky() -> None:
    latent = torch.zeros(4, 2, 2)
    latent[:, :, 1] = _latent_for_colour("sd1", WHITE).to(torch.float32)[:, None]
    row = preview_images(latent, "sd1", size=(16, 16))[8, :, 0].tolist()
    assert row == sorted(row)  # dark on the left, light on the right, no overshoot
    assert len(set(row)) > 4  # intermediate shades, not two blocks


def test_an_unbatched_latent_gives_an_unbatched_image() -> None:
    assert preview_images(torch.zeros(4, 6, 5), "sd1").shape == (48, 40, 3)


def test_each_batch_row_is_previewed_on_its_own() -> None:
    latents = torch.randn(3, 4, 6, 7, generator=torch.Generator().manual_seed(0))
    batch = preview_images(latents, "sdxl")
    for i in range(3):
        assert torch.equal(batch[i], preview_images(latents[i], "sdxl"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_latents_match_float32_within_one_level(dtype: torch.dtype) -> None:
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = preview_images(latent, "sd1").to(torch.int16)
    want = preview_images(latent.to(torch.float32), "sd1").to(torch.int16)
    assert (got - want).abs().max() <= 1


def test_images_are_uint8_on_the_cpu_and_the_input_is_left_alone() -> None:
    latent = torch.randn(1, 4, 4, 4, dtype=torch.float16)
    before = latent.clone()
    images = preview_images(latent, "sd1")
    assert images.dtype == torch.uint8 and images.device.type == "cpu"
    assert torch.equal(latent, before)


# --- summaries -----------------------------------------------------------------------------


def test_brightness_is_the_rec601_luma_of_the_mean_colour() -> None:
    image = torch.tensor([[[200, 100, 50], [0, 20, 250]]], dtype=torch.uint8)
    summary = summarize_preview(image)
    assert summary.mean_rgb == (100.0, 60.0, 150.0)
    assert summary.brightness == pytest.approx(0.299 * 100 + 0.587 * 60 + 0.114 * 150)


@pytest.mark.parametrize(
    ("rgb", "words"),
    [
        (BLACK, "black"),
        ((-0.5, -0.5, -0.5), "dark grey"),
        (WHITE, "white"),
        ((-0.85, -0.8, -0.45), "dark blue"),
        ((1.0, 0.1, -0.85), "bright orange"),
        ((0.9, -0.9, -0.9), "bright red"),
        ((-0.6, 0.2, -0.6), "green"),
    ],
)
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_summary_names_dark_bright_and_coloured_predictions(
    family: str, rgb: tuple[float, float, float], words: str
) -> None:
    (summary,) = summarize_latent(_uniform_latent(_latent_for_colour(family, rgb)), family)
    assert summary.colour == words
    assert summary.text().endswith(f"dominant colour {words}")


def test_summary_brightness_orders_dark_mid_and_bright_predictions() -> None:
    dark, mid, bright = (
        summarize_latent(_uniform_latent(_latent_for_colour("sd1", (v, v, v))), "sd1")[0]
        for v in (-0.8, 0.0, 0.8)
    )
    assert dark.brightness < 40 and bright.brightness > 215
    assert abs(mid.brightness - 127.5) < 1
    assert dark.text().startswith(f"mean brightness {dark.brightness:.0f}/255 (Rec. 601 luma), ")


def test_summarize_latent_gives_one_summary_per_batch_row() -> None:
    latents = torch.stack(
        [_uniform_latent(_latent_for_colour("sd1", c)) for c in (BLACK, WHITE, RED)]
    )
    assert [s.colour for s in summarize_latent(latents, "sd1")] == [
        "black", "white", "bright red"
    ]


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((128, 128, 128), "grey"),
        ((120, 130, 140), "grey"),  # chroma 20: still a grey
        ((0, 0, 0), "black"),
        ((230, 230, 235), "white"),
        ((20, 30, 90), "dark blue"),
        ((250, 140, 20), "bright orange"),
        ((240, 230, 40), "bright yellow"),
        ((40, 220, 220), "bright cyan"),
        ((130, 60, 170), "purple"),
        ((220, 40, 160), "bright magenta"),
        ((200, 40, 150), "magenta"),  # value 0.78: not "bright"
        ((90, 20, 20), "dark red"),
    ],
)
def test_colour_name_follows_the_documented_mapping(
    rgb: tuple[int, int, int], name: str
) -> None:
    assert colour_name(*rgb) == name


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 16])
def test_wrong_channel_count_names_expected_and_got(channels: int) -> None:
    with pytest.raises(ValueError, match=rf"expected 4 latent channels .* got {channels}"):
        preview_images(torch.zeros(1, channels, 8, 8), "sd1")


@pytest.mark.parametrize("family", ["sd3", "SDXL", "flux", None])
def test_unknown_family_lists_the_valid_ones(family: object) -> None:
    with pytest.raises(ValueError, match="'sd1', 'sd2', 'sdxl'"):
        preview_images(torch.zeros(1, 4, 8, 8), family)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(4, 8), (1, 1, 4, 8, 8)])
def test_a_tensor_that_is_not_a_latent_image_is_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected a latent"):
        preview_images(torch.zeros(shape), "sd1")


@pytest.mark.parametrize("size", [(0, 8), (8, -1), (8,), (8.0, 8), "64x64"])
def test_a_bad_size_is_refused(size: object) -> None:
    with pytest.raises(ValueError, match="size"):
        preview_images(torch.zeros(1, 4, 8, 8), "sd1", size=size)  # type: ignore[arg-type]


def test_a_latent_with_nan_is_refused() -> None:
    latent = torch.zeros(1, 4, 8, 8)
    latent[0, 2, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        preview_images(latent, "sd1")


def test_colour_name_refuses_values_outside_0_255() -> None:
    with pytest.raises(ValueError, match=r"0\.\.255"):
        colour_name(300, 0, 0)
