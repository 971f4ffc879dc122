"""Command-line demo of the OMS core, no WebUI needed: ``python -m oms_ext.demo``.

It runs the whole OMS step on the CPU for a few WebUI sampler starts and prints what happens
to the starting latent. With ``--out oms.png`` it also draws one picture: the seed's noise
x_S, the OMS prediction x0_hat and the start x_T of an "Euler a" sampler side by side, each
through the same cheap latent-to-RGB preview (:mod:`oms_ext.preview`), with the prediction's
brightness and colour underneath. Without ``--module`` it uses the small random-weight module
shipped for the tests, and says so, in the console and on the picture: its numbers show that
the pipeline runs, not what a trained module would do to an image.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from oms_ext.loading import load_oms
from oms_ext.preview import FAMILIES, PreviewSummary, preview_images, summarize_latent
from oms_ext.schedules import sd_alphas_cumprod
from oms_ext.spaces import SamplerStart, noise_for_sampler, start_alpha_bar
from oms_ext.step import oms_start

if TYPE_CHECKING:
    from types import ModuleType

    from PIL import Image, ImageDraw, ImageFont

    Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

RANDOM_TEST_MODULE = Path(__file__).resolve().parents[1] / "tests" / "data" / "oms-tiny"
#: The sampler start whose x_T the picture shows (one of :func:`_starts`).
PICTURE_START = "Euler a / Automatic"
#: Drawn across the top of the picture whenever the random-weight test module made it (the
#: default, or named with --module).
RANDOM_MODULE_BANNER = (
    "RANDOM-WEIGHT TEST MODULE: these colours mean nothing. Pass --module with a real OMS "
    "module to see a real prediction."
)


def _starts() -> list[tuple[str, SamplerStart]]:
    """A few typical SD1.5 starts at 20 steps (sigma values in k-diffusion sigma space)."""
    acp = sd_alphas_cumprod()
    sigma_max = float(((1 - acp[-1]) / acp[-1]).sqrt())
    return [
        ("Euler a / Automatic", SamplerStart.from_sigmas(torch.tensor([sigma_max, 0.0]))),
        (
            "Euler a / Automatic, SGM noise multiplier",
            SamplerStart.from_sigmas(torch.tensor([sigma_max, 0.0]), sgm_noise_multiplier=True),
        ),
        ("DDIM, 20 steps (t0 = 951)", SamplerStart.from_timestep(951, acp)),
        ("UniPC (t0 = 999)", SamplerStart.from_timestep(999, acp)),
    ]


def _channel_means(x: torch.Tensor) -> str:
    return " ".join(f"{v:+.3f}" for v in x.float().mean(dim=(0, 2, 3)).tolist())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", type=Path, default=None, help="OMS module folder or file")
    parser.add_argument(
        "--out", type=Path, default=None, help="write a picture of x_S, x0_hat and x_T (.png)"
    )
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="sd1",
        help="latent space of the module, for the preview colours (sd1 = SD1.x/SD2.x modules)",
    )
    parser.add_argument("--prompt", default="a dark night sky, pitch black")
    parser.add_argument("--negative", default="")
    parser.add_argument("--cfg", type=float, default=2.0, help="OMS CFG (w_psi, Eq. 21)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.out is not None and args.out.suffix.lower() != ".png":
        parser.error(f"--out must name a .png file, got {str(args.out)!r}")

    path = args.module or RANDOM_TEST_MODULE
    if args.module is None:
        print(f"No --module given: using the RANDOM-WEIGHT test module in {path}.")
        print("Its numbers only show that the OMS pipeline runs; they mean nothing visually.\n")
    model = load_oms(path)

    shape = (1, 4, args.height // 8, args.width // 8)
    x_s = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    x0_hat = model.predict_x0(x_s, [args.prompt], args.cfg, [args.negative])
    print(f"prompt {args.prompt!r}, OMS CFG {args.cfg}, latent {list(shape)}")
    print(f"x_S (the seed's unit noise), channel means: {_channel_means(x_s)}")
    print(f"x0_hat = -psi_cfg(x_S, C),  channel means: {_channel_means(x0_hat)}")
    (summary,) = summarize_latent(x0_hat, args.family)
    print(f"x0_hat preview ({args.family} latent colours): {summary.text()}\n")
    starts: dict[str, tuple[float, torch.Tensor]] = {}
    for name, start in _starts():
        alpha_bar = start_alpha_bar(start)
        x_t = oms_start(x0_hat, x_s, alpha_bar)
        starts[name] = (alpha_bar, x_t)
        handed = noise_for_sampler(x_t, start)
        print(f"{name}: alpha_bar0 = {alpha_bar:.6f}")
        print(f"    x_T (VP, Eq. 20) channel means: {_channel_means(x_t)}")
        print(f"    noise handed to the sampler, std {handed.std().item():.4f}")

    if args.out is not None:
        alpha_bar, x_t = starts[PICTURE_START]
        panels = demo_panels(x_s, x0_hat, x_t, alpha_bar, args.family)
        caption = demo_caption(summary, args.prompt, args.cfg, args.seed, args.family)
        test_module = Path(path).resolve() == RANDOM_TEST_MODULE.resolve()
        banner = RANDOM_MODULE_BANNER if test_module else None
        picture, layout = draw_picture(panels, caption, banner)
        picture.save(args.out, format="PNG")
        width, height = layout.size
        print(f"\nWrote {args.out} ({width} x {height} px): x_S, x0_hat and x_T side by side.")
    return 0


@dataclass(frozen=True)
class Panel:
    """One picture of the demo: a label over a uint8 RGB image [H, W, 3]."""

    label: str
    image: torch.Tensor


def demo_panels(
    x_s: torch.Tensor, x0_hat: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, family: str
) -> list[Panel]:
    """The three panels: seed noise, OMS prediction, sampler start, decoded alike.

    Latents [1, 4, h, w], all in VP (unit) scale, previewed at 8x their size with
    :func:`oms_ext.preview.preview_images`. ``alpha_bar`` is the start's VP alpha_bar.
    """
    to_sampler = 1.0 / math.sqrt(alpha_bar)
    labels = (
        "x_S: the seed's noise (unit Gaussian), what the sampler would start from without OMS",
        "x0_hat = -psi_cfg(x_S, C): the OMS prediction of the clean latent",
        f"x_T (Eq. 20, s = 0) for {PICTURE_START}, alpha_bar0 = {alpha_bar:.4f}; shown in VP "
        f"scale, the sampler gets it x {to_sampler:.2f}",
    )
    latents = (x_s, x0_hat, x_t)
    return [
        Panel(label, preview_images(latent, family)[0])
        for label, latent in zip(labels, latents, strict=True)
    ]


def demo_caption(summary: PreviewSummary, prompt: str, cfg: float, seed: int, family: str) -> str:
    """The line under the panels: what the prediction's preview says, and what made it."""
    return (
        f"OMS prediction: {summary.text()}. Prompt {prompt!r}, OMS CFG {cfg:g}, "
        f"seed {seed}; {family} latent colours through a cheap linear preview, not the VAE."
    )


