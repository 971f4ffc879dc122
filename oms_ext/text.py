"""Text path of One More Step: prompts -> the context the OMS module cross-attends to.

The OMS module psi is conditioned on a prompt embedding C_psi (paper Eq. 21). The released
modules were trained with a fixed text encoder:

- base modules (oms_b_openclip_*): Stable Diffusion 2.1's OpenCLIP ViT-H text encoder in
  transformers ``CLIPTextModel`` form (23 layers, 1024 features). The embedding is its
  ``last_hidden_state`` (after the final LayerNorm) for ids padded and truncated to 77 tokens,
  with the causal mask only (no padding mask). The tokenizer is SD 2.1's, which pads with
  ``"!"`` (id 0); ``"!"`` inside a prompt is id 0 as well.
- the mixclip SDXL module: SDXL's two encoders, ``hidden_states[-2]`` (no final LayerNorm) of
  each, concatenated along features (768 + 1280 = 2048).

Every encoder here is a :class:`PromptEncoder`: ``encoder(prompts)`` returns a float tensor of
shape [B, 77, hidden_size] on ``encoder.device`` in ``encoder.dtype``.

Where the weights come from (:func:`load_prompt_encoder`): the module folder's pointer files
``oms_text_encoder/config.json`` and ``oms_tokenizer/config.json`` name a folder
(``_name_or_path`` plus ``subfolder``). ``"."`` or another relative path is resolved against
the module folder (the folder holding ``model_index.json``). A Hugging Face repo id (for
example ``stabilityai/stable-diffusion-2-1``) is looked up, in this order, in
``<module folder>/<subfolder>/``, in ``<models_dir>/<owner>--<name>/<subfolder>/``, in the
Hugging Face cache, and finally downloaded when ``allow_download`` is true. Only safetensors
weights are ever read.
"""

from __future__ import annotations

import abc
import gzip
import importlib.util
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from oms_ext.errors import OMSUserError
from oms_ext.precision import convert_state, load_state_assigned
from oms_ext.prompt_syntax import WeightedPrompt, as_weighted

CONTEXT_LENGTH = 77
SD21_REPO = "stabilityai/stable-diffusion-2-1"
#: SD 2.1's text encoder is OpenCLIP ViT-H cut to 23 of its 24 blocks ("penultimate" layer);
#: the base OMS modules read its last hidden state, so a borrowed 24-block tower runs 23.
SD2_OMS_LAYERS = 23
#: Pointer field (in ``oms_text_encoder/config.json``) of a module trained on a checkpoint's
#: own text encoder (``python -m oms_ext.train --encoder checkpoint``): a host hands it the
#: loaded checkpoint's encoder; the pointer still names the family's base repo, so
#: :func:`load_prompt_encoder` finds the same weights without a host.
ENCODER_SOURCE_KEY = "oms_encoder_source"
ENCODER_SOURCE_CHECKPOINT = "checkpoint"
TEXT_ENCODER_WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
# Older transformers releases read the special tokens from here; newer ones no longer write it.
TOKENIZER_OPTIONAL_FILES = ("special_tokens_map.json",)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: Tokens of one prompt the encoder reads: 77 positions minus start and end of text.
PROMPT_TOKENS = CONTEXT_LENGTH - 2

Prompt = str | WeightedPrompt


class TextEncoderNotFound(OMSUserError, FileNotFoundError):
    """The text encoder or tokenizer files an OMS module needs are not available locally; the
    message says which files to get and where to put them."""


class TextEncoderError(OMSUserError, ValueError):
    """Text-encoder files (or the module's pointer to them) are there but unusable."""


REASON_ENCODER_CORRUPT = "its text encoder files are truncated or corrupt; download them again"
REASON_POINTER_BROKEN = (
    "its text-encoder pointer (oms_text_encoder/config.json) is malformed; "
    "download the module again"
)


@dataclass(frozen=True)
class TokenBatch:
    """Token ids [B, 77] (long), per-token emphasis multipliers [B, 77] (float32; 1 at the
    start/end tokens and the padding) and each prompt's token count before it was cut to
    :data:`PROMPT_TOKENS`."""

    ids: torch.Tensor
    multipliers: torch.Tensor
    counts: list[int]


