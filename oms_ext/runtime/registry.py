"""Which OMS module serves which checkpoint, and where modules live on disk.

Known modules are the authors' releases (Hugging Face, fp16, licence openrail++). Local modules
are found by scanning the models folders: released-layout folders (``model_index.json`` +
``oms_module/config.json``) and single ``.safetensors`` files that hold an OMS module. "Auto"
picks the known module of the loaded checkpoint's family: SD1.x/SD2.x share one latent space,
SDXL has its own; where that release is not on disk but a module of the user's own (trained by
``python -m oms_ext.train``) for the family is, and reads the checkpoint's own text encoder,
Auto uses that one: no download. A local module always wins over the release of the same
name.

The models folder may hold anything: hidden entries (dot-folders, download staging folders),
unreadable folders, broken links and other ``.safetensors`` files (an SD checkpoint dropped
there by mistake) are passed over, never an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from oms_ext.errors import OMSUserError
from oms_ext.loading import OMSLoadError, read_header, training_facts
from oms_ext.runtime.args import AUTO_MODULE
from oms_ext.spaces import UnsupportedModelError
from oms_ext.text import (
    SD21_REPO,
    TOKENIZER_FILES,
    TOKENIZER_OPTIONAL_FILES,
    reads_checkpoint_encoder,
)

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
    """Files of the text encoder(s) a module's pointers name, as a repo and its paths;
    ``dual``: SDXL's two encoders (mixclip layout); ``size_mb``: the download's size."""

    repo_id: str
    files: tuple[str, ...]
    size_mb: int
    dual: bool = False


@dataclass(frozen=True)
class KnownModule:
    """A released OMS module: name (= folder name under the models folder), hub repo, the
    checkpoint families whose latent space it was trained in, its text encoder's files and
    the size of the module's own files in MB (fp16)."""

    name: str
    repo_id: str
    families: tuple[Family, ...]
    text_encoder: TextEncoderFiles
    size_mb: int

    @property
    def files(self) -> tuple[str, ...]:
        return MODULE_FILES


def _clip_files(subfolder: str, tokenizer: str) -> tuple[str, ...]:
    return (
        f"{subfolder}/config.json",
        f"{subfolder}/model.fp16.safetensors",
        *(f"{tokenizer}/{name}" for name in (*TOKENIZER_FILES, *TOKENIZER_OPTIONAL_FILES)),
    )


#: SD 2.1's OpenCLIP ViT-H text encoder (23 layers, fp16: 681 MB).
SD21_TEXT = TextEncoderFiles(SD21_REPO, _clip_files("text_encoder", "tokenizer"), 681)
#: SDXL base's two encoders (CLIP-L 246 MB + OpenCLIP bigG 1.39 GB in fp16).
SDXL_TEXT = TextEncoderFiles(
    SDXL_REPO,
    _clip_files("text_encoder", "tokenizer") + _clip_files("text_encoder_2", "tokenizer_2"),
    1635,
    dual=True,
)
#: The text encoder of a module that names none itself, by its cross-attention width.
TEXT_ENCODER_BY_WIDTH = {1024: SD21_TEXT, 2048: SDXL_TEXT}

KNOWN_MODULES: tuple[KnownModule, ...] = (
    KnownModule(
        "oms_b_openclip_15_21", "h1t/oms_b_openclip_15_21", ("sd1", "sd2"), SD21_TEXT, 308
    ),
    KnownModule("oms_b_openclip_xl", "h1t/oms_b_openclip_xl", ("sdxl",), SD21_TEXT, 308),
    # 5.09 GB in all with SDXL's encoders.
    KnownModule("oms_b_mixclip_xl", "h1t/oms_b_mixclip_xl", ("sdxl",), SDXL_TEXT, 3455),
)
KNOWN_BY_NAME = {m.name: m for m in KNOWN_MODULES}
#: "Auto": the default module of each checkpoint family.
AUTO_BY_FAMILY = {
    "sd1": "oms_b_openclip_15_21",
    "sd2": "oms_b_openclip_15_21",
    "sdxl": "oms_b_openclip_xl",
}


class ModuleNotInstalled(OMSUserError, ValueError):
    """A module name that is neither a release nor in the models folders."""


@dataclass(frozen=True)
class LocalModule:
    """A module found on disk: ``name`` (folder name or file stem) and its ``path``."""

    name: str
    path: Path


