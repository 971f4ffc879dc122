"""OpenCLIP text towers as OMS prompt encoders: converted to transformers or borrowed as is.

Stable Diffusion 2.x conditions on the OpenCLIP ViT-H text tower (24 residual blocks, width
1024, 16 heads, exact GELU) stopped after its 23rd block ("penultimate") and followed by
``ln_final``. Hugging Face's SD 2.1 ``text_encoder`` is exactly that tower cut to 23 layers,
and it is the encoder the OMS base modules were trained with. So an SD 2.x checkpoint's own
text tower gives the OMS embedding without downloading anything:

- :func:`clip_encoder_from_openclip_state_dict` converts open_clip-layout weights (an SD 2.x
  single-file checkpoint's ``cond_stage_model.model.*`` keys, or open_clip's own layout) into a
  transformers ``CLIPTextModel`` holding only the blocks that are used;
- :func:`wrap_openclip_tower` runs an already loaded open_clip-layout tower module (for example
  the WebUI's) through its own blocks without copying weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from oms_ext.text import (
    SD2_OMS_LAYERS,
    ClipPromptEncoder,
    PromptTokenizer,
    TokenEncoder,
    load_text_state_dict,
    tokenizer_from_openclip_vocab,
)

OPENCLIP_PREFIXES = ("cond_stage_model.model.", "model.", "")
OPENCLIP_HEAD_WIDTH = 64
_BLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# Top-level entries besides the blocks; the last four are not needed for hidden states.
_KNOWN_TOP_LEVEL = (
    "token_embedding",
    "positional_embedding",
    "ln_final",
    "text_projection",
    "logit_scale",
    "attn_mask",
    "visual",
)


def detect_openclip_prefix(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The key prefix of the text tower: ``cond_stage_model.model.``, ``model.`` or ``""``."""
    for prefix in OPENCLIP_PREFIXES:
        if f"{prefix}token_embedding.weight" in state_dict and (
            f"{prefix}positional_embedding" in state_dict
        ):
            return prefix
    raise ValueError(
        "not an OpenCLIP text tower: expected the keys token_embedding.weight and "
        "positional_embedding, bare or under one of the prefixes "
        f"{', '.join(repr(p) for p in OPENCLIP_PREFIXES if p)}"
    )