class PromptTokenizer:
    """Stable Diffusion's tokenization of (weighted) prompts with a transformers CLIP tokenizer.

    Each fragment of a :class:`~oms_ext.prompt_syntax.WeightedPrompt` is tokenized on its own
    and its tokens carry its multiplier, as in the WebUIs; the first :data:`PROMPT_TOKENS`
    tokens are kept between start- and end-of-text, the rest of the 77 positions is padding
    (SD 2.1's tokenizer pads with ``"!"``, id 0). A plain prompt gives exactly the ids of
    ``tokenizer(prompt, padding="max_length", max_length=77, truncation=True)``.
    """

    def __init__(self, tokenizer: Any) -> None:
        from transformers import PreTrainedTokenizerBase

        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {tokenizer!r}")
        self.tokenizer = tokenizer
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad = self.eos if pad is None else int(pad)

    def __call__(self, prompts: Sequence[Prompt]) -> TokenBatch:
        weighted = [as_weighted(p) for p in prompts]
        texts = [text for prompt in weighted for text, _ in prompt.fragments]
        pieces = iter(self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
        ids, multipliers, counts = [], [], []
        for prompt in weighted:
            tokens: list[int] = []
            weights: list[float] = []
            for _, weight in prompt.fragments:
                piece = next(pieces)
                tokens += piece
                weights += [weight] * len(piece)
            counts.append(len(tokens))
            tokens, weights = tokens[:PROMPT_TOKENS], weights[:PROMPT_TOKENS]
            padding = CONTEXT_LENGTH - 2 - len(tokens)
            ids.append([self.bos, *tokens, self.eos] + [self.pad] * padding)
            multipliers.append([1.0, *weights, 1.0] + [1.0] * padding)
        return TokenBatch(
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(multipliers, dtype=torch.float32),
            counts,
        )


def apply_emphasis(
    states: torch.Tensor, multipliers: torch.Tensor, restore_mean: Sequence[bool]
) -> torch.Tensor:
    """Emphasis as the WebUIs' default ("Original") applies it to the text states.

    ``states`` [B, 77, D] are scaled per token by ``multipliers`` [B, 77]; then each prompt's
    states are rescaled to their mean before scaling (where ``restore_mean[b]``; "No norm"
    skips it, and so does a scaled mean of zero, which the rescale would turn into NaN).
    Prompts without weights come back unchanged. Computed in float32, returned in the dtype
    and on the device of ``states``.
    """
    out = states
    for row, (mult, restore) in enumerate(zip(multipliers, restore_mean, strict=True)):
        if bool((mult == 1.0).all()):
            continue
        if out is states:
            out = states.clone()
        z = states[row].float()
        scaled = z * mult.to(z.device)[:, None]
        new_mean = scaled.mean()
        if restore and bool(new_mean != 0) and bool(torch.isfinite(new_mean)):
            scaled = scaled * (z.mean() / new_mean)
        out[row] = scaled.to(states.dtype)
    return out


class PromptEncoder(abc.ABC):
    """Turns prompts (plain or :class:`~oms_ext.prompt_syntax.WeightedPrompt`) into the OMS
    module's context.

    Calling it returns a tensor [B, 77, hidden_size] on ``device`` in ``dtype``; it never
    tracks gradients.
    """

    hidden_size: int
    device: torch.device
    dtype: torch.dtype

    @abc.abstractmethod
    def __call__(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Encode ``prompts`` to [len(prompts), 77, hidden_size]."""

    @abc.abstractmethod
    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        """Tokens of each prompt before the cut to :data:`PROMPT_TOKENS`."""

    def owned_modules(self) -> list[torch.nn.Module]:
        """The modules whose weights this encoder owns (and moves); none for a borrowed one."""
        return []

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PromptEncoder:
        """Set where outputs land; encoders that own weights also move them (override)."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self


class TokenEncoder(PromptEncoder):
    """A single text model fed through a :class:`PromptTokenizer`; subclasses run the model
    (:meth:`encode_ids`). ``compute_device``: where token ids are sent, for a model whose
    weights a WebUI moves there on call (low-VRAM hooks); None = where its weights are."""

    tokenizer: PromptTokenizer
    compute_device: Callable[[], torch.device] | None = None

    @abc.abstractmethod
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, 77] -> hidden states [B, 77, hidden_size] on ``device``/``dtype``."""

    def _ids_device(self, weights: torch.Tensor) -> torch.device:
        return self.compute_device() if self.compute_device is not None else weights.device

    def __call__(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        weighted = [as_weighted(p) for p in prompts]
        batch = self.tokenizer(weighted)
        states = self.encode_ids(batch.ids)
        return apply_emphasis(states, batch.multipliers, [p.restore_mean for p in weighted])

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        return self.tokenizer(prompts).counts


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _text_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The part of a transformers CLIP text model holding ``final_layer_norm`` (4.x and 5.x)."""
    return getattr(model, "text_model", model)


class ClipPromptEncoder(TokenEncoder):
    """A transformers ``CLIPTextModel`` (or ``...WithProjection``) run to ``num_layers`` layers.

    Output = hidden state after ``num_layers`` encoder layers, then the final LayerNorm when
    ``final_norm`` is true. With ``num_layers`` equal to the model's depth and ``final_norm``
    that is ``last_hidden_state``; ``num_layers = depth - 1`` without ``final_norm`` is
    ``hidden_states[-2]`` (SDXL's convention). ``owns_model=False`` marks a borrowed model:
    :meth:`to` then only changes where results land and never moves the weights.
    ``tokenizer``: a transformers CLIP tokenizer.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        num_layers: int | None = None,
        final_norm: bool = True,
        owns_model: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compute_device: Callable[[], torch.device] | None = None,
    ) -> None:
        depth = int(model.config.num_hidden_layers)
        layers = depth if num_layers is None else int(num_layers)
        if not 1 <= layers <= depth:
            raise ValueError(f"num_layers must be in 1..{depth} for this text model, got {layers}")
        self.model = model
        self.tokenizer = PromptTokenizer(tokenizer)
        self.num_layers = layers
        self.final_norm = final_norm
        self.owns_model = owns_model
        self.compute_device = compute_device
        self.hidden_size = int(model.config.hidden_size)
        self.device = torch.device(device) if device is not None else _module_device(model)
        self.dtype = dtype if dtype is not None else next(model.parameters()).dtype

    @classmethod
    def at_layer(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        penultimate: bool,
        owns_model: bool,
        compute_device: Callable[[], torch.device] | None = None,
    ) -> ClipPromptEncoder:
        """The model read as the checkpoints' conventions read it: ``last_hidden_state``
        (SD1.x, SD 2.1's 23-layer tower), or with ``penultimate`` ``hidden_states[-2]``
        without the final LayerNorm (SDXL's pair, the mixclip release)."""
        depth = int(model.config.num_hidden_layers)
        return cls(
            model,
            tokenizer,
            num_layers=depth - 1 if penultimate else depth,
            final_norm=not penultimate,
            owns_model=owns_model,
            compute_device=compute_device,
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ClipPromptEncoder:
        super().to(device=device, dtype=dtype)
        if self.owns_model:
            self.model.to(device=self.device, dtype=self.dtype)
        return self

    def owned_modules(self) -> list[torch.nn.Module]:
        return [self.model] if self.owns_model else []

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, 77] -> hidden states [B, 77, hidden_size] (see the class docstring)."""
        ids = ids.to(self._ids_device(next(self.model.parameters())))
        depth = int(self.model.config.num_hidden_layers)
        if self.final_norm and self.num_layers == depth:
            hidden = self.model(input_ids=ids).last_hidden_state
        else:
            out = self.model(input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[self.num_layers]
            if self.final_norm:
                hidden = _text_transformer(self.model).final_layer_norm(hidden)
        return hidden.to(device=self.device, dtype=self.dtype)


class ConcatPromptEncoder(PromptEncoder):
    """Several encoders run on the same prompts, outputs concatenated along features."""

    def __init__(self, encoders: Sequence[PromptEncoder]) -> None:
        if not encoders:
            raise ValueError("ConcatPromptEncoder needs at least one encoder")
        self.encoders = list(encoders)
        self.hidden_size = sum(e.hidden_size for e in self.encoders)
        self.device = self.encoders[0].device
        self.dtype = self.encoders[0].dtype
        self.to(self.device, self.dtype)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ConcatPromptEncoder:
        for encoder in self.encoders:
            encoder.to(device=device, dtype=dtype)
        self.device = self.encoders[0].device
        self.dtype = self.encoders[0].dtype
        return self

    def __call__(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        return torch.cat([encoder(prompts) for encoder in self.encoders], dim=-1)

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        return self.encoders[0].count_tokens(prompts)

    def owned_modules(self) -> list[torch.nn.Module]:
        return [m for encoder in self.encoders for m in encoder.owned_modules()]


def wrap_transformers_clip(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    num_layers: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    compute_device: Callable[[], torch.device] | None = None,
) -> ClipPromptEncoder:
    """Borrow a loaded transformers CLIP text model (for example the WebUI's SD2.x encoder).

    The output is the hidden state after ``num_layers`` layers followed by the final LayerNorm
    (default: all layers, i.e. ``last_hidden_state``). For a 24-layer SD2.x encoder pass
    ``num_layers=23`` to get what OMS was trained on. Weights are neither copied nor moved;
    results land on ``device``/``dtype`` (default: the model's); token ids go to
    ``compute_device()`` (default: where the weights are).
    """
    return ClipPromptEncoder(
        model,
        tokenizer,
        num_layers=num_layers,
        final_norm=True,
        owns_model=False,
        device=device,
        dtype=dtype,
        compute_device=compute_device,
    )


# --- tokenizer built from open_clip's bundled BPE vocabulary ---------------------------------


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in vocabulary order (GPT-2 / CLIP)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


REASON_NO_OPENCLIP = (
    "SD 2.1's tokenizer is built from open_clip's vocabulary; install open_clip_torch"
)


def _openclip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderNotFound(
            "open_clip is not installed, so its bundled vocabulary "
            "bpe_simple_vocab_16e6.txt.gz is unavailable; install open_clip_torch or provide the "
            f"tokenizer files ({', '.join(TOKENIZER_FILES)}) of {SD21_REPO}/tokenizer",
            reason=REASON_NO_OPENCLIP,
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise TextEncoderNotFound(
            f"open_clip is installed but {path.name} is missing from it", reason=REASON_NO_OPENCLIP
        )
    return path


def write_openclip_tokenizer_files(bpe_path: Path, out_dir: Path) -> Path:
    """Write SD 2.1-style CLIP tokenizer files generated from open_clip's BPE merges file.

    ``vocab.json`` lists the 256 byte symbols, the same with ``</w>``, one entry per merge
    (48,894) and the two markers: 49,408 ids. ``tokenizer_config.json`` sets pad ``"!"``
    (id 0) and ``model_max_length`` 77 like Stable Diffusion 2.1. Returns ``out_dir``.
    """
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CONTEXT_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), "utf-8")
    return out_dir


def tokenizer_from_openclip_vocab(cache_dir: Path | None = None) -> Any:
    """A transformers ``CLIPTokenizer`` equal to Stable Diffusion 2.1's, built offline.

    Generated from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` (open_clip must be
    installed; it is not imported). Pads with ``"!"`` (id 0), ``model_max_length`` 77. The
    files are written to ``cache_dir`` (reused when already there) or to a temporary folder
    removed after loading.
    """
    from transformers import CLIPTokenizer

    if cache_dir is not None:
        if not all((cache_dir / name).is_file() for name in TOKENIZER_FILES):
            write_openclip_tokenizer_files(_openclip_bpe_path(), cache_dir)
        return CLIPTokenizer.from_pretrained(str(cache_dir))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_openclip_tokenizer_files(_openclip_bpe_path(), Path(tmp))
        return CLIPTokenizer.from_pretrained(str(folder))


# --- finding and loading the files a module folder points to ---------------------------------


@dataclass(frozen=True)
class Pointer:
    """Where a component lives: ``name_or_path`` (hub repo id or path) plus ``subfolder``."""

    class_name: str
    name_or_path: str
    subfolder: str


def reads_checkpoint_encoder(root: Path) -> bool:
    """Whether the module folder ``root`` reads the loaded checkpoint's own text encoder
    (:data:`ENCODER_SOURCE_KEY`); False for the releases and for anything unreadable."""
    try:
        data = json.loads((root / "oms_text_encoder" / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get(ENCODER_SOURCE_KEY) == ENCODER_SOURCE_CHECKPOINT


def read_pointer(root: Path, component: str) -> Pointer:
    """Read ``<root>/<component>/config.json`` (keys ``_class_name``, ``_name_or_path``,
    ``subfolder``)."""
    path = root / component / "config.json"
    if not path.is_file():
        raise TextEncoderNotFound(
            f"{path} is missing; an OMS module folder needs it (the released module has "
            f"{component}/config.json naming its text encoder): download it into {root}",
            reason=f"the module folder lacks {component}/config.json; download the module again",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TextEncoderError(
            f"{path} is not valid JSON: {err}", reason=REASON_POINTER_BROKEN
        ) from err
    name = data.get("_name_or_path") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise TextEncoderError(
            f"{path}: '_name_or_path' must name a folder or a Hugging Face repo",
            reason=REASON_POINTER_BROKEN,
        )
    return Pointer(str(data.get("_class_name", "")), name, str(data.get("subfolder", "") or ""))


def _is_complete(folder: Path, required: Sequence[str], any_of: Sequence[str]) -> bool:
    has_required = all((folder / name).is_file() for name in required)
    return has_required and (not any_of or any((folder / n).is_file() for n in any_of))


def models_dir_folder(models_dir: Path, repo_id: str, subfolder: str) -> Path:
    """The documented local layout: ``<models_dir>/<owner>--<name>/<subfolder>``."""
    folder = models_dir / repo_id.replace("/", "--")
    return folder / subfolder if subfolder else folder


def _hub_file(repo_id: str, subfolder: str, filename: str, **kwargs: Any) -> Path | None:
    import huggingface_hub

    try:
        path = huggingface_hub.hf_hub_download(
            repo_id, filename, subfolder=subfolder or None, **kwargs
        )
    except OSError:
        return None
    return Path(path)


def _hub_folder(
    repo_id: str,
    subfolder: str,
    lookup: Lookup,
    any_of: Sequence[str],
    *,
    local_only: bool,
    cache_dir: Path | None,
    progress: bool,
) -> Path | None:
    """Fetch ``lookup.required``, the first available of ``any_of`` and whichever of
    ``lookup.optional`` exist from the hub (cache only when ``local_only``); return the folder
    holding them, or None when a needed file is unavailable."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    kwargs: dict[str, Any] = {"local_files_only": local_only, "cache_dir": cache_dir}
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        paths = [_hub_file(repo_id, subfolder, name, **kwargs) for name in lookup.required]
        if any_of:
            paths.append(
                next(
                    (p for n in any_of if (p := _hub_file(repo_id, subfolder, n, **kwargs))),
                    None,
                )
            )
        if any(path is None for path in paths):
            return None
        for name in lookup.optional:
            _hub_file(repo_id, subfolder, name, **kwargs)
        return paths[0].parent
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()


@dataclass(frozen=True)
class Lookup:
    """What to look for: the files a component folder needs and how to describe them."""

    what: str
    required: tuple[str, ...]
    any_of: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


def resolve_component_folder(
    root: Path | None,
    pointer: Pointer,
    lookup: Lookup,
    *,
    models_dir: Path | None,
    allow_download: bool,
    hf_cache_dir: Path | None,
    progress: bool,
    download_any_of: str | None = None,
) -> Path:
    """Find the local folder holding a pointed-to component (see the module docstring for the
    search order). ``root``: the module folder, None for a module without one (then only repo
    ids and absolute paths resolve). ``download_any_of`` picks which of ``lookup.any_of`` to
    download."""
    name, sub = pointer.name_or_path, pointer.subfolder
    if Path(name).is_absolute():
        local: Path | None = Path(name)
    else:
        local = root / name if root is not None else None
    if local is not None and (name == "." or not _REPO_ID.match(name) or local.exists()):
        folder = local / sub if sub else local
        if _is_complete(folder, lookup.required, lookup.any_of):
            return folder
        raise TextEncoderNotFound(
            f"{lookup.what}: {folder} must hold {_describe(lookup)} (named by the pointer "
            f"'_name_or_path': {name!r}, 'subfolder': {sub!r}, resolved against {root})",
            reason=f"its {lookup.what} files are missing; the console says which files go where",
        )
    if "--" in name or ".." in name or name.endswith(("-", ".")):
        # The hub client refuses such ids with its own ValueError (validate_repo_id).
        raise TextEncoderError(
            f"{lookup.what}: the pointer's '_name_or_path' {name!r} is neither a folder beside "
            f"the module nor a valid Hugging Face repo id ('--', '..' and a trailing '-' or "
            f"'.' are not allowed); fix it in the module's pointer config.json",
            reason=REASON_POINTER_BROKEN,
        )
    candidates = [root / sub] if sub and root is not None else []
    if models_dir is not None:
        candidates.append(models_dir_folder(models_dir, name, sub))
    for folder in candidates:
        if _is_complete(folder, lookup.required, lookup.any_of):
            return folder
    hub = {"cache_dir": hf_cache_dir, "progress": progress}
    found = _hub_folder(name, sub, lookup, lookup.any_of, local_only=True, **hub)
    if found is not None:
        return found
    if allow_download:
        pick = (download_any_of,) if download_any_of else lookup.any_of[:1]
        found = _hub_folder(name, sub, lookup, pick, local_only=False, **hub)
        if found is not None:
            return found
    raise TextEncoderNotFound(
        _not_found_message(lookup, name, sub, candidates, allow_download),
        reason=(
            f"its {lookup.what} ({name}) is not on this computer; the console says which files "
            "to download and where to put them"
        ),
    )


def _describe(lookup: Lookup) -> str:
    text = " + ".join(lookup.required)
    text += f" + one of {' / '.join(lookup.any_of)}" if lookup.any_of else ""
    return text + (f" (+ {', '.join(lookup.optional)})" if lookup.optional else "")


def _not_found_message(
    lookup: Lookup, repo_id: str, sub: str, tried: Sequence[Path], allow_download: bool
) -> str:
    where = f"https://huggingface.co/{repo_id}" + (f"/tree/main/{sub}" if sub else "")
    places = "\n".join(f"  {p}" for p in tried) or "  (no local folder configured)"
    # The smallest complete set (the last of any_of is the fp16 weights) for the command line.
    files = [f"{sub}/{f}" if sub else f for f in (*lookup.required, *lookup.any_of[-1:])]
    reason = (
        "downloading failed (offline, HF_HUB_OFFLINE set, or the repo is unreachable)"
        if allow_download
        else "downloading is not allowed"
    )
    return (
        f"{lookup.what} not found and {reason}.\n"
        f"Download {_describe(lookup)} from {where} (repo {repo_id!r}, subfolder {sub!r}; "
        "never the .bin files) and put them into one of:\n"
        f"{places}\n"
        f"or into the Hugging Face cache: huggingface-cli download {repo_id} {' '.join(files)}"
    )


def load_clip_text_model(
    folder: Path, *, with_projection: bool = False, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Load a transformers CLIP text model from ``folder`` (config.json + safetensors weights).

    Reads ``model.safetensors`` or else ``model.fp16.safetensors``; weights saved with or
    without the ``text_model.`` key prefix load into either transformers 4.x or 5.x. The model
    is built without initialising weights (meta device), then takes the file's tensors
    converted once to ``dtype``: loading costs one pass over the weights.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    weights = next((folder / n for n in TEXT_ENCODER_WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise TextEncoderNotFound(
            f"{folder} has none of {', '.join(TEXT_ENCODER_WEIGHT_FILES)}",
            reason="its text encoder weights are missing; the console says where they go",
        )
    try:
        config = CLIPTextConfig.from_pretrained(str(folder))
        state_dict = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as e:  # json errors are ValueErrors
        raise TextEncoderError(
            f"{folder}: cannot read the text encoder ({type(e).__name__}: {e}); download "
            f"config.json and {weights.name} again",
            reason=REASON_ENCODER_CORRUPT,
        ) from e
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        model = model_cls(config)
    load_text_state_dict(model, state_dict, source=str(weights), dtype=dtype)
    return model.eval().requires_grad_(False)


def load_text_state_dict(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str,
    dtype: torch.dtype | None = None,
) -> None:
    """Load transformers CLIP text weights whatever their ``text_model.`` prefix convention;
    raise :class:`TextEncoderError` naming ``source`` when a weight is missing.

    A model built on the meta device takes copies of the given tensors (floating-point ones
    converted to ``dtype`` when given) instead of being filled, and its ``position_ids``
    buffer, which files do not carry, is rebuilt.
    """
    wanted = model.state_dict().keys()
    prefixed = any(key.startswith("text_model.") for key in wanted)
    on_meta = any(p.is_meta for p in model.parameters())
    fixed = {}
    for key, value in state_dict.items():
        bare = key.removeprefix("text_model.")
        is_text = bare.startswith(("embeddings.", "encoder.", "final_layer_norm."))
        fixed["text_model." + bare if prefixed and is_text else bare] = value
    if on_meta:
        # Copies, so no parameter keeps the file mapped (Windows could not replace it).
        fixed = convert_state({k: v for k, v in fixed.items() if k in wanted}, dtype)
    if on_meta:
        missing, _ = load_state_assigned(model, fixed, strict=False)
    else:
        missing, _ = model.load_state_dict(fixed, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing:
        raise TextEncoderError(
            f"{source} lacks {len(missing)} weights, e.g. {missing[:3]}",
            reason="its text encoder file lacks weights (not the encoder the module needs?)",
        )
    if on_meta:
        _rebuild_meta_buffers(model, source)
    if dtype is not None:
        model.to(dtype=dtype)


def _rebuild_meta_buffers(model: torch.nn.Module, source: str) -> None:
    """Give the non-persistent buffers of a meta-built CLIP model real values on the CPU."""
    for module_name, module in model.named_modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is None or not buffer.is_meta:
                continue
            if name != "position_ids":
                raise ValueError(f"{source}: {module_name}.{name} has no value after loading")
            positions = torch.arange(buffer.shape[-1], dtype=buffer.dtype)
            module._buffers[name] = positions.expand(buffer.shape)


def _load_clip_encoder(
    root: Path | None,
    encoder: Pointer,
    tokenizer: Pointer,
    *,
    with_projection: bool,
    penultimate: bool,
    fallback_tokenizer: bool,
    options: dict[str, Any],
    dtype: torch.dtype,
) -> ClipPromptEncoder:
    from transformers import CLIPTokenizer

    weights_pick = TEXT_ENCODER_WEIGHT_FILES[0 if dtype == torch.float32 else 1]
    enc_lookup = Lookup("text encoder", ("config.json",), TEXT_ENCODER_WEIGHT_FILES)
    enc_folder = resolve_component_folder(
        root, encoder, enc_lookup, download_any_of=weights_pick, **options
    )
    try:
        tok_folder = resolve_component_folder(
            root,
            tokenizer,
            Lookup("tokenizer", TOKENIZER_FILES, optional=TOKENIZER_OPTIONAL_FILES),
            **options,
        )
        tok = CLIPTokenizer.from_pretrained(str(tok_folder))
    except TextEncoderNotFound:
        if not (fallback_tokenizer and importlib.util.find_spec("open_clip")):
            raise
        tok = tokenizer_from_openclip_vocab()
    model = load_clip_text_model(enc_folder, with_projection=with_projection, dtype=dtype)
    return ClipPromptEncoder.at_layer(model, tok, penultimate=penultimate, owns_model=True)


def _is_dual(root: Path, encoder: Pointer) -> bool:
    """SDXL two-encoder modules: the pointer's or model_index's class name contains "SDXL"."""
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise TextEncoderNotFound(
            f"{index_path} is missing; is {root} an OMS module folder?",
            reason="the module folder lacks model_index.json; download the module again",
        )
    broken = "its model_index.json is malformed; download the module again"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TextEncoderError(f"{index_path}: {e}", reason=broken) from e
    entry = index.get("oms_text_encoder") if isinstance(index, dict) else None
    if entry is None:
        raise TextEncoderError(f"{index_path} has no 'oms_text_encoder' entry", reason=broken)
    listed = entry[-1] if isinstance(entry, list) and entry else ""
    return "SDXL" in encoder.class_name or "SDXL" in str(listed)


def load_prompt_encoder(
    root: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    models_dir: Path | None = None,
    allow_download: bool = False,
    progress: bool = True,
    hf_cache_dir: Path | None = None,
) -> PromptEncoder:
    """Load the text encoder an OMS module folder ``root`` was trained with.

    Single-CLIP modules give a 23-layer ViT-H ``last_hidden_state`` encoder ([B, 77, 1024]
    for the released ones). A pointer (or model_index entry) whose class name contains
    ``SDXL`` marks the mixclip layout of the authors' loader: ``_name_or_path`` then names an
    SDXL base folder/repo holding ``text_encoder``, ``text_encoder_2``, ``tokenizer`` and
    ``tokenizer_2`` (``subfolder`` ignored), and the result is the 768 + 1280 = 2048-feature
    concatenation of both ``hidden_states[-2]``. When the single-CLIP tokenizer files are
    nowhere to be found, SD 2.1's tokenizer is rebuilt from open_clip's vocabulary.
    Raises :class:`TextEncoderNotFound` saying what to download and where to put it.
    """
    root = Path(root)
    encoder = read_pointer(root, "oms_text_encoder")
    dual = _is_dual(root, encoder)
    tokenizer = None if dual else read_pointer(root, "oms_tokenizer")
    return _load_pointed_encoder(
        root,
        encoder,
        tokenizer,
        device=device,
        dtype=dtype,
        models_dir=models_dir,
        allow_download=allow_download,
        hf_cache_dir=hf_cache_dir,
        progress=progress,
    )


def load_release_text_encoder(
    repo_id: str,
    *,
    dual: bool,
    models_dir: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    hf_cache_dir: Path | None = None,
) -> PromptEncoder:
    """The text encoder a released module's pointers name, for a module that has no pointer
    files of its own (a single ``.safetensors`` file, or a release folder without them).

    ``repo_id``: the encoder's repo (SD 2.1's, or SDXL base's for ``dual`` = the mixclip
    layout). Looked up, without downloading, in ``<models_dir>/<owner>--<name>/`` and then in
    the Hugging Face cache; raises :class:`TextEncoderNotFound` naming the files and folders.
    """
    sub = "" if dual else "text_encoder"
    encoder = Pointer("CLIPTextModel", repo_id, sub)
    tokenizer = None if dual else Pointer("CLIPTokenizer", repo_id, "tokenizer")
    return _load_pointed_encoder(
        None,
        encoder,
        tokenizer,
        device=device,
        dtype=dtype,
        models_dir=models_dir,
        allow_download=False,
        hf_cache_dir=hf_cache_dir,
        progress=False,
    )


def release_text_encoder_available(
    repo_id: str,
    *,
    dual: bool,
    models_dir: Path,
    module_root: Path | None = None,
    hf_cache_dir: Path | None = None,
) -> bool:
    """Whether the weights of a release's text encoder (see :func:`load_release_text_encoder`)
    are on this computer: in ``<module_root>/<subfolder>``, ``<models_dir>/<owner>--<name>/``
    or the Hugging Face cache. Nothing is downloaded or loaded."""
    subs = ("text_encoder", "text_encoder_2") if dual else ("text_encoder",)
    lookup = Lookup("text encoder", ("config.json",), TEXT_ENCODER_WEIGHT_FILES)
    for sub in subs:
        try:
            resolve_component_folder(
                module_root,
                Pointer("CLIPTextModel", repo_id, sub),
                lookup,
                models_dir=models_dir,
                allow_download=False,
                hf_cache_dir=hf_cache_dir,
                progress=True,
            )
        except TextEncoderNotFound:
            return False
    return True


def _load_pointed_encoder(
    root: Path | None,
    encoder: Pointer,
    tokenizer: Pointer | None,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    **options: Any,
) -> PromptEncoder:
    """Single CLIP (``tokenizer`` given) or the SDXL pair (``tokenizer`` None, ``encoder``
    naming the SDXL base folder or repo); ``options`` are those of
    :func:`resolve_component_folder`."""
    if tokenizer is None:
        parts = []
        for suffix, with_projection in (("", False), ("_2", True)):
            enc = Pointer(encoder.class_name, encoder.name_or_path, f"text_encoder{suffix}")
            tok = Pointer("CLIPTokenizer", encoder.name_or_path, f"tokenizer{suffix}")
            parts.append(
                _load_clip_encoder(
                    root,
                    enc,
                    tok,
                    with_projection=with_projection,
                    penultimate=True,
                    fallback_tokenizer=False,
                    options=options,
                    dtype=dtype,
                )
            )
        return ConcatPromptEncoder(parts).to(device=device, dtype=dtype)
    single = _load_clip_encoder(
        root,
        encoder,
        tokenizer,
        with_projection=False,
        penultimate=False,
        fallback_tokenizer=True,
        options=options,
        dtype=dtype,
    )
    return single.to(device=device, dtype=dtype)
