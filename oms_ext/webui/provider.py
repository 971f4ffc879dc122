"""Settings of the extension and getting a ready OMS model for a generation.

:class:`Settings` mirrors the WebUI settings section (keys in :data:`SETTINGS`, read with
defaults so a WebUI started without the UI, where the section is never registered, still
works). :func:`provide_model` resolves the chosen module, downloads what is missing (when
allowed), and loads it through the model cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oms_ext.loading import DTYPES, OMSModel, PromptEncoderLike, load_oms, read_header
from oms_ext.text import ClipPromptEncoder, TextEncoderNotFound, load_clip_text_model, tokenize_fn
from oms_ext.webui.cache import CacheKey, ModelCache, canonical_device
from oms_ext.webui.download import (
    DownloadError,
    download_files,
    missing_files,
    repo_url,
    text_encoder_folder,
)
from oms_ext.webui.registry import KNOWN_BY_NAME, ResolvedModule, resolve_module

DEVICES = ("auto", "cpu")
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
OFFLOADS = ("auto", "always", "never")


@dataclass(frozen=True)
class SettingSpec:
    """One WebUI setting: key in ``shared.opts``, default, label, choices (None = free)."""

    key: str
    default: Any
    label: str
    choices: tuple[str, ...] | None = None


#: The "One More Step" settings section, in display order.
SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("oms_models_dir", "", "OMS models folder (empty = <WebUI models>/oms)"),
    SettingSpec("oms_device", "auto", "Run OMS on (auto = the WebUI's device)", DEVICES),
    SettingSpec(
        "oms_dtype",
        "auto",
        "OMS precision (auto = the WebUI's precision on GPU, fp32 on CPU)",
        DTYPE_CHOICES,
    ),
    SettingSpec(
        "oms_offload",
        "auto",
        "Move OMS off the GPU after its step (auto = in low/med VRAM)",
        OFFLOADS,
    ),
    SettingSpec("oms_allow_download", True, "Download missing OMS modules from Hugging Face"),
    SettingSpec("oms_hf_endpoint", "", "Hugging Face endpoint for downloads (empty = default)"),
    SettingSpec("oms_reuse_sd2_text_encoder", True, "Reuse an SD2.x checkpoint's text encoder"),
)


@dataclass(frozen=True)
class Settings:
    """The extension's settings (see :data:`SETTINGS` for meaning and defaults)."""

    models_dir: str = ""
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "auto"
    allow_download: bool = True
    hf_endpoint: str = ""
    reuse_sd2_text_encoder: bool = True

    def __post_init__(self) -> None:
        for spec in SETTINGS:
            value = getattr(self, spec.key.removeprefix("oms_"))
            if spec.choices is not None and value not in spec.choices:
                raise ValueError(
                    f"setting {spec.key} must be one of {list(spec.choices)}, got {value!r}"
                )

    @classmethod
    def from_opts(cls, opts: Any) -> Settings:
        """Read ``oms_*`` options; absent or invalid ones take their defaults."""
        values = {}
        for spec in SETTINGS:
            value = getattr(opts, spec.key, spec.default) if opts is not None else spec.default
            if spec.choices is not None and value not in spec.choices:
                value = spec.default
            if isinstance(spec.default, bool):
                value = bool(value)
            values[spec.key.removeprefix("oms_")] = value
        return cls(**values)


def models_folders(settings: Settings, webui_models_dir: Path, extension_dir: Path) -> list[Path]:
    """Where modules are looked for, in order: the configured folder (or
    ``<WebUI models>/oms``), then the extension's own ``models/`` folder. Downloads go to
    the first."""
    first = Path(settings.models_dir) if settings.models_dir.strip() else webui_models_dir / "oms"
    return [first, extension_dir / "models"]


def compute_device(settings: Settings, webui_device: torch.device | str) -> torch.device:
    return torch.device("cpu") if settings.device == "cpu" else torch.device(webui_device)


def compute_dtype(
    settings: Settings,
    device: torch.device,
    webui_dtype: torch.dtype | None = None,
    *,
    half_works: bool = True,
) -> torch.dtype:
    """The precision OMS runs in on ``device``.

    An explicit setting wins, except that fp16 is never used on the CPU (slow and inexact
    there; fp32 instead). "auto": fp32 on the CPU; on a GPU the precision the WebUI itself
    runs models in (``webui_dtype``: A1111's ``devices.dtype`` with ``--no-half`` /
    ``--precision full``, Forge's fp16 check of the device; fp16 when unknown), and fp32 once
    half precision gave NaN on this device (``half_works`` false).
    """
    if settings.dtype != "auto":
        chosen = DTYPES[settings.dtype]
        return torch.float32 if chosen == torch.float16 and device.type == "cpu" else chosen
    if device.type == "cpu" or not half_works:
        return torch.float32
    return webui_dtype if webui_dtype is not None else torch.float16


def should_offload(settings: Settings, host_low_vram: bool) -> bool:
    return settings.offload == "always" or (settings.offload == "auto" and host_low_vram)


