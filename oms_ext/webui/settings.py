"""The extension's settings in the WebUI and the placement policy they set.

:class:`Settings` mirrors the WebUI settings section (keys in :data:`SETTINGS`, read with
defaults so a WebUI started without the UI, where the section is never registered, still
works); the functions below turn them and the WebUI's own flags into the device and precision
of a :class:`~oms_ext.runtime.provider.ModelRequest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oms_ext.loading import DTYPES
from oms_ext.precision import auto_dtype
from oms_ext.runtime.registry import KNOWN_MODULES

DEVICES = ("auto", "cpu")
TEXT_DEVICES = ("auto", "gpu", "cpu")
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
GPU_FREE = "free after each generation"
GPU_KEEP = "keep on GPU between generations"
GPU_MEMORY = ("auto", GPU_FREE, GPU_KEEP)


def _download_sizes() -> str:
    """The released modules' download sizes, module + text encoder, e.g. "oms_b_openclip_15_21,
    oms_b_openclip_xl: 308 MB + 681 MB text encoder"."""
    by_size: dict[tuple[int, int], list[str]] = {}
    for known in KNOWN_MODULES:
        by_size.setdefault((known.size_mb, known.text_encoder.size_mb), []).append(known.name)
    return "; ".join(
        f"{', '.join(names)}: {module} MB + {text} MB text encoder"
        for (module, text), names in by_size.items()
    )


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
        help="auto = freed right after its step under --lowvram/--medvram (Forge: its memory "
        "manager decides); free = when the whole generation is done. One More Step always "
        "leaves the GPU when it is switched off, in img2img, or when the checkpoint changes",
    ),
    SettingSpec(
        "oms_allow_download",
        True,
        "OMS downloads missing modules",
        help="One More Step fetches a missing module from Hugging Face in the background "
        f"({_download_sizes()}); generations before it is there run without it",
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


def frees_gpu_after_its_step(settings: Settings, webui_low_vram: bool) -> bool:
    """Whether OMS leaves the GPU right after its step, before the WebUI samples: "auto" when
    the WebUI saves VRAM (``webui_low_vram``), where the sampler needs every byte."""
    return settings.gpu_memory == "auto" and webui_low_vram


def frees_gpu_after_each_generation(settings: Settings) -> bool:
    """Whether OMS leaves the GPU when a generation (all its batches) is done."""
    return settings.gpu_memory == GPU_FREE
