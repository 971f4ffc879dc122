"""Forge-family adapter (Forge f2, reForge, Forge Classic): plain values out, result applied.

Forge calls ``process_before_every_sampling(p, x=..., noise=...)`` before the first pass and
reads ``p.modified_noise`` once right after (then resets it); the hires pass calls the hook
again with ``p.is_hr_pass`` true. The model's noise schedule lives on the predictor,
``sd_model.forge_objects.unet.model.predictor`` (Forge f2) or ``.model_sampling``
(ldm_patched-based forks). Forge's memory manager (``backend.memory_management`` in f2,
``ldm_patched.modules.model_management`` in older forks) moves models between devices; the
OMS module is registered with it through a ModelPatcher. Those imports happen inside
:meth:`ForgeMemory.load` only, never at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from oms_ext.loading import OMSModel
from oms_ext.prompt_syntax import PromptSyntax
from oms_ext.runtime.cache import same_device
from oms_ext.runtime.runner import BatchInputs
from oms_ext.text import SD2_OMS_LAYERS, Prompt, PromptEncoder, wrap_transformers_clip
from oms_ext.webui.a1111 import collect_batch_inputs, judged_family
from oms_ext.webui.a1111 import model_family as _flag_family


def predictor(sd_model: Any) -> Any | None:
    """The noise-schedule object of the loaded model, or None."""
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    model = getattr(unet, "model", None)
    return getattr(model, "predictor", None) or getattr(model, "model_sampling", None)


def _class_names(obj: Any) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def is_flow(pred: Any) -> bool:
    """Flow-matching predictors (SD3, Flux, Chroma, ...): "const" prediction or a Flow/Flux
    class (f2: PredictionFlow/PredictionFlux/PredictionDiscreteFlow; ldm_patched: CONST)."""
    if pred is None:
        return False
    names = _class_names(pred)
    return getattr(pred, "prediction_type", None) == "const" or any(
        "Flow" in n or "Flux" in n or n == "CONST" for n in names
    )


def _text_encoder_names(sd_model: Any) -> set[str]:
    """Which of Forge's text encoder slots (clip_l, clip_g, clip_h, ...) the model fills."""
    clip = getattr(getattr(sd_model, "forge_objects", None), "clip", None)
    holder = getattr(clip, "cond_stage_model", None)
    names = ("clip_l", "clip_g", "clip_h", "t5xxl")
    return {name for name in names if getattr(holder, name, None) is not None}


def model_family(sd_model: Any) -> str:
    """ "sdxl", "sd3", "sd2", "sd1", "flow" (Flux, Chroma, ...) or "unknown". An SD1 flag on
    a model whose only text encoder is OpenCLIP-H means SD2.x: reForge sets ``is_sd2`` from an
    attribute its own text-encoder wrapper hides, so it flags SD2 checkpoints as SD1."""
    family = _flag_family(sd_model)
    if family == "unknown" and is_flow(predictor(sd_model)):
        return "flow"
    if family == "sd1" and _text_encoder_names(sd_model) == {"clip_h"}:
        return "sd2"
    return family


def notes_family(sd_model: Any, selected: Path | None) -> str | None:
    """The checkpoint family the module notes judge a choice by: the one the next generation
    uses. Forge f2 loads the selected checkpoint only when Generate is pressed (until then
    ``shared.sd_model`` is a placeholder without ``forge_objects``), so when no model is
    loaded, or the checkpoint list names another file (``selected``), the family is read
    from that file's tensor names; None when nothing tells."""
    loaded = getattr(sd_model, "forge_objects", None) is not None
    return judged_family(model_family(sd_model) if loaded else None, sd_model, selected)


def batch_inputs(
    p: Any, x: torch.Tensor, opts: Any, sd_model: Any, syntax: PromptSyntax
) -> BatchInputs:
    """Plain values for the batch about to be sampled; ``x`` is the unit noise."""
    return collect_batch_inputs(
        p, x, opts, syntax, family=model_family(sd_model), is_flow=is_flow(predictor(sd_model))
    )


def apply_noise(p: Any, noise: torch.Tensor, like: torch.Tensor) -> None:
    """Hand the new noise to Forge: it reads ``p.modified_noise`` once, then resets it."""
    p.modified_noise = noise.to(device=like.device, dtype=like.dtype)


def model_dtype(device: torch.device) -> torch.dtype:
    """The precision Forge picks for a model on ``device`` (``backend.memory_management``
    ``should_use_fp16`` / ``should_use_bf16``: they know the GPUs whose fp16 is broken, e.g.
    GTX 16xx, and Forge's ``--all-in-fp32``-style flags)."""
    mm = _memory_module()
    if mm.should_use_fp16(device=device):
        return torch.float16
    should_use_bf16 = getattr(mm, "should_use_bf16", None)
    if should_use_bf16 is not None and should_use_bf16(device=device):
        return torch.bfloat16
    return torch.float32


