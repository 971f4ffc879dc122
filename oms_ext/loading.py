"""Loading an OMS module (safetensors only) and running it: :func:`load_oms`, :class:`OMSModel`.

Two layouts load:

* a folder in the released Hugging Face layout (e.g. ``h1t/oms_b_openclip_15_21``):
  ``model_index.json``, ``oms_module/config.json``,
  ``oms_module/diffusion_pytorch_model.safetensors`` or its ``.fp16.safetensors`` variant,
  and the pointer folders ``oms_text_encoder/`` and ``oms_tokenizer/`` naming the text encoder;
* a single ``.safetensors`` file holding the module's state dict. Its architecture comes from a
  config JSON beside it (same name, ``.json`` suffix) or else from the tensor shapes; what
  shapes cannot show (the head count, ...) comes from the file's metadata entry
  :data:`METADATA_CONFIG_KEY` (a JSON object of config fields) or from the shipped OMS-B config
  when the shapes are OMS-B's.

Weights are read without building randomly initialised tensors first (module created on the
meta device, storage allocated empty, then filled from the file), so loading costs about one
read of the file. Every problem raises :class:`OMSLoadError` naming the file.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from oms_ext.errors import OMSUserError
from oms_ext.precision import convert_state, load_state_assigned
from oms_ext.prompt_syntax import WeightedPrompt, as_weighted
from oms_ext.step import cfg_combine
from oms_ext.unet import OMSUNet, UNetConfig, config_from_state_dict_shapes

MODULE_FOLDER = "oms_module"
#: Weight file names looked for in ``oms_module/``, in order of preference.
WEIGHT_FILE_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
)
#: safetensors metadata entry that may hold a JSON object of module config fields.
METADATA_CONFIG_KEY = "oms_module_config"
#: Weights-file metadata of a module trained by ``python -m oms_ext.train``: JSON with the
#: facts of the run ("family" of the checkpoint whose latents it learnt, "encoder", steps,
#: images; never a local path).
TRAINING_METADATA_KEY = "oms_training"
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
#: How many offending keys an error message lists.
KEYS_SHOWN = 5
#: Prompts whose text states an OMSModel keeps (about 160 kB each for OMS-B in fp16).
PROMPT_CACHE_SIZE = 64

Prompt = str | WeightedPrompt


class OMSLoadError(OMSUserError, ValueError):
    """An OMS module could not be loaded; the message names the file and the problem,
    ``reason`` says in a few words what to do (no path)."""


#: The short reasons of the module-file problems users meet.
REASON_CORRUPT = "the module file is truncated or corrupt; download it again"
REASON_NOT_A_MODULE = "the file is not an OMS module (see the console for what it holds)"
REASON_PICKLE = "only .safetensors modules are read, pickles (.ckpt/.pt/.bin) are refused"


class PromptEncoderLike(Protocol):
    """What OMS needs from a text encoder (``oms_ext.text.PromptEncoder`` or any look-alike).

    ``enc(prompts)`` returns the text states [B, 77, hidden_size] (last hidden state after the
    final LayerNorm, emphasis applied) on the encoder's own device and dtype;
    ``enc.count_tokens(prompts)`` the tokens of each prompt before the cut to 75;
    ``enc.owned_modules()`` the modules whose weights it owns (none when borrowed).
    """

    hidden_size: int

    def __call__(self, prompts: Sequence[Prompt]) -> torch.Tensor: ...

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]: ...

    def owned_modules(self) -> list[torch.nn.Module]: ...

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Any: ...


class OMSModel:
    """A loaded OMS module psi with its text encoder.

    ``unet(x, context)`` is the raw module (v prediction at SNR = 0, VP space);
    :meth:`predict_x0` runs the guided prediction ``x0_hat = -psi_cfg(x_S, C)`` (Eq. 21).
    ``text_device``: where an owned text encoder stays whatever :meth:`to` does (e.g. the CPU,
    to keep it out of VRAM: text states are small and cached); None = with the module.
    """

    def __init__(
        self,
        unet: OMSUNet,
        text_encoder: PromptEncoderLike,
        config: Mapping[str, Any],
        source: Path,
        *,
        owns_text_encoder: bool,
        text_device: torch.device | str | None = None,
    ) -> None:
        self.unet = unet
        self.text_encoder = text_encoder
        self.config = dict(config)
        self.source = source
        self.owns_text_encoder = owns_text_encoder
        self.text_device = torch.device(text_device) if text_device is not None else None
        #: Text states of recent prompts (the module's device/dtype), most recent last; only
        #: for an encoder this model owns, whose weights nothing else can change.
        self.prompt_cache: OrderedDict[WeightedPrompt, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def devices(self) -> set[torch.device]:
        """Every device holding a tensor of the module or of an encoder that moves with it
        (:meth:`to` moves both). More than one means a move stopped half-way (out of memory
        while moving a model back under ``--medvram``, say): :attr:`device` reads one layer
        only, so such a model must be moved again or dropped."""
        follows = self.owns_text_encoder and self.text_device is None
        owned = self.text_encoder.owned_modules() if follows else []
        tensors = [
            *self.unet.parameters(),
            *self.unet.buffers(),
            *(t for m in owned for t in (*m.parameters(), *m.buffers())),
        ]
        return {t.device for t in tensors}

    @property
    def cross_attention_dim(self) -> int:
        """Width D of the text states the module attends to."""
        return self.unet.cfg.cross_attention_dim

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> OMSModel:
        """Move the module, its cached text states and the text encoder it owns (unless the
        encoder has a ``text_device`` of its own); returns self."""
        self.unet.to(device=device, dtype=dtype)
        if self.owns_text_encoder and self.text_device is None:
            self.text_encoder.to(device=device, dtype=dtype)
        for text, states in self.prompt_cache.items():
            self.prompt_cache[text] = states.to(self.device, self.dtype)
        return self

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this model holds, by part: "module" (psi's weights and buffers),
        "text_encoder" (weights and buffers of an encoder it owns; a borrowed one belongs to
        the WebUI) and "text_states" (the cached states of recent prompts)."""
        owned = self.text_encoder.owned_modules() if self.owns_text_encoder else []
        return {
            "module": [*self.unet.parameters(), *self.unet.buffers()],
            "text_encoder": [t for m in owned for t in (*m.parameters(), *m.buffers())],
            "text_states": list(self.prompt_cache.values()),
        }

    @torch.no_grad()
    def encode(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Text states [B, 77, D] for ``prompts`` (plain strings or
        :class:`~oms_ext.prompt_syntax.WeightedPrompt`), on the module's device and dtype.

        Repeated prompts are encoded once. With an encoder this model owns, the states of the
        last :data:`PROMPT_CACHE_SIZE` prompts are kept (the default negative "" is then
        encoded once per model); a borrowed encoder (the checkpoint's own, which LoRAs may
        patch) is always run.
        """
        texts = [as_weighted(p) for p in _check_prompts(prompts, "prompts")]
        unique = list(dict.fromkeys(texts))
        if not self.owns_text_encoder:
            emb = self.text_encoder(unique).to(self.device, self.dtype)
            return emb[[unique.index(t) for t in texts]] if len(unique) != len(texts) else emb
        cache = self.prompt_cache
        missing = [t for t in unique if t not in cache]
        if missing:
            for text, states in zip(missing, self.text_encoder(missing), strict=True):
                cache[text] = states.to(self.device, self.dtype)
        out = torch.stack([cache[t] for t in texts])
        for text in unique:
            cache.move_to_end(text)
        while len(cache) > PROMPT_CACHE_SIZE:
            cache.popitem(last=False)
        return out

    def count_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        """Tokens of each prompt before the text encoder's cut to 75 (see
        :data:`oms_ext.text.PROMPT_TOKENS`)."""
        return self.text_encoder.count_tokens(_check_prompts(prompts, "prompts"))

    @torch.no_grad()
    def predict_x0(
        self,
        x_S: torch.Tensor,
        prompts: Sequence[Prompt] | Prompt,
        cfg_scale: float,
        negative_prompts: Sequence[Prompt] | Prompt | None = None,
    ) -> torch.Tensor:
        """Guided clean-latent prediction ``x0_hat = -(v_u + w (v_c - v_u))`` (paper Eq. 21).

        ``x_S`` [B, C, H, W] is unit Gaussian noise (VP space, SNR = 0), any dtype/device; the
        result has its dtype and device. ``prompts`` and ``negative_prompts`` hold one prompt
        (a string or a :class:`~oms_ext.prompt_syntax.WeightedPrompt`) per batch row, or one
        for all rows; negatives default to ``""``. ``cfg_scale``
        is the OMS guidance w; w = 1 runs the module once on the prompts only, otherwise once
        on ``x`` against ``cat[E(negatives), E(prompts)]`` (the batch ``cat[x, x]``, with the
        text-free layers computed once, see :meth:`OMSUNet.forward`).
        """
        if x_S.ndim != 4:
            raise ValueError(f"x_S must be a latent batch [B, C, H, W], got {tuple(x_S.shape)}")
        channels = self.unet.cfg.in_channels
        if x_S.shape[1] != channels:
            raise ValueError(
                f"x_S has {x_S.shape[1]} channels, this module takes {channels}-channel latents "
                f"(shape [B, {channels}, H, W])"
            )
        batch = x_S.shape[0]
        pos = _per_row(prompts, batch, "prompts")
        neg = _per_row(
            "" if negative_prompts is None else negative_prompts, batch, "negative_prompts"
        )
        w = float(cfg_scale)
        if not math.isfinite(w):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
        x = x_S.to(self.device, self.dtype)
        if w == 1.0:
            v = self.unet(x, self.encode(pos))
        else:
            # One pass for both halves; the module shares its text-free layers between them.
            v_uncond, v_cond = self.unet(x, self.encode(neg + pos)).chunk(2)
            v = cfg_combine(v_uncond, v_cond, w)
        return (-v).to(x_S.device, x_S.dtype)


def _check_prompts(prompts: Sequence[Prompt], name: str) -> list[Prompt]:
    if isinstance(prompts, str | WeightedPrompt) or not all(
        isinstance(p, str | WeightedPrompt) for p in prompts
    ):
        raise ValueError(f"{name} must be a list of strings or WeightedPrompts, got {prompts!r}")
    if not prompts:
        raise ValueError(f"{name} is empty")
    return list(prompts)


def _per_row(prompts: Sequence[Prompt] | Prompt, batch: int, name: str) -> list[Prompt]:
    """One prompt per batch row: a prompt or a 1-list is repeated, else the length must match."""
    single = isinstance(prompts, str | WeightedPrompt)
    texts = _check_prompts([prompts] if single else prompts, name)
    if len(texts) == 1:
        return texts * batch
    if len(texts) != batch:
        raise ValueError(
            f"{name}: got {len(texts)} strings for a batch of {batch}; give one per batch row "
            f"or a single one for all rows"
        )
    return texts


def load_oms(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    text_encoder: PromptEncoderLike | None = None,
    *,
    owns_text_encoder: bool = False,
    text_device: torch.device | str | None = None,
    text_dtype: torch.dtype | None = None,
    **text_kwargs: Any,
) -> OMSModel:
    """Load an OMS module folder (released layout) or single ``.safetensors`` file.

    The module runs on ``device`` in ``dtype`` (float32, float16 or bfloat16). For a folder
    without ``text_encoder``, the encoder its pointer files name is loaded through
    ``oms_ext.text.load_prompt_encoder(root, device=..., dtype=..., **text_kwargs)``; a single
    file needs ``text_encoder`` (any :class:`PromptEncoderLike`, e.g. the SD2 checkpoint's own).
    A given ``text_encoder`` is borrowed (never moved, its outputs never cached) unless
    ``owns_text_encoder`` says the model may treat it as its own. ``text_device``/
    ``text_dtype``: where an owned encoder runs, if not with the module (see
    :class:`OMSModel`).
    Raises :class:`OMSLoadError` for anything wrong with the files.
    """
    path = Path(path)
    torch_dtype = _check_dtype(dtype)
    if text_encoder is not None and text_kwargs:
        raise ValueError(
            f"load_oms: {sorted(text_kwargs)} only apply when load_oms loads the folder's own "
            f"text encoder, not with text_encoder= given"
        )
    unet, config = load_module(path, device=device, dtype=torch_dtype)
    owns = text_encoder is None or owns_text_encoder
    if text_encoder is None:
        if not path.is_dir():
            raise OMSLoadError(
                f"{path}: a single module file carries no text encoder; pass text_encoder= "
                f"(for the SD1.5/2.1 module: Stable Diffusion 2.1's OpenCLIP ViT-H encoder, "
                f"hidden size {unet.cfg.cross_attention_dim}) or load the released folder",
                reason="a single module file needs a text encoder",
            )
        from oms_ext.text import load_prompt_encoder

        text_encoder = load_prompt_encoder(
            path,
            device=text_device or device,
            dtype=text_dtype or torch_dtype,
            **text_kwargs,
        )
    if text_encoder.hidden_size != unet.cfg.cross_attention_dim:
        raise OMSLoadError(
            f"{path}: the module attends to {unet.cfg.cross_attention_dim}-d text states but "
            f"the text encoder gives {text_encoder.hidden_size}-d ones",
            reason=(
                f"the module needs {unet.cfg.cross_attention_dim}-wide text states, its text "
                f"encoder gives {text_encoder.hidden_size}; check the module's text encoder"
            ),
        )
    return OMSModel(
        unet,
        text_encoder,
        config,
        path,
        owns_text_encoder=owns,
        text_device=text_device if owns else None,
    )


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: use one of {sorted(DTYPES)}")
        return DTYPES[dtype.lower()]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype}: use torch.float32, torch.float16 or torch.bfloat16")
    return dtype


def load_module(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[OMSUNet, dict[str, Any]]:
    """The module network alone (no text encoder) and its config dict, from a folder or file."""
    path = Path(path)
    if not path.exists():
        raise OMSLoadError(
            f"{path}: no such file or folder", reason="the module is not in the models folder"
        )
    if path.is_dir():
        config_file, weights = find_module_files(path)
        config = _read_json(config_file)
        config_source = str(config_file)
    else:
        weights = _check_weight_file(path)
        config, config_source = _single_file_config(weights)
    unet = _build_and_fill(weights, config, config_source, device, dtype)
    return unet, config


def find_module_files(root: Path) -> tuple[Path, Path]:
    """``(config.json, weights)`` of the module in a released-layout folder."""
    module_dir = root / MODULE_FOLDER
    config_file = module_dir / "config.json"
    if not module_dir.is_dir() or not config_file.is_file():
        hint = (
            "; it looks like the oms_module subfolder itself: pass its parent folder"
            if (root / "config.json").is_file() and root.name == MODULE_FOLDER
            else ""
        )
        raise OMSLoadError(
            f"{root}: no {MODULE_FOLDER}/config.json; expected the released OMS folder layout "
            f"(model_index.json, {MODULE_FOLDER}/config.json, {MODULE_FOLDER}/"
            f"{WEIGHT_FILE_NAMES[0]} or its .fp16 variant){hint}",
            reason=f"the module folder lacks {MODULE_FOLDER}/config.json; download it again",
        )
    for name in WEIGHT_FILE_NAMES:
        if (module_dir / name).is_file():
            return config_file, module_dir / name
    pickles = sorted(p.name for p in module_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise OMSLoadError(
            f"{module_dir}: only pickle weights ({', '.join(pickles)}); OMS loads .safetensors "
            f"only. Download {WEIGHT_FILE_NAMES[1]} from the release or convert the file",
            reason=REASON_PICKLE,
        )
    raise OMSLoadError(
        f"{module_dir}: no weights; expected {' or '.join(WEIGHT_FILE_NAMES)}",
        reason="the module folder has no weights file; download it again",
    )


def _check_weight_file(path: Path) -> Path:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise OMSLoadError(
            f"{path}: pickle checkpoints ({path.suffix}) are refused, they can run code when "
            f"loaded; download the module's .safetensors file or convert this one to safetensors",
            reason=REASON_PICKLE,
        )
    if path.suffix.lower() != ".safetensors":
        raise OMSLoadError(
            f"{path}: not a .safetensors file (or an OMS module folder)",
            reason="modules are .safetensors files or folders",
        )
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OMSLoadError(
            f"{path}: cannot read the config ({e})", reason=f"its {path.name} is unreadable"
        ) from e
    if not isinstance(data, dict):
        raise OMSLoadError(
            f"{path}: the config must be a JSON object", reason=f"its {path.name} is malformed"
        )
    return data


def read_header(weights: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a safetensors file, without reading the tensors."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise OMSLoadError(
            f"{weights}: not a readable safetensors file ({e}); it is truncated or corrupt, "
            f"download it again",
            reason=REASON_CORRUPT,
        ) from e
    return shapes, metadata


def cross_attention_width(weights: Path) -> int | None:
    """The width of the text states a module's weights attend to (the input width of its
    cross-attention keys), from the file's header; None when it has no cross-attention."""
    shapes, _ = read_header(weights)
    for key, shape in shapes.items():
        if key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None


