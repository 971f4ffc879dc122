"""The text encoder a module is trained with, and the pointer files its folder gets.

Three choices (``--encoder``):

* ``release``: Stable Diffusion 2.1's OpenCLIP ViT-H, as the released OMS-B modules
  (``last_hidden_state`` of the 23-layer tower, 1024 wide). Its files are looked up as the
  extension looks them up (a models folder's ``stabilityai--stable-diffusion-2-1/`` or the
  Hugging Face cache); the module's pointers name ``stabilityai/stable-diffusion-2-1``.
* ``checkpoint``: the checkpoint's own encoder, read from the same file or folder: CLIP-L of
  an SD1.x checkpoint (``last_hidden_state``, 768, what SD1.x itself conditions on with CLIP
  skip 1), OpenCLIP ViT-H of an SD2.x one (= ``release``), SDXL's pair as the mixclip release
  reads it (``hidden_states[-2]`` of CLIP-L and of OpenCLIP bigG, concatenated, 2048). The
  module then needs no text-encoder download: its pointers carry
  ``"oms_encoder_source": "checkpoint"`` so a host can hand it the loaded checkpoint's encoder,
  and name the family's base repo so ``load_oms`` finds the same weights on its own.
* a folder holding ``text_encoder/`` and ``tokenizer/`` (transformers CLIP, safetensors): copied
  into the module, pointers ``"."``, so the module is self-contained.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oms_ext.runtime.registry import SDXL_REPO
from oms_ext.text import (
    ENCODER_SOURCE_CHECKPOINT,
    ENCODER_SOURCE_KEY,
    SD21_REPO,
    ConcatPromptEncoder,
    PromptEncoder,
    TextEncoderNotFound,
    _openclip_bpe_path,
    load_clip_text_model,
    load_release_text_encoder,
    load_text_state_dict,
    tokenizer_from_openclip_vocab,
    write_openclip_tokenizer_files,
)
from oms_ext.text import ClipPromptEncoder as _Clip
from oms_ext.train.checkpoint import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    Checkpoint,
)
from oms_ext.train.errors import TrainError

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DUAL_CLASS = "SDXLTextEncoder"
#: OpenAI CLIP ViT-L/14's text tower (SD1.x, and SDXL's first encoder).
CLIP_L_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}


@dataclass
class EncoderChoice:
    """The encoder to train with and how the module folder names it.

    ``pointers``: (oms_text_encoder, oms_tokenizer or None for the SDXL pair) pointer
    configs; ``copy_from``: a folder whose ``text_encoder/`` and ``tokenizer/`` go into the
    module; ``description``: the words stored in the module's metadata (no paths)."""

    encoder: PromptEncoder
    pointers: tuple[dict[str, Any], dict[str, Any] | None]
    description: str
    copy_from: Path | None = None


def _pointer(cls: str, repo: str, sub: str, borrowed: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {"_class_name": cls, "_name_or_path": repo, "subfolder": sub}
    if borrowed:
        data[ENCODER_SOURCE_KEY] = ENCODER_SOURCE_CHECKPOINT
    return data


def release_pointers(borrowed: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The released OMS-B modules' pointers: SD 2.1's text encoder and tokenizer."""
    return (
        _pointer("CLIPTextModel", SD21_REPO, "text_encoder", borrowed),
        _pointer("CLIPTokenizer", SD21_REPO, "tokenizer", borrowed),
    )


def choose_encoder(
    kind: str, checkpoint: Checkpoint | None, models_dir: Path | None, dtype: torch.dtype
) -> EncoderChoice:
    """The encoder for ``--encoder kind`` ("release", "checkpoint" or a folder)."""
    if kind == "release":
        try:
            encoder = load_release_text_encoder(
                SD21_REPO, dual=False, models_dir=models_dir or Path("models"), dtype=dtype
            )
        except TextEncoderNotFound as e:
            raise TrainError(" ".join(str(e).split())) from e
        return EncoderChoice(encoder, release_pointers(), "SD2.1 OpenCLIP ViT-H (release)")
    if kind == "checkpoint":
        if checkpoint is None:
            raise TrainError("--encoder checkpoint needs the checkpoint (--checkpoint)")
        return _checkpoint_encoder(checkpoint, dtype)
    folder = Path(kind)
    if not (folder / "text_encoder" / "config.json").is_file():
        raise TrainError(
            f"--encoder {kind!r}: use 'release', 'checkpoint' or a folder holding text_encoder/ "
            f"and tokenizer/ (transformers CLIP, safetensors)"
        )
    encoder = _folder_encoder(folder, "", penultimate=False, dtype=dtype)
    pointers = (
        _pointer("CLIPTextModel", ".", "text_encoder"),
        _pointer("CLIPTokenizer", ".", "tokenizer"),
    )
    return EncoderChoice(encoder, pointers, "own CLIP text encoder (in the module)", folder)


def _folder_encoder(folder: Path, suffix: str, *, penultimate: bool, dtype: torch.dtype) -> _Clip:
    from transformers import CLIPTokenizer

    try:
        model = load_clip_text_model(
            folder / f"text_encoder{suffix}", with_projection=suffix == "_2", dtype=dtype
        )
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / f"tokenizer{suffix}"))
    except (OSError, ValueError) as e:
        raise TrainError(
            f"{folder}: cannot load text_encoder{suffix}/tokenizer{suffix} ({e})"
        ) from e
    return _Clip.at_layer(model, tokenizer, penultimate=penultimate, owns_model=True)


def _checkpoint_encoder(checkpoint: Checkpoint, dtype: torch.dtype) -> EncoderChoice:
    family = checkpoint.family
    if family == "sd2":
        encoder = _sd2_encoder(checkpoint, dtype)
        return EncoderChoice(
            encoder, release_pointers(borrowed=True), "the SD2.x checkpoint's OpenCLIP ViT-H"
        )
    if family == "sd1":
        if checkpoint.single_file:
            encoder = _clip_l_from_file(checkpoint.path, SD1_TEXT_PREFIX, False, dtype)
        else:
            encoder = _folder_encoder(checkpoint.path, "", penultimate=False, dtype=dtype)
        pointers = (
            _pointer("CLIPTextModel", SD15_REPO, "text_encoder", True),
            _pointer("CLIPTokenizer", SD15_REPO, "tokenizer", True),
        )
        return EncoderChoice(encoder, pointers, "the SD1.x checkpoint's CLIP ViT-L")
    if checkpoint.single_file:
        parts = [
            _clip_l_from_file(checkpoint.path, SDXL_CLIP_L_PREFIX, True, dtype),
            _clip_g_from_file(checkpoint.path, dtype),
        ]
    else:
        parts = [
            _folder_encoder(checkpoint.path, s, penultimate=True, dtype=dtype) for s in ("", "_2")
        ]
    pointer = {**_pointer(DUAL_CLASS, SDXL_REPO, ""), ENCODER_SOURCE_KEY: ENCODER_SOURCE_CHECKPOINT}
    return EncoderChoice(
        ConcatPromptEncoder(parts), (pointer, None), "the SDXL checkpoint's CLIP ViT-L + bigG"
    )


def _tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118


def clip_l_tokenizer() -> Any:
    """CLIP ViT-L/14's tokenizer (pads with end-of-text, as SD1.x and SDXL's first encoder),
    built offline from open_clip's bundled vocabulary (the same BPE)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_openclip_tokenizer_files(_openclip_bpe_path(), Path(tmp))
        return CLIPTokenizer.from_pretrained(str(folder), pad_token="<|endoftext|>")


def _clip_l_from_file(path: Path, prefix: str, penultimate: bool, dtype: torch.dtype) -> _Clip:
    from transformers import CLIPTextConfig, CLIPTextModel

    state = {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v
        for k, v in _tensors(path, prefix).items()
    }
    if not state:
        raise TrainError(f"{path.name}: no CLIP-L text encoder weights ({prefix}*)")
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**_clip_l_config(state)))
    load_text_state_dict(model, state, source=path.name, dtype=dtype)
    model = model.eval().requires_grad_(False)
    return _Clip.at_layer(model, clip_l_tokenizer(), penultimate=penultimate, owns_model=True)


