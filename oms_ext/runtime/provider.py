"""Getting a ready OMS model for a generation, in any host.

:func:`provide_model` resolves the chosen module, downloads what is missing (when allowed),
and loads it through the model cache. Where it runs and in which precision is the host's
choice, passed in a :class:`ModelRequest`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from oms_ext.loading import (
    OMSLoadError,
    OMSModel,
    PromptEncoderLike,
    cross_attention_width,
    find_module_files,
    load_oms,
    read_header,
)
from oms_ext.runtime.cache import CacheKey, ModelCache, canonical_device
from oms_ext.runtime.download import (
    DownloadError,
    DownloadPending,
    download_files,
    missing_files,
    repo_url,
    text_encoder_folder,
)
from oms_ext.runtime.registry import (
    TEXT_ENCODER_BY_WIDTH,
    ResolvedModule,
    TextEncoderFiles,
    resolve_module,
)
from oms_ext.text import (
    TextEncoderError,
    TextEncoderNotFound,
    load_release_text_encoder,
    release_text_encoder_available,
)


@dataclass(frozen=True)
class ModelRequest:
    """Everything :func:`provide_model` needs, as plain values.

    ``text_device``/``text_dtype``: where and in which precision the module's own text
    encoder runs when not beside the module (the CPU). ``borrowed_encoder``/``borrowed_id``:
    a factory for the checkpoint's own text encoder to reuse (SD2.x; called only when the
    model is (re)loaded) and an id naming it for the cache (e.g. the checkpoint's hash);
    None/"" to use the encoder the module names. ``managed``: the host's memory manager moves
    the model to ``device`` (Forge's, which first makes room there): it is loaded on the CPU
    and the cache never moves it. ``resolved``: ``choice`` already resolved by the host for
    this generation (it looked at the module to choose the encoder), so the models folders
    are scanned once; None to resolve it here.
    """

    choice: str
    family: str
    folders: tuple[Path, ...]
    device: torch.device
    dtype: torch.dtype
    text_device: torch.device | None = None
    text_dtype: torch.dtype | None = None
    allow_download: bool = False
    endpoint: str | None = None
    borrowed_encoder: Callable[[], PromptEncoderLike] | None = None
    borrowed_id: str = ""
    managed: bool = False
    resolved: ResolvedModule | None = None

    @property
    def load_device(self) -> torch.device:
        """Where the files are read to: the CPU when the host's memory manager places the
        model, else its device."""
        return torch.device("cpu") if self.managed else self.device


def provide_model(
    request: ModelRequest,
    cache: ModelCache,
    *,
    download: Callable[..., Path] = download_files,
) -> OMSModel:
    """The loaded OMS model for ``request`` (from ``cache`` when it is the same one).

    A local module (file or folder) always wins over the release of its name and is never
    fetched again; a known release that is not on disk, and the text encoder a module needs
    when it is nowhere on this computer, are downloaded in the background with ``download``
    (one job per module; :class:`DownloadPending` meanwhile). Raises :class:`OMSUserError`
    subclasses for everything the user can fix: UnsupportedModelError (no module for this
    checkpoint), ModuleNotInstalled, DownloadError / DownloadPending, TextEncoderNotFound,
    TextEncoderError, OMSLoadError; their ``reason`` names the module.
    """
    resolved = request.resolved or resolve_module(
        request.choice, request.family, list(request.folders)
    )
    source = (
        f"checkpoint:{request.borrowed_id}" if request.borrowed_encoder is not None else "module"
    )
    key = CacheKey(
        str(resolved.path),
        str(canonical_device(request.device)),
        str(request.dtype).removeprefix("torch."),
        source,
        str(request.text_device) if request.text_device is not None else "",
    )
    try:
        return cache.get(
            key, lambda: _load(resolved, request, cache, download), place=not request.managed
        )
    except (OMSLoadError, TextEncoderNotFound, TextEncoderError) as e:
        e.reason = f"module {resolved.name}: {e.reason}"
        raise


@dataclass(frozen=True)
class Download:
    """Files of one repo to fetch into ``target``; ``size_mb`` for messages."""

    repo_id: str
    files: tuple[str, ...]
    target: Path
    size_mb: int


def _release_encoder(resolved: ResolvedModule) -> TextEncoderFiles:
    """The text encoder a module without pointer files uses: its release's, or by the width
    of the text states it attends to (1024: SD 2.1's, 2048: SDXL's pair)."""
    if resolved.known is not None:
        return resolved.known.text_encoder
    weights = resolved.path if resolved.path.is_file() else find_module_files(resolved.path)[1]
    width = cross_attention_width(weights)
    spec = TEXT_ENCODER_BY_WIDTH.get(width) if width is not None else None
    if spec is None:
        raise OMSLoadError(
            f"{weights}: no text encoder is known for a module attending to {width}-wide text "
            f"states; load it with oms_ext.load_oms(..., text_encoder=...)",
            reason=f"no known text encoder gives the {width}-wide text states it reads",
        )
    return spec


def _encoder_spec(resolved: ResolvedModule, request: ModelRequest) -> TextEncoderFiles | None:
    """The release text encoder ``resolved`` loads, None when it brings or borrows its own."""
    path = resolved.path
    has_pointer = path.is_dir() and (path / "oms_text_encoder" / "config.json").is_file()
    if request.borrowed_encoder is not None or (has_pointer and resolved.known is None):
        return None
    return _release_encoder(resolved)


def downloads_needed(resolved: ResolvedModule, request: ModelRequest) -> list[Download]:
    """What must be fetched before ``resolved`` loads for ``request``: the release itself when
    it is not on disk, and the text encoder it uses when that is nowhere on this computer.
    A broken single module file raises :class:`OMSLoadError` here, before any download."""
    path, models_dir = resolved.path, request.folders[0]
    if resolved.present and path.is_file():
        read_header(path)
    spec = _encoder_spec(resolved, request)
    needed = []
    if not resolved.present and resolved.known is not None:
        known = resolved.known
        needed.append(Download(known.repo_id, known.files, path, known.size_mb))
    if spec is not None and not release_text_encoder_available(
        spec.repo_id,
        dual=spec.dual,
        models_dir=models_dir,
        module_root=path if path.is_dir() else None,
    ):
        target = text_encoder_folder(models_dir, spec)
        needed.append(Download(spec.repo_id, spec.files, target, spec.size_mb))
    return needed


def _load(
    resolved: ResolvedModule,
    request: ModelRequest,
    cache: ModelCache,
    download: Callable[..., Path],
) -> OMSModel:
    device, dtype, models_dir = request.load_device, request.dtype, request.folders[0]
    path = resolved.path
    borrowed = request.borrowed_encoder is not None
    has_pointer = path.is_dir() and (path / "oms_text_encoder" / "config.json").is_file()
    spec = _encoder_spec(resolved, request)
    needed = downloads_needed(resolved, request)
    if needed:
        _download_in_background(resolved, needed, request, cache, download)
    if borrowed:
        return load_oms(path, device, dtype, text_encoder=request.borrowed_encoder())
    text = {"text_device": request.text_device, "text_dtype": request.text_dtype}
    if has_pointer or spec is None:
        return load_oms(path, device, dtype, models_dir=models_dir, allow_download=False, **text)
    encoder = load_release_text_encoder(
        spec.repo_id,
        dual=spec.dual,
        models_dir=models_dir,
        device=request.text_device or device,
        dtype=request.text_dtype or dtype,
    )
    return load_oms(path, device, dtype, text_encoder=encoder, owns_text_encoder=True, **text)


def _download_in_background(
    resolved: ResolvedModule,
    needed: Sequence[Download],
    request: ModelRequest,
    cache: ModelCache,
    download: Callable[..., Path],
) -> NoReturn:
    """Start (once) the downloads of what ``resolved`` still needs, one background job per
    target folder (modules share SD 2.1's encoder: a second module needing it joins the job
    already fetching it instead of starting one that would clear its staging folder); always
    raises: DownloadPending while they run, DownloadError when downloads are off or one failed
    lately. Both list every file still needed, with where to put it, for a download by hand."""
    sizes = " + ".join(f"{part.size_mb} MB" for part in needed)
    what = resolved.name if not resolved.present else f"the text encoder of {resolved.name}"
    listing = "\n".join(
        f"  {', '.join(missing_files(part.target, part.files))} of "
        f"{repo_url(part.repo_id, request.endpoint)} into {part.target}"
        for part in needed
    )
    if not request.allow_download:
        raise DownloadError(
            f"OMS module {resolved.name} is incomplete or missing and downloading is off "
            f"(Settings > One More Step). Download by hand:\n{listing}\nor allow downloads",
            reason=f"{what} is not downloaded ({sizes}) and downloads are off; allow them in "
            "Settings > One More Step, or see the console for the files to get",
        )
    keys = [f"{request.endpoint or ''}|{part.target}" for part in needed]
    for key in keys:
        failed = cache.downloads.recent_failure(key)
        if failed is not None:
            minutes = round(cache.downloads.RETRY_AFTER_S / 60)
            raise DownloadError(
                f"{failed}\nEverything {resolved.name} still needs, to download by hand:\n"
                f"{listing}\n(a failed download is tried again {minutes} min after it failed)",
                reason=failed.reason,
            )
    started = False
    for part, key in zip(needed, keys, strict=True):
        started |= cache.downloads.start(
            key,
            functools.partial(
                download, part.repo_id, part.files, part.target, endpoint=request.endpoint
            ),
        )
    raise DownloadPending(
        f"{'Started' if started else 'Still'} downloading {what} ({sizes}) in the "
        f"background:\n{listing}\nOMS applies to the generations after it has finished",
        reason=f"downloading {what} ({sizes}), OMS will apply once it is there",
    )
