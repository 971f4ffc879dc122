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
from typing import Any, NoReturn

import torch

from oms_ext.loading import (
    DTYPES,
    OMSLoadError,
    OMSModel,
    PromptEncoderLike,
    cross_attention_width,
    find_module_files,
    load_oms,
    read_header,
)
from oms_ext.precision import auto_dtype
from oms_ext.text import (
    TextEncoderError,
    TextEncoderNotFound,
    load_release_text_encoder,
    release_text_encoder_available,
)
from oms_ext.webui.cache import CacheKey, ModelCache, canonical_device
from oms_ext.webui.download import (
    DownloadError,
    DownloadPending,
    download_files,
    missing_files,
    repo_url,
    text_encoder_folder,
)
from oms_ext.webui.registry import (
    TEXT_ENCODER_BY_WIDTH,
    ResolvedModule,
    TextEncoderFiles,
    resolve_module,
)

DEVICES = ("auto", "cpu")
TEXT_DEVICES = ("auto", "gpu", "cpu")
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
GPU_FREE = "free after each generation"
GPU_KEEP = "keep on GPU between generations"
GPU_MEMORY = ("auto", GPU_FREE, GPU_KEEP)


@dataclass(frozen=True)
class SettingSpec:
    """One WebUI setting: key in ``shared.opts``, default, label, choices (None = free) and a
    one-line help text shown under it."""

    key: str
    default: Any
    label: str
    choices: tuple[str, ...] | None = None
    help: str = ""


#: The "One More Step" settings section, in display order. Every label starts with "OMS" and
#: every help text names One More Step, so the settings search finds them by either name.
SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "oms_models_dir",
        "",
        "OMS models folder",
        help="where One More Step looks for modules and downloads them; empty = the WebUI's "
        "models/oms folder. Press the refresh button beside the module list after a change",
    ),
    SettingSpec(
        "oms_device",
        "auto",
        "OMS runs on",
        DEVICES,
        help="auto = the WebUI's GPU; cpu keeps One More Step out of VRAM (slower, still once "
        "per batch)",
    ),
    SettingSpec(
        "oms_text_encoder_device",
        "auto",
        "OMS text encoder runs on",
        TEXT_DEVICES,
        help="auto = the CPU under --lowvram/--medvram (Forge: where it runs text encoders), "
        "else beside the module. One More Step's 681 MB encoder runs once per new prompt",
    ),
    SettingSpec(
        "oms_dtype",
        "auto",
        "OMS precision",
        DTYPE_CHOICES,
        help="auto = the WebUI's own precision on a GPU; on the CPU bfloat16 where the CPU "
        "runs it faster (AVX512-BF16/AMX), else float32; float32 after a NaN. One More Step "
        "never uses fp16 on the CPU",
    ),
    SettingSpec(
        "oms_gpu_memory",
        "auto",
        "OMS GPU memory between generations",
        GPU_MEMORY,
        help="auto = freed under --lowvram/--medvram (Forge: its memory manager decides). "
        "One More Step always leaves the GPU when it is switched off or the checkpoint changes",
    ),
    SettingSpec(
        "oms_allow_download",
        True,
        "OMS downloads missing modules",
        help="One More Step fetches a missing module (308 MB + 681 MB text encoder) from "
        "Hugging Face in the background; generations before it is there run without it",
    ),
    SettingSpec(
        "oms_hf_endpoint",
        "",
        "OMS Hugging Face mirror",
        help="address of a Hugging Face mirror for One More Step downloads; empty = "
        "huggingface.co",
    ),
    SettingSpec(
        "oms_reuse_sd2_text_encoder",
        True,
        "OMS reuses an SD2.x checkpoint's text encoder",
        help="One More Step then needs no download and no second copy of SD 2.1's encoder",
    ),
)


