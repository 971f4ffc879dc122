"""Which OMS module serves which checkpoint, and where modules live on disk.

Known modules are the authors' releases (Hugging Face, fp16, licence openrail++). Local modules
are found by scanning the models folders: released-layout folders (``model_index.json`` +
``oms_module/config.json``) and single ``.safetensors`` files. "Auto" picks the known module of
the loaded checkpoint's family: SD1.x/SD2.x share one latent space, SDXL has its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from oms_ext.spaces import UnsupportedModelError
from oms_ext.text import SD21_REPO, TOKENIZER_FILES, TOKENIZER_OPTIONAL_FILES
from oms_ext.webui.args import AUTO_MODULE

Family = str  # "sd1" | "sd2" | "sdxl" | "sd3" | "flux" | "unknown"
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
#: Files of a released module folder that loading needs (never the pickles, never the fp32
#: copies): the index, the module config and fp16 weights, the two text-encoder pointers.
MODULE_FILES = (
    "model_index.json",
    "oms_module/config.json",
    "oms_module/diffusion_pytorch_model.fp16.safetensors",
    "oms_text_encoder/config.json",
    "oms_tokenizer/config.json",
)


@dataclass(frozen=True)
class TextEncoderFiles:
    """Files of the text encoder(s) a module's pointers name, as a repo and its paths."""

    repo_id: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class KnownModule:
    """A released OMS module: name (= folder name under the models folder), hub repo, the
    checkpoint families whose latent space it was trained in, and its text encoder's files
    (oms_b_mixclip_xl: SDXL's two encoders, about 5 GB with the module)."""

    name: str
    repo_id: str
    families: tuple[Family, ...]
    text_encoder: TextEncoderFiles

    @property
    def files(self) -> tuple[str, ...]:
        return MODULE_FILES


def _clip_files(subfolder: str, tokenizer: str) -> tuple[str, ...]:
    return (
        f"{subfolder}/config.json",
        f"{subfolder}/model.fp16.safetensors",
        *(f"{tokenizer}/{name}" for name in (*TOKENIZER_FILES, *TOKENIZER_OPTIONAL_FILES)),
    )


_SD21_TEXT = TextEncoderFiles(SD21_REPO, _clip_files("text_encoder", "tokenizer"))
_SDXL_TEXT = TextEncoderFiles(
    SDXL_REPO,
    _clip_files("text_encoder", "tokenizer") + _clip_files("text_encoder_2", "tokenizer_2"),
)

KNOWN_MODULES: tuple[KnownModule, ...] = (
    KnownModule("oms_b_openclip_15_21", "h1t/oms_b_openclip_15_21", ("sd1", "sd2"), _SD21_TEXT),
    KnownModule("oms_b_openclip_xl", "h1t/oms_b_openclip_xl", ("sdxl",), _SD21_TEXT),
    KnownModule("oms_b_mixclip_xl", "h1t/oms_b_mixclip_xl", ("sdxl",), _SDXL_TEXT),
)
KNOWN_BY_NAME = {m.name: m for m in KNOWN_MODULES}
#: "Auto": the default module of each checkpoint family.
AUTO_BY_FAMILY = {
    "sd1": "oms_b_openclip_15_21",
    "sd2": "oms_b_openclip_15_21",
    "sdxl": "oms_b_openclip_xl",
}


@dataclass(frozen=True)
class LocalModule:
    """A module found on disk: ``name`` (folder name or file stem) and its ``path``."""

    name: str
    path: Path


@dataclass(frozen=True)
class ResolvedModule:
    """The module to use: its name, the known release (if any), and where it is or goes."""

    name: str
    known: KnownModule | None
    path: Path
    present: bool


def is_module_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / "oms_module" / "config.json").is_file()


def scan_modules(folders: Iterable[Path]) -> list[LocalModule]:
    """Modules in ``folders`` (first folder wins on a name clash), sorted by name.

    A module is a subfolder in the released layout or a ``.safetensors`` file at top level.
    Missing folders are skipped; nothing is created.
    """
    found: dict[str, LocalModule] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and is_module_folder(entry):
                found.setdefault(entry.name, LocalModule(entry.name, entry))
            elif entry.is_file() and entry.suffix.lower() == ".safetensors":
                found.setdefault(entry.stem, LocalModule(entry.stem, entry))
    return sorted(found.values(), key=lambda m: m.name)


def module_choices(local: Sequence[LocalModule]) -> list[str]:
    """Dropdown choices: "Auto", the known releases, then other local modules."""
    extra = [m.name for m in local if m.name not in KNOWN_BY_NAME]
    return [AUTO_MODULE, *KNOWN_BY_NAME, *extra]


def auto_module(family: Family) -> str:
    """The known module for a checkpoint family; UnsupportedModelError when there is none."""
    try:
        return AUTO_BY_FAMILY[family]
    except KeyError:
        raise UnsupportedModelError(
            f"no OMS module for this checkpoint family ({family}); OMS modules exist for "
            "SD1.x, SD2.x and SDXL checkpoints. Pick a module by name to force one."
        ) from None


def resolve_module(choice: str, family: Family, folders: Sequence[Path]) -> ResolvedModule:
    """Resolve a UI choice to a module. Local copies (in ``folders``, in order) win; a known
    module not on disk resolves to ``folders[0]/<name>`` with ``present`` false.

    Raises UnsupportedModelError for "Auto" on an unsupported family or a known module picked
    for the wrong family, ValueError for an unknown name that is not on disk.
    """
    if not folders:
        raise ValueError("resolve_module needs at least one models folder")
    name = auto_module(family) if choice == AUTO_MODULE else choice
    known = KNOWN_BY_NAME.get(name)
    if known is not None and family in AUTO_BY_FAMILY and family not in known.families:
        raise UnsupportedModelError(
            f"OMS module {name} was trained for {'/'.join(known.families)} latents, but the "
            f"loaded checkpoint is {family}; choose 'Auto' or a matching module"
        )
    local = {m.name: m for m in scan_modules(folders)}
    if name in local:
        return ResolvedModule(name, known, local[name].path, present=True)
    if known is None:
        names = ", ".join(module_choices(list(local.values())))
        raise ValueError(
            f"OMS module {name!r} is neither a known release nor in "
            f"{', '.join(str(f) for f in folders)}; available: {names}"
        )
    return ResolvedModule(name, known, folders[0] / name, present=False)
