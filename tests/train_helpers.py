"""Small inputs for the trainer's tests: captioned image folders, a tiny random VAE, the tiny
text encoder of the test module, synthetic latents whose captions set their channel means."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

TINY_MODULE = Path(__file__).resolve().parent / "data" / "oms-tiny"
#: A folder with text_encoder/ and tokenizer/ (the tiny test module's random 32-d CLIP).
TINY_ENCODER = TINY_MODULE
RESOLUTION = 64  # px: 8x8 latents


def write_images(folder: Path, captions: Mapping[str, str | None], size=(72, 64)) -> Path:
    """PNG images named by the keys, each a flat colour from its index, with a same-stem .txt
    holding the caption (none where the caption is None)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (stem, caption) in enumerate(captions.items()):
        shade = (40 + 50 * i) % 256
        Image.new("RGB", size, (shade, 255 - shade, (7 * shade) % 256)).save(folder / f"{stem}.png")
        if caption is not None:
            (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return folder


def tiny_vae_folder(folder: Path, scaling_factor: float = 0.18215) -> Path:
    """A random diffusers AutoencoderKL with the SD VAE's stride 8 and 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        scaling_factor=scaling_factor,
    )
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_encoder():
    """The tiny test module's text encoder (random CLIP, 32-d states)."""
    from oms_ext.text import load_prompt_encoder

    return load_prompt_encoder(TINY_MODULE)


def channel_mean_latents(
    means: Mapping[str, list[float]], per_caption: int, seed: int = 0, size: int = 8
):
    """LatentExamples [4, size, size]: caption c's latents have channel means ``means[c]`` plus
    a per-image offset (std 0.3, the brightness spread a base model cannot recover from noise)
    and per-pixel variation (std 0.2)."""
    from oms_ext.train import LatentExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for caption, mean in means.items():
        for _ in range(per_caption):
            offset = 0.3 * torch.randn((4, 1, 1), generator=g)
            latent = torch.tensor(mean)[:, None, None] + offset
            latent = latent + 0.2 * torch.randn((4, size, size), generator=g)
            out.append(LatentExample(latent, latent.flip(-1), caption))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one CPU thread (many threads mostly wait on each other,
    much worse on a shared machine); the previous thread count comes back after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