def _clip_l_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """CLIP-L's config, with the sizes read from the weights (small test towers load too)."""
    emb = state["text_model.embeddings.token_embedding.weight"]
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    fc1 = state["text_model.encoder.layers.0.mlp.fc1.weight"]
    width = int(emb.shape[1])
    return {
        **CLIP_L_CONFIG,
        "vocab_size": int(emb.shape[0]),
        "hidden_size": width,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, width // 64),
    }


def _clip_g_from_file(path: Path, dtype: torch.dtype) -> _Clip:
    """SDXL's OpenCLIP bigG as ``hidden_states[-2]``: its first N-1 blocks, no final norm."""
    from transformers import CLIPTextModelWithProjection

    from oms_ext.openclip_convert import (
        clip_text_config_for_tower,
        count_resblocks,
        openclip_to_transformers,
    )

    tower = _tensors(path, SDXL_CLIP_G_PREFIX)
    if not tower:
        raise TrainError(f"{path.name}: no OpenCLIP bigG weights ({SDXL_CLIP_G_PREFIX}*)")
    layers = count_resblocks(tower) - 1
    config = clip_text_config_for_tower(tower, layers)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config).text_model
    load_text_state_dict(
        model, openclip_to_transformers(tower, layers), source=path.name, dtype=dtype
    )
    model = _TextOnly(model.eval().requires_grad_(False), config)
    return _Clip(
        model, tokenizer_from_openclip_vocab(), num_layers=layers, final_norm=False, owns_model=True
    )


def _sd2_encoder(checkpoint: Checkpoint, dtype: torch.dtype) -> PromptEncoder:
    from oms_ext.openclip_convert import clip_encoder_from_openclip_state_dict

    if not checkpoint.single_file:
        return _folder_encoder(checkpoint.path, "", penultimate=False, dtype=dtype)
    state = _tensors(checkpoint.path, SD2_TEXT_PREFIX)
    return clip_encoder_from_openclip_state_dict(state, dtype=dtype)


class _TextOnly(torch.nn.Module):
    """A transformers CLIP ``text_model`` with the ``config`` and call of a full model."""

    def __init__(self, text_model: torch.nn.Module, config: Any) -> None:
        super().__init__()
        self.text_model = text_model
        self.config = config

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> Any:
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states)


def write_pointers(root: Path, choice: EncoderChoice) -> None:
    """``oms_text_encoder/`` and ``oms_tokenizer/`` pointer configs (and the encoder files of a
    folder choice) into the module folder ``root``."""
    encoder, tokenizer = choice.pointers
    for name, data in (("oms_text_encoder", encoder), ("oms_tokenizer", tokenizer)):
        if data is not None:
            (root / name).mkdir()
            (root / name / "config.json").write_text(json.dumps(data, indent=2) + "\n", "utf-8")
    if choice.copy_from is not None:
        for part in ("text_encoder", "tokenizer"):
            shutil.copytree(
                choice.copy_from / part,
                root / part,
                ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.ckpt"),
            )