@dataclass(frozen=True)
class ModelRequest:
    """Everything :func:`provide_model` needs, as plain values.

    ``borrowed_encoder``/``borrowed_id``: a factory for the checkpoint's own text encoder to
    reuse (SD2.x; called only when the model is (re)loaded) and an id naming it for the cache
    (e.g. the checkpoint's hash); None/"" to use the encoder the module names.
    """

    choice: str
    family: str
    folders: tuple[Path, ...]
    device: torch.device
    dtype: torch.dtype
    allow_download: bool = False
    endpoint: str | None = None
    borrowed_encoder: Callable[[], PromptEncoderLike] | None = None
    borrowed_id: str = ""


def provide_model(
    request: ModelRequest,
    cache: ModelCache,
    *,
    download: Callable[..., Path] = download_files,
) -> OMSModel:
    """The loaded OMS model for ``request`` (from ``cache`` when it is the same one).

    Raises UnsupportedModelError / ValueError (no module for this checkpoint), DownloadError
    (missing files that cannot or may not be downloaded), TextEncoderNotFound, OMSLoadError.
    """
    resolved = resolve_module(request.choice, request.family, list(request.folders))
    download = _remembering_failures(download, cache)
    if resolved.known is not None:
        _fetch_missing(
            resolved, request, download, resolved.known.repo_id, resolved.known.files, resolved.path
        )
    source = (
        f"checkpoint:{request.borrowed_id}" if request.borrowed_encoder is not None else "module"
    )
    key = CacheKey(
        str(resolved.path),
        str(canonical_device(request.device)),
        str(request.dtype).removeprefix("torch."),
        source,
    )
    return cache.get(key, lambda: _load(resolved, request, download))


def _remembering_failures(download: Callable[..., Path], cache: ModelCache) -> Callable[..., Path]:
    """``download`` that, for a few minutes after it failed for a repo, fails again at once
    with the same message: offline, the hub client's retries take about 20 s per attempt."""

    def fetch(repo_id: str, files: Sequence[str], target: Path, *, endpoint: str | None = None):
        source = repo_url(repo_id, endpoint)
        recent = cache.recent_download_failure(source)
        if recent is not None:
            minutes = round(cache.DOWNLOAD_RETRY_AFTER_S / 60)
            raise DownloadError(f"{recent}\n(not retried for {minutes} min after a failure)")
        try:
            return download(repo_id, files, target, endpoint=endpoint)
        except DownloadError as e:
            cache.note_download_failure(source, str(e))
            raise

    return fetch


def _fetch_missing(
    resolved: ResolvedModule,
    request: ModelRequest,
    download: Callable[..., Path],
    repo_id: str,
    files: tuple[str, ...],
    target: Path,
) -> None:
    missing = missing_files(target, files)
    if not missing:
        return
    if not request.allow_download:
        listing = ", ".join(missing)
        raise DownloadError(
            f"OMS module {resolved.name} is incomplete or missing in {target} and downloading "
            f"is off (Settings > One More Step). Download {listing} from "
            f"{repo_url(repo_id, request.endpoint)} into {target}, or allow downloads"
        )
    download(repo_id, files, target, endpoint=request.endpoint)


def _load(
    resolved: ResolvedModule, request: ModelRequest, download: Callable[..., Path]
) -> OMSModel:
    device, dtype = request.device, request.dtype
    if request.borrowed_encoder is not None:
        return load_oms(resolved.path, device, dtype, text_encoder=request.borrowed_encoder())
    models_dir = request.folders[0]
    if resolved.path.is_file():
        read_header(resolved.path)  # a broken file fails here, before any encoder download
        return load_oms(resolved.path, device, dtype, text_encoder=_sd21_encoder(request, download))
    try:
        return load_oms(resolved.path, device, dtype, models_dir=models_dir, allow_download=False)
    except TextEncoderNotFound:
        if resolved.known is None:
            raise
    spec = resolved.known.text_encoder
    _fetch_missing(
        resolved, request, download, spec.repo_id, spec.files, text_encoder_folder(models_dir, spec)
    )
    return load_oms(resolved.path, device, dtype, models_dir=models_dir, allow_download=False)


def _sd21_encoder(request: ModelRequest, download: Callable[..., Path]) -> ClipPromptEncoder:
    """SD 2.1's text encoder for a single-file module (which names no encoder itself), from
    ``<models>/stabilityai--stable-diffusion-2-1`` (downloaded there when allowed)."""
    from transformers import CLIPTokenizer

    spec = KNOWN_BY_NAME["oms_b_openclip_15_21"].text_encoder
    folder = text_encoder_folder(request.folders[0], spec)
    stub = ResolvedModule("SD 2.1 text encoder", None, folder, present=False)
    _fetch_missing(stub, request, download, spec.repo_id, spec.files, folder)
    model = load_clip_text_model(folder / "text_encoder", dtype=request.dtype)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    encoder = ClipPromptEncoder(model, tokenize_fn(tokenizer), owns_model=True)
    return encoder.to(device=request.device, dtype=request.dtype)