class _ManagedEncoder(PromptEncoder):
    """A borrowed encoder whose weights Forge's memory manager must load before use: through
    the checkpoint's *current* clip patcher (``patcher_of()``), since Forge makes a new clone
    of it, with its own LoRA patches, each time the LoRA set changes
    (``sd_forge_lora/networks.py`` ``load_networks``); loading an old clone would bake stale
    LoRAs into the shared weights (and patch them twice per generation)."""

    def __init__(self, inner: PromptEncoder, patcher_of: Callable[[], Any]) -> None:
        self.inner = inner
        self.patcher_of = patcher_of
        self.hidden_size = inner.hidden_size
        self.device = inner.device
        self.dtype = inner.dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> _ManagedEncoder:
        self.inner.to(device=device, dtype=dtype)
        self.device, self.dtype = self.inner.device, self.inner.dtype
        return self

    def __call__(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        patcher = self.patcher_of()
        if patcher is not None:
            _memory_module().load_models_gpu([patcher])
        return self.inner(prompts)

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        return self.inner.count_tokens(prompts)

    def owned_modules(self) -> list[torch.nn.Module]:
        return []  # the checkpoint's, managed by Forge


def _sd21_tokenizer(candidate: Any) -> Any:
    """The tokenizer OMS was trained with (SD 2.1's, pad "!"): Forge f2's own when it hands a
    transformers tokenizer; otherwise (ldm_patched forks such as reForge wrap theirs in a
    ComfyUI tokenizer object) SD 2.1's, rebuilt from open_clip's vocabulary."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(candidate, PreTrainedTokenizerBase):
        return candidate
    from oms_ext.text import tokenizer_from_openclip_vocab

    return tokenizer_from_openclip_vocab()


def sd2_text_encoder(sd_model: Any) -> PromptEncoder | None:
    """The SD2.x checkpoint's own OpenCLIP ViT-H encoder (a transformers ``CLIPTextModel`` at
    ``forge_objects.clip.cond_stage_model.clip_h.transformer`` in Forge f2 and reForge)
    wrapped to give OMS's 23-layer output; None when the checkpoint is not SD2.x or looks
    different."""
    if model_family(sd_model) != "sd2":
        return None
    clip = getattr(getattr(sd_model, "forge_objects", None), "clip", None)
    holder = getattr(getattr(clip, "cond_stage_model", None), "clip_h", None)
    transformer = getattr(holder, "transformer", None)
    config = getattr(transformer, "config", None)
    if config is None or config.num_hidden_layers < SD2_OMS_LAYERS:
        return None
    tokenizer = _sd21_tokenizer(getattr(getattr(clip, "tokenizer", None), "clip_h", None))
    inner = wrap_transformers_clip(
        transformer, tokenizer, num_layers=SD2_OMS_LAYERS, compute_device=text_encoder_device
    )
    if getattr(clip, "patcher", None) is None:
        return inner
    objects = sd_model.forge_objects
    return _ManagedEncoder(inner, lambda: getattr(getattr(objects, "clip", None), "patcher", None))


def checkpoint_text_encoder(sd_model: Any, family: str) -> PromptEncoder | None:
    """The loaded checkpoint's own text encoder as a module trained on it reads it
    (``python -m oms_ext.train --encoder checkpoint``), loaded through Forge's memory manager
    with the current clip patcher: SD1.x: ``clip_l``'s last hidden state; SD2.x: as
    :func:`sd2_text_encoder`; SDXL: ``hidden_states[-2]`` of ``clip_l`` and of ``clip_g``,
    concatenated. None when the model is of another family or looks different."""
    from oms_ext.text import ClipPromptEncoder, ConcatPromptEncoder

    if model_family(sd_model) != family:
        return None
    if family == "sd2":
        return sd2_text_encoder(sd_model)
    objects = getattr(sd_model, "forge_objects", None)
    clip = getattr(objects, "clip", None)
    encoders = getattr(clip, "cond_stage_model", None)
    tokenizers = getattr(clip, "tokenizer", None)

    def part(name: str, penultimate: bool) -> ClipPromptEncoder | None:
        transformer = getattr(getattr(encoders, name, None), "transformer", None)
        tokenizer = getattr(tokenizers, name, None)
        if getattr(transformer, "config", None) is None or tokenizer is None:
            return None
        return ClipPromptEncoder.at_layer(
            transformer,
            tokenizer,
            penultimate=penultimate,
            owns_model=False,
            compute_device=text_encoder_device,
        )

    if family == "sd1":
        inner: PromptEncoder | None = part("clip_l", penultimate=False)
    elif family == "sdxl":
        parts = [part("clip_l", penultimate=True), part("clip_g", penultimate=True)]
        inner = None if None in parts else ConcatPromptEncoder(parts)
    else:
        return None
    if inner is None or getattr(clip, "patcher", None) is None:
        return inner
    return _ManagedEncoder(inner, lambda: getattr(getattr(objects, "clip", None), "patcher", None))


def text_encoder_device() -> torch.device:
    """Where Forge runs its text encoders and sends their token ids
    (``backend.memory_management.text_encoder_device``, as its ``classic_engine`` does): the
    CPU in low-VRAM modes, where the weights are cast to the input's device on the fly."""
    mm = _memory_module()
    pick = getattr(mm, "text_encoder_device", None) or mm.get_torch_device
    return torch.device(pick())