#: Picture geometry, pixels.
PAD = 8
#: Space between the columns.
GAP = 24
FONT_SIZE = 13
BANNER_FONT_SIZE = 18
MIN_COLUMN_WIDTH = 256
LABEL_LINES = 3
CAPTION_LINES = 3
BANNER_LINES = 2
BACKGROUND = (28, 28, 28)
TEXT = (235, 235, 235)
BANNER_BACKGROUND = (170, 20, 20)
BANNER_TEXT = (255, 255, 255)


@dataclass(frozen=True)
class PictureLayout:
    """Where things are in the demo picture; boxes are (left, top, right, bottom) pixels."""

    size: tuple[int, int]
    banner_box: tuple[int, int, int, int] | None
    label_boxes: tuple[tuple[int, int, int, int], ...]
    panel_boxes: tuple[tuple[int, int, int, int], ...]
    caption_box: tuple[int, int, int, int]


def picture_layout(
    panel_height: int, panel_width: int, panels: int = 3, banner: bool = True
) -> PictureLayout:
    """Geometry of a picture of ``panels`` images [panel_height, panel_width] side by side.

    Columns are at least :data:`MIN_COLUMN_WIDTH` wide (images are centred in them); the
    banner, labels and caption have fixed numbers of text lines, so the geometry depends on
    the image size only.
    """
    line = _line_height(_font(FONT_SIZE))
    column = max(panel_width, MIN_COLUMN_WIDTH)
    width = panels * column + (panels - 1) * GAP + 2 * PAD
    top = PAD
    banner_box = None
    if banner:
        banner_box = (0, 0, width, BANNER_LINES * _line_height(_font(BANNER_FONT_SIZE)) + 2 * PAD)
        top = banner_box[3] + PAD
    label_boxes, panel_boxes = [], []
    image_top = top + LABEL_LINES * line + PAD // 2
    for i in range(panels):
        left = PAD + i * (column + GAP)
        label_boxes.append((left, top, left + column, top + LABEL_LINES * line))
        image_left = left + (column - panel_width) // 2
        panel_boxes.append(
            (image_left, image_top, image_left + panel_width, image_top + panel_height)
        )
    caption_top = image_top + panel_height + PAD
    caption_box = (PAD, caption_top, width - PAD, caption_top + CAPTION_LINES * line)
    return PictureLayout(
        size=(width, caption_box[3] + PAD),
        banner_box=banner_box,
        label_boxes=tuple(label_boxes),
        panel_boxes=tuple(panel_boxes),
        caption_box=caption_box,
    )