@dataclass(frozen=True)
class OwnModule:
    """What a module trained by ``python -m oms_ext.train`` says about itself (its weights'
    training metadata): ``family``, the checkpoint family whose latents it learnt;
    ``borrows_encoder``: it reads the loaded checkpoint's own text encoder (CLIP-L of SD1.x,
    ViT-H of SD2.x, SDXL's pair), so it needs no download and fits that family only."""

    family: Family
    borrows_encoder: bool

    @property
    def families(self) -> tuple[Family, ...]:
        """The checkpoint families it serves (SD1.x and SD2.x share a latent space)."""
        if self.borrows_encoder or self.family == "sdxl":
            return (self.family,)
        return ("sd1", "sd2")


def own_module(path: Path) -> OwnModule | None:
    """The :class:`OwnModule` facts of the module at ``path``; None for the releases, other
    modules and anything unreadable."""
    family = training_facts(path).get("family")
    if family not in AUTO_BY_FAMILY:
        return None
    return OwnModule(family, path.is_dir() and reads_checkpoint_encoder(path))


@dataclass(frozen=True)
class ResolvedModule:
    """The module to use: its name, the known release (if any), and where it is or goes."""

    name: str
    known: KnownModule | None
    path: Path
    present: bool


def is_module_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / "oms_module" / "config.json").is_file()


def is_module_file(path: Path) -> bool:
    """Whether a ``.safetensors`` file may hold an OMS module: the module network's keys
    (``conv_in``, ``conv_out``) at top level and no time embedding (a full diffusers UNet has
    one; an SD checkpoint keeps its UNet under ``model.diffusion_model``). A file whose header
    cannot be read counts (a truncated download of a module: choosing it says so). Reads the
    file's header only."""
    try:
        shapes, _ = read_header(path)
    except OMSLoadError:
        return True
    has_module_keys = all(k in shapes for k in ("conv_in.weight", "conv_out.weight"))
    return has_module_keys and not any(k.startswith("time_embedding.") for k in shapes)


def module_name(path: Path) -> str:
    """The name a module at ``path`` goes by: its folder's name, or its file's stem."""
    return path.name if path.is_dir() else path.stem


def _module_entry(entry: Path) -> LocalModule | None:
    if entry.name.startswith("."):  # hidden, or a download's staging folder
        return None
    if entry.is_dir():
        return LocalModule(entry.name, entry) if is_module_folder(entry) else None
    if entry.suffix.lower() == ".safetensors" and entry.is_file() and is_module_file(entry):
        return LocalModule(entry.stem, entry)
    return None


def scan_modules(folders: Iterable[Path]) -> list[LocalModule]:
    """Modules in ``folders`` (first folder wins on a name clash), sorted by name.

    A module is a subfolder in the released layout or a ``.safetensors`` file at top level
    holding a module. Missing or unreadable folders and entries are passed over; nothing is
    created.
    """
    found: dict[str, LocalModule] = {}
    for folder in folders:
        try:
            entries = sorted(folder.iterdir()) if folder.is_dir() else []
        except OSError:  # unreadable (another user's, lost+found, ...)
            continue
        for entry in entries:
            try:
                module = _module_entry(entry)
            except OSError:  # an entry we may not look into
                continue
            if module is not None:
                found.setdefault(module.name, module)
    return sorted(found.values(), key=lambda m: m.name)


def module_choices(local: Sequence[LocalModule]) -> list[str]:
    """Dropdown choices: "Auto", the known releases, then other local modules."""
    extra = [m.name for m in local if m.name not in KNOWN_BY_NAME]
    return [AUTO_MODULE, *KNOWN_BY_NAME, *extra]


def auto_choice(family: Family, folders: Sequence[Path]) -> str:
    """The module "Auto" uses for a checkpoint of ``family``: the family's release when it is
    on disk or no module of the user's own serves the family without a download; else the
    first such own module. UnsupportedModelError when no module exists for the family."""
    return _auto_from(family, scan_modules(folders))


def _auto_from(family: Family, local: Sequence[LocalModule]) -> str:
    release = auto_module(family)
    if any(m.name == release for m in local):
        return release
    for module in local:
        own = own_module(module.path)
        if own is not None and own.borrows_encoder and family in own.families:
            return module.name
    return release


def auto_module(family: Family) -> str:
    """The known module for a checkpoint family; UnsupportedModelError when there is none."""
    try:
        return AUTO_BY_FAMILY[family]
    except KeyError:
        raise UnsupportedModelError(
            f"no OMS module for this checkpoint family ({family}); OMS modules exist for "
            "SD1.x, SD2.x and SDXL checkpoints. Pick a module by name to force one."
        ) from None