def _single_file_config(weights: Path) -> tuple[dict[str, Any], str]:
    """Config of a single-file module: the JSON beside it, else inferred from the shapes."""
    beside = weights.with_suffix(".json")
    if beside.is_file():
        return _read_json(beside), str(beside)
    shapes, metadata = read_header(weights)
    extra: dict[str, Any] = {}
    if METADATA_CONFIG_KEY in metadata:
        try:
            extra = json.loads(metadata[METADATA_CONFIG_KEY])
        except json.JSONDecodeError as e:
            raise OMSLoadError(
                f"{weights}: metadata {METADATA_CONFIG_KEY} is not JSON", reason=REASON_CORRUPT
            ) from e
        if not isinstance(extra, dict):
            raise OMSLoadError(
                f"{weights}: metadata {METADATA_CONFIG_KEY} is not a JSON object",
                reason=REASON_CORRUPT,
            )
    try:
        config = config_from_state_dict_shapes(shapes, extra)
    except ValueError as e:
        raise OMSLoadError(
            f"{weights}: cannot infer the module architecture: {e}", reason=REASON_NOT_A_MODULE
        ) from e
    return config, f"{weights} (architecture inferred from tensor shapes)"


def _build_and_fill(
    weights: Path,
    config: Mapping[str, Any],
    config_source: str,
    device: torch.device | str,
    dtype: torch.dtype,
) -> OMSUNet:
    """Build the module without initialising it, check the file's keys/shapes, fill it."""
    try:
        cfg = UNetConfig.from_dict(config)
    except ValueError as e:
        raise OMSLoadError(
            f"{config_source}: {e}", reason="the module config is not one OMS can build"
        ) from e
    with torch.device("meta"):
        unet = OMSUNet(cfg)
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    found, _ = read_header(weights)
    _check_keys(weights, config_source, expected, found)
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise OMSLoadError(
            f"{weights}: cannot read the tensors ({e}); download it again", reason=REASON_CORRUPT
        ) from e
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu or any(t.dtype != dtype for t in state.values()):
        # On the CPU the file is memory-mapped: copy, so no parameter keeps it mapped.
        state = convert_state(state, dtype)
    load_state_assigned(unet, state, strict=True)
    return unet.requires_grad_(False).eval()


