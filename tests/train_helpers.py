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


def tiny_vae_folder(folder: Path, scaling_factor: float = 0.18215, seed: int = 0) -> Path:
    """A random diffusers AutoencoderKL with the SD VAE's stride 8, 4 latent channels and 32
    GroupNorm groups (fixed in the single-file format), 32 channels wide."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
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


def tiny_clip(hidden: int = 64, layers: int = 2, act: str = "quick_gelu", seed: int = 0):
    """A random transformers CLIPTextModel with CLIP's vocabulary and 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=77, hidden_act=act, bos_token_id=49406, eos_token_id=49407,
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def ldm_vae_state(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's weights under the single-file (ldm) names of an SD
    checkpoint, ``first_stage_model.*`` (the inverse of diffusers' conversion)."""
    import re

    n = len(vae.config.block_out_channels)
    attention = {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
    out = {}
    for key, value in vae.state_dict().items():
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", key)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", k)
        k = re.sub(
            r"up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"up.{n - 1 - int(m[1])}.block.{m[2]}", k
        )
        k = re.sub(
            r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{n - 1 - int(m[1])}.upsample", k
        )
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace(
            "mid_block.resnets.1", "mid.block_2"
        )
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0." in k:
            for new, old in attention.items():
                k = k.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
            if k.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]
        out[f"first_stage_model.{k}"] = value.contiguous()
    return out


def sd1_single_file(path: Path, vae_folder: Path, clip) -> Path:
    """A tiny SD1.x-style single-file checkpoint: a UNet stand-in key, the CLIP text model
    under cond_stage_model.transformer, the VAE under first_stage_model."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(str(vae_folder))
    state = ldm_vae_state(vae)
    state.update({f"cond_stage_model.transformer.{k}": v.contiguous()
                  for k, v in clip.state_dict().items()})  # fmt: skip
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    save_file(state, str(path))
    return path


def openclip_layout(clip) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights in open_clip's layout (SDXL's second encoder,
    ``conditioner.embedders.1.model.*`` without the prefix)."""
    sd = {k.removeprefix("text_model."): v for k, v in clip.state_dict().items()}
    width = clip.config.hidden_size
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
        "text_projection": torch.eye(width),
    }
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
    for i in range(clip.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{layer}self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
            for new, old in parts.items():
                out[f"{block}{old}.{kind}"] = sd[f"{layer}{new}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def sdxl_single_file(path: Path, vae_folder: Path, clip_l, clip_g) -> Path:
    """A tiny SDXL-style single-file checkpoint: CLIP-L under conditioner.embedders.0, the
    open_clip-layout bigG stand-in under conditioner.embedders.1.model, the VAE."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    state = ldm_vae_state(AutoencoderKL.from_pretrained(str(vae_folder)))
    state.update({f"conditioner.embedders.0.transformer.{k}": v.contiguous()
                  for k, v in clip_l.state_dict().items()})  # fmt: skip
    state.update(
        {f"conditioner.embedders.1.model.{k}": v for k, v in openclip_layout(clip_g).items()}
    )
    state["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 4)
    save_file(state, str(path))
    return path