#: File endings of pickled weights, which OMS never loads.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _pickle_of(name: str, folders: Sequence[Path]) -> Path | None:
    """A pickled weight file standing where module ``name`` would be: ``<folder>/<name>.ckpt``
    (or .pt/.pth/.bin) or inside a ``<folder>/<name>/`` folder; None when there is none."""
    for folder in folders:
        try:
            beside = [folder / f"{name}{suffix}" for suffix in PICKLE_SUFFIXES]
            inside = sorted((folder / name).rglob("*")) if (folder / name).is_dir() else []
            for path in (*beside, *inside):
                if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file():
                    return path
        except OSError:  # a folder we may not look into
            continue
    return None


def resolve_module(choice: str, family: Family, folders: Sequence[Path]) -> ResolvedModule:
    """Resolve a UI choice to a module. Local copies (in ``folders``, in order) win; a known
    module not on disk resolves to ``folders[0]/<name>`` with ``present`` false.

    Raises UnsupportedModelError for "Auto" on an unsupported family or a known module picked
    for the wrong family, :class:`ModuleNotInstalled` for an unknown name that is not on disk
    (say from a pasted infotext of someone else's image).
    """
    if not folders:
        raise ValueError("resolve_module needs at least one models folder")
    name = auto_choice(family, folders) if choice == AUTO_MODULE else choice
    known = KNOWN_BY_NAME.get(name)
    if known is not None and family in AUTO_BY_FAMILY and family not in known.families:
        raise UnsupportedModelError(str(fit_warning(name, family)))  # the notes' words
    local = {m.name: m for m in scan_modules(folders)}
    if name in local:
        warning = fit_warning(name, family, local[name].path)
        if known is None and warning is not None:
            raise UnsupportedModelError(warning)
        return ResolvedModule(name, known, local[name].path, present=True)
    if known is None:
        pickle = _pickle_of(name, folders)
        if pickle is not None:
            raise ModuleNotInstalled(
                f"OMS module {name!r}: {pickle} is a pickle file, which OMS refuses to load "
                "(loading a pickle can run any code); get the module as .safetensors",
                reason=f"module {name} was found only as a pickle file ({pickle.name}), which "
                "OMS refuses to load; get its .safetensors version",
            )
        names = ", ".join(module_choices(list(local.values())))
        raise ModuleNotInstalled(
            f"OMS module {name!r} is neither a known release nor in "
            f"{', '.join(str(f) for f in folders)}; available: {names}",
            reason=f"module {name} is not installed; choose another module or put it into "
            "the OMS models folder",
        )
    return ResolvedModule(name, known, folders[0] / name, present=False)


#: How checkpoint families are called in messages.
FAMILY_NAMES = {
    "sd1": "SD1.x",
    "sd2": "SD2.x",
    "sdxl": "SDXL",
    "sd3": "SD3",
    "flow": "a flow-matching model",
    "unknown": "unknown",
}


def _purpose(known: KnownModule) -> str:
    return "/".join(FAMILY_NAMES[f] for f in known.families)


def _size(known: KnownModule) -> str:
    encoders = "text encoders" if known.text_encoder.dual else "text encoder"
    return f"{known.size_mb} MB + {known.text_encoder.size_mb} MB {encoders}"


def _release_state(known: KnownModule, local: Sequence[LocalModule], models_dir: Path) -> str:
    """ "not downloaded", "on disk" or "on disk, text encoder not downloaded"."""
    module = next((m.path for m in local if m.name == known.name), None)
    if module is None:
        return "not downloaded"
    from oms_ext.text import release_text_encoder_available

    encoder = known.text_encoder
    has_encoder = release_text_encoder_available(
        encoder.repo_id,
        dual=encoder.dual,
        models_dir=models_dir,
        module_root=module if module.is_dir() else None,
    )
    return "on disk" if has_encoder else "on disk, text encoder not downloaded"


def _own_words(own: OwnModule) -> str:
    """How the notes call a module of the user's own."""
    purpose = "/".join(FAMILY_NAMES[f] for f in own.families)
    if own.borrows_encoder:
        return f"your own, for {purpose}, reads the checkpoint's own text encoder (no download)"
    return f"your own, for {purpose}"