def keeps_text_encoders_off_its_device() -> bool:
    """Whether Forge runs text encoders away from its compute device (low-VRAM modes)."""
    return text_encoder_device() != torch.device(_memory_module().get_torch_device())


def _memory_module() -> Any:
    try:
        return importlib.import_module("backend.memory_management")
    except ImportError:
        return importlib.import_module("ldm_patched.modules.model_management")


def _patcher_class() -> Any:
    try:
        return importlib.import_module("backend.patcher.base").ModelPatcher
    except ImportError:
        return importlib.import_module("ldm_patched.modules.model_patcher").ModelPatcher


class _OMSWeights(torch.nn.Module):
    """Container registering the OMS module (and an owned text encoder that runs beside it)
    with Forge. Forge moves models with ``.to()`` (``LoadedModel.model_load`` /
    ``model_unload``, backend/memory_management.py): the model's cached prompt text states
    move with them, so none stay in VRAM when Forge unloads the module to make room."""

    def __init__(self, model: OMSModel) -> None:
        super().__init__()
        self.unet = model.unet
        follows = model.owns_text_encoder and model.text_device is None
        self.text_encoders = torch.nn.ModuleList(
            model.text_encoder.owned_modules() if follows else []
        )
        self.prompt_cache = model.prompt_cache

    def _apply(self, fn: Any, recurse: bool = True) -> _OMSWeights:
        super()._apply(fn, recurse)
        for text, states in self.prompt_cache.items():
            self.prompt_cache[text] = fn(states)
        return self


class ForgeMemory:
    """Loads the OMS model to the GPU through Forge's memory manager, which first makes room
    there (unloading other models, keeping its inference reserve) and offloads it when other
    models need the room, and unloads it through the manager when OMS lets go of the GPU
    (:meth:`release`). The model comes to :meth:`load` on the CPU: only the manager moves it
    to the GPU. Keeps one ModelPatcher per model so Forge recognises it as loaded.
    ``offload_device``: where Forge unloads it to (the CPU)."""

    def __init__(self, offload_device: torch.device | str = "cpu") -> None:
        self.offload_device = torch.device(offload_device)
        self._model: OMSModel | None = None
        self._patcher: Any = None

    def load(self, model: OMSModel) -> None:
        """Ask Forge to put ``model`` on its compute device (freeing others as needed). A
        model held before is unloaded first, so two never share VRAM."""
        mm = _memory_module()
        if self._model is not model:
            self.forget()
            self._model = model
            self._patcher = _patcher_class()(
                _OMSWeights(model),
                load_device=mm.get_torch_device(),
                offload_device=self.offload_device,
            )
        mm.load_models_gpu([self._patcher])
        # Forge may leave plain torch layers on the CPU when it "swaps" a model in low VRAM;
        # the OMS module is small, so finish the move instead of computing across devices.
        device = torch.device(mm.get_torch_device())
        if any(not same_device(d, device) for d in model.devices()):
            try:
                model.to(device=device)
            except BaseException:
                self.forget()  # back to the CPU, whole: the next generation tries again
                raise

    def release(self) -> bool:
        """Unload the OMS model as Forge unloads its own: taken out of the manager's loaded
        models and moved to its offload device (``LoadedModel.model_unload``). Returns
        whether the manager held it."""
        if self._patcher is None:
            return False
        mm = _memory_module()
        held = [loaded for loaded in mm.current_loaded_models if loaded.model is self._patcher]
        for loaded in held:
            mm.current_loaded_models.remove(loaded)
            loaded.model_unload()
        if self._model is not None:
            self._model.to(device=self.offload_device)
        return bool(held)

    def forget(self) -> None:
        """Release the model and drop the references to it (the cache dropped it)."""
        self.release()
        self._model, self._patcher = None, None

    def drop(self, model: OMSModel) -> None:
        """The model cache let go of ``model``: if Forge holds it, unload it now, before the
        cache loads the next one (another module, precision, the fp32 retry)."""
        if model is self._model:
            self.forget()