def _check_keys(
    weights: Path,
    config_source: str,
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
) -> None:
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if wrong:
        shown = ", ".join(
            f"{k} is {list(found[k])} in the file, {list(expected[k])} by the config"
            for k in wrong[:KEYS_SHOWN]
        )
        more = f" (+{len(wrong) - KEYS_SHOWN} more)" if len(wrong) > KEYS_SHOWN else ""
        problems.append(f"{len(wrong)} shape mismatch(es): {shown}{more}")
    if problems:
        raise OMSLoadError(
            f"{weights} does not match the module config {config_source}: " + "; ".join(problems),
            reason=REASON_NOT_A_MODULE,
        )


def _few(keys: Sequence[str]) -> str:
    more = f" (+{len(keys) - KEYS_SHOWN} more)" if len(keys) > KEYS_SHOWN else ""
    return ", ".join(keys[:KEYS_SHOWN]) + more


def training_facts(path: Path) -> dict[str, Any]:
    """The training facts (:data:`TRAINING_METADATA_KEY`) of a module folder or weights file;
    {} for the releases and for anything unreadable."""
    try:
        weights = find_module_files(path)[1] if path.is_dir() else path
        _, metadata = read_header(weights)
        facts = json.loads(metadata.get(TRAINING_METADATA_KEY, "{}"))
    except (OMSLoadError, OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}