def _auto_status(local: Sequence[LocalModule], models_dir: Path, family: Family | None) -> str:
    """The "Auto" line: each family's module once, then what Auto uses for the chosen
    checkpoint and whether that still has to be downloaded."""
    families: dict[str, list[str]] = {}
    for fam, module in AUTO_BY_FAMILY.items():
        families.setdefault(module, []).append(FAMILY_NAMES[fam])
    line = f"{AUTO_MODULE} - the module made for the checkpoint: " + ", ".join(
        f"{module} for {'/'.join(names)}" for module, names in families.items()
    )
    if family not in AUTO_BY_FAMILY:
        return line
    chosen = _auto_from(family, local)
    known = KNOWN_BY_NAME.get(chosen)
    if known is None:  # a module of the user's own, on disk
        own = own_module(next(m.path for m in local if m.name == chosen))
        words = _own_words(own) if own is not None else "your own"
        return (
            f"{line}; for the chosen {FAMILY_NAMES[family]} checkpoint it uses {chosen} "
            f"({words}), on disk"
        )
    status = _release_state(known, local, models_dir)
    if status == "not downloaded":
        state = f"a {_size(known)} download not on disk yet, fetched at the first Generate"
    elif status == "on disk, text encoder not downloaded":
        state = (
            f"on disk; its {known.text_encoder.size_mb} MB text encoder is fetched at the "
            "first Generate"
        )
    else:
        state = "on disk"
    return f"{line}; for the chosen {FAMILY_NAMES[family]} checkpoint it uses {chosen}, {state}"


def module_status(
    name: str, local: Sequence[LocalModule], models_dir: Path, family: Family | None = None
) -> str:
    """One line saying what a module choice is for and whether it is on disk, e.g.
    "oms_b_openclip_xl - SDXL - 308 MB + 681 MB text encoder - not downloaded"; for "Auto"
    also which module it uses for a checkpoint of ``family`` (None: none chosen)."""
    if name == AUTO_MODULE:
        return _auto_status(local, models_dir, family)
    on_disk = {m.name: m for m in local}
    known = KNOWN_BY_NAME.get(name)
    if known is None:
        own = own_module(on_disk[name].path) if name in on_disk else None
        if own is not None:
            return f"{name} - {_own_words(own)} - on disk"
        kind = "folder" if name in on_disk and on_disk[name].path.is_dir() else "file"
        return f"{name} - local module ({kind}) - on disk"
    state = _release_state(known, local, models_dir)
    return f"{name} - {_purpose(known)} - {_size(known)} - {state}"


def fit_warning(choice: str, family: Family, path: Path | None = None) -> str | None:
    """Why ``choice`` will not run with a checkpoint of ``family``, or None when it fits
    (or cannot be told: a local module of unknown kind). ``path``: where a local module of
    that name is (a module of the user's own says which family it was trained for)."""
    if choice == AUTO_MODULE:
        if family in AUTO_BY_FAMILY:
            return None
        return f"no OMS module exists for {FAMILY_NAMES.get(family, family)} checkpoints"
    own = own_module(path) if path is not None and choice not in KNOWN_BY_NAME else None
    if own is not None and family in AUTO_BY_FAMILY and family not in own.families:
        purpose = "/".join(FAMILY_NAMES[f] for f in own.families)
        return (
            f"{choice} is your own module for {purpose} checkpoints, the chosen checkpoint is "
            f"{FAMILY_NAMES[family]}: choose {AUTO_MODULE} or a matching module"
        )
    known = KNOWN_BY_NAME.get(choice)
    if known is None or family not in AUTO_BY_FAMILY or family in known.families:
        return None
    return (
        f"{choice} is made for {_purpose(known)} checkpoints, the chosen checkpoint is "
        f"{FAMILY_NAMES[family]}: choose {AUTO_MODULE} or a matching module"
    )


def module_notes(choice: str, folders: Sequence[Path], family: Family | None) -> str:
    """The text under the module list (Markdown): a warning when ``choice`` does not fit the
    ``family`` of the checkpoint chosen in the WebUI (None: none known), then one line per choice
    (:func:`module_status`)."""
    local = scan_modules(folders)
    lines = [
        f"- {module_status(name, local, folders[0], family)}" for name in module_choices(local)
    ]
    paths = {m.name: m.path for m in local}
    warning = fit_warning(choice, family, paths.get(choice)) if family is not None else None
    head = f"**OMS will be skipped: {warning}.**\n\n" if warning else ""
    return head + "\n".join(lines)