def draw_picture(
    panels: Sequence[Panel], caption: str, banner: str | None
) -> tuple[Image.Image, PictureLayout]:
    """Draw the labelled ``panels`` (all one size) side by side, ``caption`` below them and,
    if given, ``banner`` across the top in white on red. Returns the RGB picture (PIL) and
    its layout."""
    image_module, draw_module = _pil()
    sizes = {tuple(panel.image.shape) for panel in panels}
    if not panels or len(sizes) != 1:
        raise ValueError(f"draw_picture needs panels of one size, got sizes {sorted(sizes)}")
    panel_height, panel_width, _ = panels[0].image.shape
    layout = picture_layout(panel_height, panel_width, len(panels), banner is not None)
    picture = image_module.new("RGB", layout.size, BACKGROUND)
    draw = draw_module.Draw(picture)
    font = _font(FONT_SIZE)
    if banner is not None and layout.banner_box is not None:
        draw.rectangle(layout.banner_box, fill=BANNER_BACKGROUND)
        left, top, right, _ = layout.banner_box
        inner = (left + PAD, top + PAD, right - PAD, top + PAD)
        _draw_text(draw, _font(BANNER_FONT_SIZE), banner, inner, BANNER_LINES, BANNER_TEXT)
    for panel, label_box, panel_box in zip(
        panels, layout.label_boxes, layout.panel_boxes, strict=True
    ):
        _draw_text(draw, font, panel.label, label_box, LABEL_LINES, TEXT)
        picture.paste(image_module.fromarray(panel.image.numpy(), "RGB"), panel_box[:2])
    _draw_text(draw, font, caption, layout.caption_box, CAPTION_LINES, TEXT)
    return picture, layout


def _pil() -> tuple[ModuleType, ModuleType]:
    """PIL's Image and ImageDraw modules, imported only when a picture is drawn."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        raise ModuleNotFoundError(
            "Drawing the demo picture needs Pillow (pip install pillow); the WebUIs ship it."
        ) from exc
    return Image, ImageDraw


def _font(size: int) -> Font:
    """PIL's default font at ``size`` pixels (Pillow < 10.1: its one fixed bitmap size)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _line_height(font: Font) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + 3


def _draw_text(
    draw: ImageDraw.ImageDraw,
    font: Font,
    text: str,
    box: tuple[int, int, int, int],
    max_lines: int,
    fill: tuple[int, int, int],
) -> None:
    """Word-wrap ``text`` into the width of ``box`` from its top-left corner, at most
    ``max_lines`` lines (the last one cut with "..." if the text is longer)."""
    left, top, right, _ = box
    width = right - left
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and draw.textlength(lines[-1] + "...", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    line = _line_height(font)
    for i, text_line in enumerate(lines):
        draw.text((left, top + i * line), text_line, font=font, fill=fill)


if __name__ == "__main__":
    raise SystemExit(main())