@dataclass(frozen=True)
class Settings:
    """The extension's settings (see :data:`SETTINGS` for meaning and defaults)."""

    models_dir: str = ""
    device: str = "auto"
    text_encoder_device: str = "auto"
    dtype: str = "auto"
    gpu_memory: str = "auto"
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
    there; fp32 instead). "auto": on a GPU the precision the WebUI itself runs models in
    (``webui_dtype``: A1111's ``devices.dtype`` with ``--no-half`` / ``--precision full``,
    Forge's fp16 check of the device; fp16 when unknown); on the CPU bfloat16 where the CPU
    runs it faster (:func:`oms_ext.precision.auto_dtype`: AVX512-BF16/AMX; the start latent
    moves by about 5e-4 relative), float32 otherwise; float32 once half precision (fp16 or
    bf16) gave NaN on this device (``half_works`` false).
    """
    if settings.dtype != "auto":
        chosen = DTYPES[settings.dtype]
        return torch.float32 if chosen == torch.float16 and device.type == "cpu" else chosen
    if not half_works:
        return torch.float32
    if device.type == "cpu":
        return auto_dtype(device)
    return webui_dtype if webui_dtype is not None else torch.float16


def cpu_text_dtype(settings: Settings) -> torch.dtype:
    """The precision of a text encoder moved to the CPU while the module runs on a GPU: bf16
    or fp32 as set, else (auto, or fp16, never used on the CPU) as "auto" on the CPU."""
    if settings.dtype in ("fp32", "bf16"):
        return DTYPES[settings.dtype]
    return auto_dtype(torch.device("cpu"))


def text_encoder_device(settings: Settings, webui_low_vram: bool) -> torch.device | None:
    """Where an OMS-owned text encoder runs: the CPU when set so, or for "auto" when the
    WebUI saves VRAM (``webui_low_vram``; its text states are small and cached per prompt);
    None = beside the module on ``device``."""
    if settings.text_encoder_device == "cpu" or (
        settings.text_encoder_device == "auto" and webui_low_vram
    ):
        return torch.device("cpu")
    return None


def frees_gpu_after_each_generation(settings: Settings, webui_low_vram: bool) -> bool:
    """Whether OMS leaves the GPU after its step ("auto": when the WebUI saves VRAM)."""
    return settings.gpu_memory == GPU_FREE or (settings.gpu_memory == "auto" and webui_low_vram)


@dataclass(frozen=True)
class ModelRequest:
    """Everything :func:`provide_model` needs, as plain values.

    ``text_device``/``text_dtype``: where and in which precision the module's own text
    encoder runs when not beside the module (the CPU). ``borrowed_encoder``/``borrowed_id``:
    a factory for the checkpoint's own text encoder to reuse (SD2.x; called only when the
    model is (re)loaded) and an id naming it for the cache (e.g. the checkpoint's hash);
    None/"" to use the encoder the module names.
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
    resolved = resolve_module(request.choice, request.family, list(request.folders))
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
        return cache.get(key, lambda: _load(resolved, request, cache, download))
    except (OMSLoadError, TextEncoderNotFound, TextEncoderError) as e:
        e.reason = f"module {resolved.name}: {e.reason}"
        raise


@dataclass(frozen=True)
class _Download:
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


def _load(
    resolved: ResolvedModule,
    request: ModelRequest,
    cache: ModelCache,
    download: Callable[..., Path],
) -> OMSModel:
    device, dtype, models_dir = request.device, request.dtype, request.folders[0]
    path = resolved.path
    if resolved.present and path.is_file():
        read_header(path)  # a broken file fails here, before any encoder download
    borrowed = request.borrowed_encoder is not None
    has_pointer = path.is_dir() and (path / "oms_text_encoder" / "config.json").is_file()
    spec = None if borrowed or (has_pointer and resolved.known is None) else _release_encoder(
        resolved
    )
    needed = []
    if not resolved.present and resolved.known is not None:
        known = resolved.known
        needed.append(_Download(known.repo_id, known.files, path, known.size_mb))
    if spec is not None and not release_text_encoder_available(
        spec.repo_id,
        dual=spec.dual,
        models_dir=models_dir,
        module_root=path if path.is_dir() else None,
    ):
        target = text_encoder_folder(models_dir, spec)
        needed.append(_Download(spec.repo_id, spec.files, target, spec.size_mb))
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
    needed: Sequence[_Download],
    request: ModelRequest,
    cache: ModelCache,
    download: Callable[..., Path],
) -> NoReturn:
    """Start (once) the download of what ``resolved`` still needs; always raises:
    DownloadPending while it runs, DownloadError when downloads are off or failed lately."""
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
    key = f"{request.endpoint or ''}|{resolved.path}"
    failed = cache.downloads.recent_failure(key)
    if failed is not None:
        minutes = round(cache.downloads.RETRY_AFTER_S / 60)
        raise DownloadError(
            f"{failed}\n(a failed download is tried again {minutes} min after it failed)",
            reason=failed.reason,
        )

    def work() -> None:
        for part in needed:
            download(part.repo_id, part.files, part.target, endpoint=request.endpoint)

    started = cache.downloads.start(key, work)
    raise DownloadPending(
        f"{'Started' if started else 'Still'} downloading {what} ({sizes}) in the "
        f"background:\n{listing}\nOMS applies to the generations after it has finished",
        reason=f"downloading {what} ({sizes}), OMS will apply once it is there",
    )