def openclip_text_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    """The text tower's weights with ``prefix`` removed (other entries dropped)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def count_resblocks(tower: Mapping[str, torch.Tensor]) -> int:
    """Number of residual blocks in an unprefixed open_clip text-tower state dict."""
    indices = {int(m.group(1)) for key in tower if (m := _BLOCK_KEY.match(key))}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(f"text tower blocks must be numbered 0..N-1, found {sorted(indices)}")
    return len(indices)


def openclip_to_transformers(
    tower: Mapping[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor]:
    """Rename an unprefixed open_clip text tower to transformers ``CLIPTextModel`` keys,
    keeping blocks 0..num_layers-1. ``attn.in_proj_*`` ([3D, D] rows q, k, v) is split into
    ``q_proj``/``k_proj``/``v_proj``; ``text_projection``/``logit_scale`` are not used."""
    out = {
        "text_model.embeddings.token_embedding.weight": tower["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": tower["positional_embedding"],
        "text_model.final_layer_norm.weight": tower["ln_final.weight"],
        "text_model.final_layer_norm.bias": tower["ln_final.bias"],
    }
    for key, value in tower.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            if key.split(".")[0] not in _KNOWN_TOP_LEVEL:
                raise ValueError(f"unsupported key in the OpenCLIP text tower: {key!r}")
            continue
        index, part = int(match.group(1)), match.group(2)
        if index >= num_layers:
            continue
        layer = f"text_model.encoder.layers.{index}."
        if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = part.rsplit("_", 1)[1]
            for name, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{layer}self_attn.{name}_proj.{kind}"] = chunk
        elif part in _BLOCK_PARTS:
            out[layer + _BLOCK_PARTS[part]] = value
        else:
            raise ValueError(
                f"unsupported key in the OpenCLIP text tower: {key!r} (layer scale, custom "
                "attention and other variants are not part of the Stable Diffusion towers)"
            )
    return out


def clip_text_config_for_tower(tower: Mapping[str, torch.Tensor], num_layers: int) -> Any:
    """A transformers ``CLIPTextConfig`` matching the tower's shapes: head width 64 (all
    OpenCLIP text towers), exact GELU (ViT-H / ViT-bigG), LayerNorm eps 1e-5."""
    from transformers import CLIPTextConfig

    vocab, width = tower["token_embedding.weight"].shape
    if width % OPENCLIP_HEAD_WIDTH:
        raise ValueError(f"text tower width {width} is not a multiple of 64")
    return CLIPTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(width),
        intermediate_size=int(tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=num_layers,
        num_attention_heads=int(width) // OPENCLIP_HEAD_WIDTH,
        max_position_embeddings=int(tower["positional_embedding"].shape[0]),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )


def clip_encoder_from_openclip_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_layers: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
) -> ClipPromptEncoder:
    """Build the OMS prompt encoder from OpenCLIP text-tower weights (copied once).

    ``num_layers`` defaults to the tower's block count minus one, Stable Diffusion 2.x's
    "penultimate" layer: 23 for ViT-H, which equals SD 2.1's Hugging Face text encoder. The
    output is the state after ``num_layers`` blocks followed by ``ln_final``, [B, 77, width].
    ``tokenizer`` (a transformers CLIP tokenizer) defaults to
    SD 2.1's, rebuilt from open_clip's vocabulary.
    """
    from transformers import CLIPTextModel

    tower = openclip_text_state_dict(state_dict, detect_openclip_prefix(state_dict))
    blocks = count_resblocks(tower)
    layers = blocks - 1 if num_layers is None else int(num_layers)
    if not 1 <= layers <= blocks:
        raise ValueError(f"num_layers must be in 1..{blocks} for this text tower, got {layers}")
    with torch.device("meta"):  # no random initialisation: the weights come from the tower
        model = CLIPTextModel(clip_text_config_for_tower(tower, layers))
    load_text_state_dict(
        model,
        openclip_to_transformers(tower, layers),
        source="the OpenCLIP state dict",
        dtype=dtype,
    )
    tok = tokenizer if tokenizer is not None else tokenizer_from_openclip_vocab()
    encoder = ClipPromptEncoder(model.eval(), tok, owns_model=True)
    return encoder.to(device=device, dtype=dtype)


def _causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)


def plain_embedding(embedding: torch.nn.Module) -> torch.nn.Module:
    """The token embedding under a WebUI's wrapper. AUTOMATIC1111 swaps a text encoder's
    token embedding for its textual-inversion wrapper (``EmbeddingsWithFixes``: the original
    as ``.wrapped``, no ``weight``, and calling it consumes the fixes queued for the image's
    prompt), so OMS unwraps it and embeds the plain tokens itself."""
    while not hasattr(embedding, "weight") and hasattr(embedding, "wrapped"):
        embedding = embedding.wrapped
    return embedding


class OpenClipTowerEncoder(TokenEncoder):
    """A borrowed open_clip-layout text tower (``token_embedding``, ``positional_embedding``,
    ``transformer.resblocks``, ``ln_final``, optional ``attn_mask``) run through its first
    ``num_layers`` blocks, then ``ln_final`` (not with ``final_norm`` false: SDXL's
    penultimate-layer convention); causal mask, no padding mask; a WebUI's wrapper
    around ``token_embedding`` is bypassed (:func:`plain_embedding`). The tower's weights
    are never copied or moved by OMS: computation runs where the embedding puts its output,
    results land on ``device``/``dtype``.

    ``compute_device``: where token ids go. A WebUI running with ``--medvram``/``--lowvram``
    keeps the tower on the CPU and moves it to its device in a forward pre-hook on the token
    embedding (A1111 1.10.1 ``modules/lowvram.py``, ``send_me_to_gpu``); the ids must then be
    on that device already, as A1111 puts them (``sd_hijack_clip`` ``process_tokens``:
    ``devices.device``), not where the weights were before the call.
    """

    def __init__(
        self,
        tower: torch.nn.Module,
        tokenizer: Any,
        *,
        num_layers: int,
        final_norm: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compute_device: Callable[[], torch.device] | None = None,
    ) -> None:
        depth = len(tower.transformer.resblocks)
        if not 1 <= num_layers <= depth:
            raise ValueError(
                f"num_layers must be in 1..{depth} for this text tower, got {num_layers}"
            )
        weight = plain_embedding(tower.token_embedding).weight
        self.tower = tower
        self.tokenizer = PromptTokenizer(tokenizer)
        self.compute_device = compute_device
        self.num_layers = num_layers
        self.final_norm = final_norm
        self.hidden_size = int(weight.shape[1])
        self.device = torch.device(device) if device is not None else weight.device
        self.dtype = dtype if dtype is not None else weight.dtype

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L <= 77] -> [B, L, hidden_size] after ``num_layers`` blocks + ln_final."""
        tower = self.tower
        embedding = plain_embedding(tower.token_embedding)
        length = ids.shape[1]
        x = embedding(ids.to(self._ids_device(embedding.weight)))  # may fire the WebUI's hooks
        x = x + tower.positional_embedding[:length].to(device=x.device, dtype=x.dtype)
        mask = getattr(tower, "attn_mask", None)
        if mask is None:
            mask = _causal_mask(length, x.device, x.dtype)
        mask = mask[:length, :length].to(device=x.device, dtype=x.dtype)
        blocks = tower.transformer.resblocks
        batch_first = bool(getattr(getattr(blocks[0], "attn", None), "batch_first", False))
        if not batch_first:
            x = x.permute(1, 0, 2)
        for block in list(blocks)[: self.num_layers]:
            x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.permute(1, 0, 2)
        if self.final_norm:
            x = tower.ln_final(x)
        return x.to(device=self.device, dtype=self.dtype)


def wrap_openclip_tower(
    tower: torch.nn.Module,
    tokenizer: Any = None,
    *,
    num_layers: int = SD2_OMS_LAYERS,
    final_norm: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    compute_device: Callable[[], torch.device] | None = None,
) -> OpenClipTowerEncoder:
    """Borrow an open_clip-layout text tower (e.g. AUTOMATIC1111's
    ``FrozenOpenCLIPEmbedder.model`` for SD 2.x) as the OMS prompt encoder.

    ``tokenizer`` is a transformers CLIP tokenizer; the default is SD 2.1's tokenizer (pad
    ``"!"``, as OMS was trained) rebuilt from open_clip's vocabulary. ``compute_device``: see
    :class:`OpenClipTowerEncoder`.
    """
    tok = tokenizer if tokenizer is not None else tokenizer_from_openclip_vocab()
    return OpenClipTowerEncoder(
        tower,
        tok,
        num_layers=num_layers,
        final_norm=final_norm,
        device=device,
        dtype=dtype,
        compute_device=compute_device,
    )
