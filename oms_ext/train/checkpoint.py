"""The user's Stable Diffusion checkpoint: its family, its VAE and its own text encoders.

Two forms are read, safetensors only (pickles can run code when loaded and are refused):

* a single-file checkpoint (``.safetensors``, the WebUIs' format): the family is told by its
  keys (SD1.x: ``cond_stage_model.transformer``, SD2.x: ``cond_stage_model.model`` (OpenCLIP),
  SDXL: ``conditioner.embedders``); a VAE-only file (``encoder.*``/``decoder.*`` keys, e.g.
  ``vae-ft-mse-840000``) needs ``--family``;
* a diffusers folder (a pipeline folder with ``vae/``, or a VAE folder itself).

The latent scale is the family's: 0.18215 (SD1.x/SD2.x), 0.13025 (SDXL).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from oms_ext.train.errors import TrainError

FAMILIES = ("sd1", "sd2", "sdxl")
SCALING_FACTORS = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
#: Keys of checkpoint families OMS does not serve (flow-matching models, 16-channel VAEs).
_FOREIGN_MARKERS = {
    "joint_blocks.": "SD3",
    "double_blocks.": "Flux",
    "model.diffusion_model.joint_blocks.": "SD3",
    "model.diffusion_model.double_blocks.": "Flux",
}


@dataclass(frozen=True)
class Checkpoint:
    """Where the VAE (and, for "checkpoint" encoders, the text encoders) come from."""

    path: Path
    family: str
    single_file: bool


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise TrainError(
            f"{path.name}: pickle checkpoints ({path.suffix}) are refused, loading one can run "
            f"code; use the .safetensors version of the checkpoint or VAE"
        )


def _header_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise TrainError(f"{path.name}: not a readable safetensors file ({e})") from e


def family_of_keys(keys: list[str]) -> str | None:
    """ "sd1" / "sd2" / "sdxl" from a single-file checkpoint's keys; None for a VAE-only file.
    Raises :class:`TrainError` for other models."""
    for marker, name in _FOREIGN_MARKERS.items():
        if any(k.startswith(marker) for k in keys):
            raise TrainError(
                f"the checkpoint is {name}, not SD1.x/SD2.x/SDXL; OMS modules are trained in the "
                f"4-channel latent space of SD1.x/SD2.x or SDXL"
            )
    has = {
        p: any(k.startswith(p) for k in keys)
        for p in (SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, SDXL_CLIP_L_PREFIX, VAE_PREFIX)
    }
    if has[SDXL_CLIP_L_PREFIX]:
        family = "sdxl"
    elif has[SD2_TEXT_PREFIX]:
        family = "sd2"
    elif has[SD1_TEXT_PREFIX]:
        family = "sd1"
    elif any(k.startswith("encoder.") for k in keys) and any(
        k.startswith("decoder.") for k in keys
    ):
        return None
    else:
        raise TrainError(
            "the checkpoint is not an SD1.x, SD2.x or SDXL checkpoint (no Stable Diffusion text "
            "encoder and VAE keys found); give the checkpoint the images are meant for"
        )
    if not has[VAE_PREFIX]:
        raise TrainError(
            f"the {family} checkpoint holds no VAE (no {VAE_PREFIX}* keys); give a checkpoint "
            f"with its VAE, or the VAE file with --vae"
        )
    return family


def open_checkpoint(path: Path, family: str | None = None) -> Checkpoint:
    """Identify ``path`` (a single-file ``.safetensors`` or a diffusers folder); ``family``
    overrides (and is required for a VAE-only file or folder that does not tell)."""
    if family is not None and family not in FAMILIES:
        raise TrainError(f"--family {family!r}: use one of {', '.join(FAMILIES)}")
    if not path.exists():
        raise TrainError(f"checkpoint {path}: no such file or folder")
    if path.is_dir():
        return Checkpoint(path, family or _folder_family(path), single_file=False)
    _refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise TrainError(f"{path.name}: give a .safetensors checkpoint or a diffusers folder")
    found = family_of_keys(_header_keys(path))
    if found is None and family is None:
        raise TrainError(
            f"{path.name} is a VAE without a model: say which latent space it is with "
            f"--family {' / '.join(FAMILIES)}"
        )
    return Checkpoint(path, family or found, single_file=True)


def _vae_folder(path: Path) -> Path:
    return path / "vae" if (path / "vae" / "config.json").is_file() else path


def _folder_family(path: Path) -> str:
    index = path / "model_index.json"
    if index.is_file():
        try:
            name = str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise TrainError(f"{index}: unreadable ({e})") from e
        if "XL" in name:
            return "sdxl"
        text_config = path / "text_encoder" / "config.json"
        if text_config.is_file():
            config = json.loads(text_config.read_text(encoding="utf-8"))
            return "sd2" if int(config.get("hidden_size", 768)) == 1024 else "sd1"
    vae_config = _vae_folder(path) / "config.json"
    if not vae_config.is_file():
        raise TrainError(f"{path}: not a diffusers pipeline or VAE folder (no vae/config.json)")
    try:
        scale = float(json.loads(vae_config.read_text(encoding="utf-8")).get("scaling_factor", 0))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise TrainError(f"{vae_config}: unreadable ({e})") from e
    if abs(scale - SCALING_FACTORS["sdxl"]) < 1e-6:
        return "sdxl"
    if abs(scale - SCALING_FACTORS["sd1"]) < 1e-6:
        return "sd1"
    raise TrainError(
        f"{vae_config}: scaling_factor {scale} is neither SD1.x/SD2.x's 0.18215 nor SDXL's "
        f"0.13025; give --family to train for one of them anyway"
    )


def load_vae(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> Any:
    """The checkpoint's VAE as a diffusers ``AutoencoderKL`` (eval, no gradients)."""
    from diffusers import AutoencoderKL

    if not checkpoint.single_file:
        folder = _vae_folder(checkpoint.path)
        if not any(folder.glob("*.safetensors")):
            pickles = [p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
            raise TrainError(
                f"{folder}: no .safetensors VAE weights"
                + (f" (only the pickle {pickles[0]}, which is refused)" if pickles else "")
            )
        try:
            vae = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True)
        except (OSError, ValueError) as e:
            raise TrainError(f"{folder}: cannot load the VAE ({e})") from e
    else:
        vae = _vae_from_single_file(checkpoint.path)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _vae_from_single_file(path: Path) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    state = load_file(str(path))
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in state) else ""
    parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    vae_state = {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and k[len(prefix) :].startswith(parts)
    }
    del state
    conv_in = vae_state["encoder.conv_in.weight"]
    levels = sorted({int(k.split(".")[2]) for k in vae_state if k.startswith("encoder.down.")})
    channels = [int(vae_state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    blocks = {int(k.split(".")[4]) for k in vae_state if k.startswith("encoder.down.0.block.")}
    config = {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(conv_in.shape[1]),
        "latent_channels": int(vae_state["quant_conv.weight"].shape[0]) // 2,
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "layers_per_block": len(blocks),
    }
    if config["latent_channels"] != 4:
        raise TrainError(
            f"{path.name}: its VAE has {config['latent_channels']} latent channels; OMS works in "
            f"the 4-channel latent space of SD1.x/SD2.x and SDXL"
        )
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(vae_state, vae.config)
    vae.load_state_dict(converted, strict=True, assign=True)
    return vae


def vae_identity(vae: Any, scaling_factor: float, dtype: torch.dtype) -> str:
    """A digest of what makes a VAE's latents: its encoder weights (the bytes of every encoder
    and ``quant_conv`` tensor), the latent scale and the dtype it encodes in."""
    digest = hashlib.sha256(f"{scaling_factor}|{dtype}".encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Scaled latents [B, 4, H/8, W/8] (float32) of images [B, 3, H, W] in [-1, 1]: the mean of
    the VAE's latent distribution times the family's scale (deterministic, so the cache holds
    exactly what every later run would compute)."""
    param = next(vae.parameters())
    posterior = vae.encode(images.to(param.device, param.dtype)).latent_dist
    return posterior.mean.float() * scaling_factor
