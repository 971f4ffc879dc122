"""A loaded ComfyUI CLIP as the OMS module's text encoder (an SD2.x checkpoint's OpenCLIP
ViT-H, the encoder the SD1.x/SD2.x module reads).

ComfyUI's SD2 CLIP at its default layer (``layer_idx`` None: the penultimate of 24 layers
with the final LayerNorm, comfy/sd2_clip.py) gives the text states OMS-B was trained on. An
upstream CLIPSetLastLayer changes the layer, so the encoder works on a clone at the default
layer. ComfyUI reads ``(word:1.2)`` weights itself; a prompt longer than 75 tokens becomes
several 77-token chunks, of which OMS reads the first, as the module's own encoder does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from oms_ext.text import CONTEXT_LENGTH

#: The width of SD2.x's text states.
SD2_WIDTH = 1024


class ClipTextEncoder:
    """:class:`oms_ext.loading.PromptEncoderLike` over a ComfyUI ``comfy.sd.CLIP``."""

    def __init__(self, clip: Any) -> None:
        self.clip = clip.clone()
        self.clip.layer_idx = None  # the model's own default layer, whatever CLIPSetLastLayer said
        self.hidden_size = int(self([""]).shape[-1])

    def __call__(self, prompts: Sequence[Any]) -> torch.Tensor:
        """Text states [len(prompts), 77, width]: the first 77-token chunk of each prompt."""
        states = []
        for prompt in prompts:
            cond = self.clip.encode_from_tokens(self.clip.tokenize(str(prompt)))
            states.append(cond[0, :CONTEXT_LENGTH])
        return torch.stack(states)

    def count_tokens(self, prompts: Sequence[Any]) -> list[int]:
        """Tokens of each prompt (ComfyUI marks its start, end and padding with word id 0)."""
        counts = []
        for prompt in prompts:
            tokens = self.clip.tokenize(str(prompt), return_word_ids=True)
            chunks = next(iter(tokens.values()))
            counts.append(sum(1 for chunk in chunks for t in chunk if t[2] > 0))
        return counts

    def owned_modules(self) -> list[torch.nn.Module]:
        return []  # ComfyUI owns and moves this encoder

    def to(self, device: Any = None, dtype: Any = None) -> ClipTextEncoder:
        return self


class CheckpointClipNeeded:
    """The text encoder of a module of the user's own that reads the checkpoint's own encoder
    (``python -m oms_ext.train --encoder checkpoint``) until the Apply node is given the
    checkpoint's CLIP: it has the module's width and refuses to encode."""

    def __init__(self, name: str, hidden_size: int) -> None:
        self.name = name
        self.hidden_size = hidden_size

    def message(self) -> str:
        return (
            f"One More Step: {self.name} reads the checkpoint's own text encoder; connect the "
            "checkpoint's CLIP to the clip input of One More Step Apply"
        )

    def __call__(self, prompts: Sequence[Any]) -> torch.Tensor:
        raise ValueError(self.message())

    def count_tokens(self, prompts: Sequence[Any]) -> list[int]:
        raise ValueError(self.message())

    def owned_modules(self) -> list[torch.nn.Module]:
        return []

    def to(self, device: Any = None, dtype: Any = None) -> CheckpointClipNeeded:
        return self
