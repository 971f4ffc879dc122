"""OMS modules in ComfyUI: the ``oms`` models folder, downloads with ComfyUI's progress bar,
and the loaded module held by a ``comfy.model_patcher.ModelPatcher``.

The ``oms`` folder is merged into ``folder_paths`` (``models/oms`` by default; an
``extra_model_paths.yaml`` entry ``oms: ...`` adds others, such as a WebUI's ``models/oms``).
A module is a released folder (``model_index.json`` + ``oms_module/``) or a ``.safetensors``
file holding one (:mod:`oms_ext.runtime.registry`). Its weights are plain torch layers, so
ComfyUI loads it fully (``load_models_gpu(..., force_full_load=True)``) onto its torch device
and offloads or evicts it like its own models.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oms_ext.comfy.clip import CheckpointClipNeeded
from oms_ext.comfy.notices import notify
from oms_ext.errors import OMSUserError
from oms_ext.loading import OMSModel, cross_attention_width, find_module_files
from oms_ext.runtime.cache import ModelCache
from oms_ext.runtime.download import download_files, hub_fetch
from oms_ext.runtime.provider import ModelRequest, downloads_needed, provide_model
from oms_ext.runtime.registry import KNOWN_BY_NAME, own_module, resolve_module, scan_modules

#: The folder name in ``folder_paths`` and the default folder under ComfyUI's models dir.
FOLDER = "oms"
EXTENSIONS = {".safetensors"}
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: The family "Auto" is resolved against: the loader has no checkpoint, so names are used.
_ANY_FAMILY = "unknown"


def register_folder() -> None:
    """Add ``oms`` to ``folder_paths`` (ComfyUI's models/oms first) keeping the folders
    extra_model_paths.yaml gave it, with .safetensors as its file type."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, exts = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    paths = [default, *(p for p in paths if p != default)]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)


def folders() -> list[Path]:
    """The ``oms`` folders, ComfyUI's own first (downloads go there)."""
    import folder_paths

    register_folder()
    return [Path(p) for p in folder_paths.get_folder_paths(FOLDER)]


def module_names() -> list[str]:
    """The loader's list: modules on disk, then the releases not on disk (downloaded when
    the loader runs)."""
    local = [m.name for m in scan_modules(folders())]
    return [*local, *(name for name in KNOWN_BY_NAME if name not in local)]


class LoaderError(OMSUserError, ValueError):
    """Bad loader input; ComfyUI shows the message on the node."""


class _Weights(torch.nn.Module):
    """What the ModelPatcher moves: the module psi and the text encoder it owns."""

    def __init__(self, model: OMSModel) -> None:
        super().__init__()
        self.unet = model.unet
        owned = model.text_encoder.owned_modules() if model.owns_text_encoder else []
        self.text = torch.nn.ModuleList(owned)


@dataclass
class OMSModule:
    """The OMS_MODEL type: a loaded module, the ModelPatcher that holds it, the latent
    ``families`` it was made for (None: a local module of unknown kind)."""

    name: str
    path: Path
    families: tuple[str, ...] | None
    model: OMSModel
    patcher: Any
    precision: str
    #: A module of the user's own that reads the checkpoint's own text encoder: Apply needs
    #: the checkpoint's CLIP.
    needs_clip: bool = False
    _fp32: OMSModule | None = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def ready(self, encoder: Any = None) -> OMSModel:
        """The model on ComfyUI's device, loaded through ``load_models_gpu`` (full load);
        with ``encoder`` (a borrowed ComfyUI CLIP) the same module reads that encoder."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher], force_full_load=True)
        self.model.to(device=self.patcher.load_device)
        if encoder is None:
            return self.model
        return OMSModel(
            self.model.unet, encoder, self.model.config, self.path, owns_text_encoder=False
        )

    def in_float32(self) -> OMSModule:
        """A float32 copy (loaded once), for a half precision that gave NaN/inf."""
        if self.dtype == torch.float32:
            return self
        if self._fp32 is None:
            self._fp32 = load_module(self.name, "fp32")
        return self._fp32


def pick_dtype(precision: str, device: torch.device, params: int) -> torch.dtype:
    """The module's dtype: "auto" as ComfyUI picks a diffusion model's
    (``model_management.unet_dtype``: its --fp16-unet/--bf16-unet/--fp32-unet flags, then
    ``should_use_fp16``/``should_use_bf16`` for the device), float32 for anything it offers
    beyond fp16/bf16/fp32 (fp8, fp64); else the one asked for."""
    if precision not in PRECISIONS:
        raise LoaderError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}",
            reason="unknown precision",
        )
    if precision != "auto":
        return DTYPES[precision]
    import comfy.model_management as mm

    supported = [torch.float16, torch.bfloat16, torch.float32]
    dtype = mm.unet_dtype(device=device, model_params=params, supported_dtypes=supported)
    return dtype if dtype in supported else torch.float32


def _progress_fetch(total: int) -> Any:
    """A download ``fetch`` that moves ComfyUI's progress bar one step per file."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def fetch(repo_id: str, filename: str, dest_dir: Path, endpoint: str | None) -> Path:
        path = hub_fetch(repo_id, filename, dest_dir, endpoint)
        bar.update(1)
        return path

    return fetch


def _download(request: ModelRequest, resolved: Any) -> None:
    """Fetch what the module still needs now (the node waits; the bar shows the files)."""
    needed = downloads_needed(resolved, request)
    total = sum(len(part.files) for part in needed)
    fetch = _progress_fetch(total) if needed else None
    for part in needed:
        download_files(part.repo_id, part.files, part.target, fetch=fetch)


#: What the loader says when ftfy is missing: a module's own tokenizer reads some prompts
#: differently without it.
FTFY_MISSING = (
    "One More Step: ftfy is not installed, so the module's own text encoder reads curly quotes, "
    "ligatures and HTML entities in a prompt differently from the WebUIs and from how CLIP was "
    "trained. Install it with ComfyUI's Python: python -m pip install ftfy"
)


@functools.cache
def _say_once_if_ftfy_is_missing() -> None:
    """Notify :data:`FTFY_MISSING` (once per ComfyUI run) when ``import ftfy`` fails: exactly
    then transformers' CLIPTokenizer normalises text without ftfy."""
    try:
        import ftfy  # noqa: F401
    except ImportError:
        notify(FTFY_MISSING)


def load_module(name: str, precision: str) -> OMSModule:
    """Load module ``name`` (a local module or a release, downloaded when missing) in
    ``precision``, held by a ModelPatcher on ComfyUI's devices. Raises :class:`LoaderError`
    (or another :class:`OMSUserError`) with a message for the node."""
    import comfy.model_management as mm
    import comfy.model_patcher

    if not isinstance(name, str) or not name.strip():
        raise LoaderError("choose an OMS module", reason="no module chosen")
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    roots = tuple(folders())
    resolved = resolve_module(name, _ANY_FAMILY, list(roots))
    # OMS-B is 0.16 G parameters; the count only steers ComfyUI's fp16 choice for huge models.
    dtype = pick_dtype(precision, load_device, 160_000_000)
    own = own_module(resolved.path) if resolved.present and resolved.known is None else None
    borrowed = None
    if own is not None and own.borrows_encoder:  # the checkpoint's CLIP comes through Apply
        width = cross_attention_width(find_module_files(resolved.path)[1]) or 0
        borrowed = CheckpointClipNeeded(resolved.name, width)
    request = ModelRequest(
        name,
        _ANY_FAMILY,
        roots,
        torch.device(offload_device),
        dtype,
        borrowed_encoder=None if borrowed is None else (lambda: borrowed),
        borrowed_id="clip input" if borrowed is not None else "",
        resolved=resolved,
    )
    _download(request, resolved)
    model = provide_model(request, ModelCache(offload_device))
    if borrowed is None:  # the module tokenizes with its own CLIPTokenizer
        _say_once_if_ftfy_is_missing()
    patcher = comfy.model_patcher.ModelPatcher(
        _Weights(model), load_device=load_device, offload_device=offload_device
    )
    known = resolved.known
    families = known.families if known is not None else (own.families if own else None)
    return OMSModule(
        resolved.name,
        resolved.path,
        families,
        model,
        patcher,
        precision,
        needs_clip=borrowed is not None,
    )
