"""AUTOMATIC1111 (v1.6 to v1.10) adapter: WebUI objects in, plain values out, result applied.

Nothing here imports the WebUI; ``p`` (StableDiffusionProcessingTxt2Img), ``opts``
(``shared.opts``), ``cmd_opts`` and ``sd_model`` are passed in and read by attribute.

Hooking, one mechanism per version so OMS runs exactly once per batch:

* v1.10+: ``process_before_every_sampling(p, x=..., noise=...)`` runs right before the
  first-pass sampler with ``x`` the batch's unit noise; the result is written into ``x`` in
  place (:func:`apply_in_place`).
* v1.6 to v1.9: no such hook. ``p.rng`` (an ``ImageRNG``) is created per batch before
  ``process_batch``; its FIRST ``next()`` call (inside ``p.sample``, after ``p.sampler`` is
  created) returns the txt2img noise, later calls feed ancestral/SDE per-step noise.
  :func:`hook_first_noise` wraps ``next`` on that one instance for one call only.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from oms_ext.loading import OMSLoadError, read_header
from oms_ext.prompt_syntax import EMPHASIS_MODES, PromptSyntax, TextRules
from oms_ext.runtime.runner import BatchInputs, ImageSeeds
from oms_ext.text import PromptEncoder
from oms_ext.webui.samplers import sampler_start

HIRES_NOTE = "hires-fix pass left alone (OMS acts on the first pass only)"


@contextlib.contextmanager
def own_precision(devices: Any) -> Iterator[None]:
    """Run the OMS step in the precision OMS chose, although A1111 samples inside
    ``devices.autocast()`` (``modules/processing.py`` ``process_images_inner``):
    ``torch.autocast("cuda")`` there is turned off, and ``devices.manual_cast(dtype)`` (GTX
    16xx, XPU, MPS without ``--upcast-sampling``), which swaps the forward of each layer
    class in ``devices.patch_module_list`` for one casting to ``dtype`` and keeps the
    original as the class's ``org_forward``, is undone for the step and put back after.
    Without it the fp32 retry after an fp16 NaN ran in fp16 again."""
    classes = getattr(devices, "patch_module_list", ()) or ()
    casts = {cls: cls.forward for cls in classes if "org_forward" in vars(cls)}
    try:
        for cls in casts:
            cls.forward = cls.org_forward
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        for cls, forward in casts.items():
            cls.forward = forward


def model_family(sd_model: Any) -> str:
    """ "sdxl", "sd3", "sd2", "sd1" or "unknown", from the ``is_*`` flags A1111 sets."""
    for flag, family in (
        ("is_sdxl", "sdxl"),
        ("is_sd3", "sd3"),
        ("is_sd2", "sd2"),
        ("is_sd1", "sd1"),
    ):
        if getattr(sd_model, flag, False):
            return family
    return "unknown"


#: Key prefixes of a single-file checkpoint (LDM layout) that tell its family.
_CHECKPOINT_KEY_FAMILIES = (
    ("conditioner.embedders.", "sdxl"),
    ("cond_stage_model.model.", "sd2"),
    ("cond_stage_model.transformer.", "sd1"),
)


def checkpoint_family_from_keys(keys: Iterable[str]) -> str | None:
    """The family of a single-file checkpoint from its tensor names: SDXL's ``conditioner``,
    SD2's OpenCLIP and SD1's CLIP text encoder keys, SD3's ``joint_blocks``, Flux's
    ``double_blocks``; None when they do not tell (a UNet-only file, another layout)."""
    keys = list(keys)
    for prefix, family in _CHECKPOINT_KEY_FAMILIES:
        if any(k.startswith(prefix) for k in keys):
            return family
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys):
        return "sd3"
    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys):
        return "flow"
    return None


def checkpoint_file_family(path: Path) -> str | None:
    """:func:`checkpoint_family_from_keys` of a ``.safetensors`` checkpoint (header only);
    None for other files and unreadable ones."""
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        shapes, _ = read_header(path)
    except (OMSLoadError, OSError):
        return None
    return checkpoint_family_from_keys(shapes)


def judged_family(loaded_family: str | None, sd_model: Any, selected: Path | None) -> str | None:
    """The family of the checkpoint the next generation uses: ``loaded_family`` (of
    ``sd_model``; None when no model is loaded) while ``selected`` (the checkpoint file the
    user picked; None when unknown) is the loaded file, else the family read from the
    selected file's tensor names; None when nothing tells."""
    loaded_file = getattr(getattr(sd_model, "sd_checkpoint_info", None), "filename", None)
    if loaded_family is not None and (selected is None or str(selected) == str(loaded_file)):
        return loaded_family
    return checkpoint_file_family(selected) if selected is not None else None


def notes_family(sd_model: Any, selected: Path | None) -> str | None:
    """The checkpoint family the module notes judge a choice by. A1111 loads a checkpoint
    as soon as it is picked in the list (``modules.ui_settings`` ``run_settings_single``), so
    the notes, redrawn on that pick, read the picked file while the load is under way."""
    loaded_family = model_family(sd_model) if sd_model is not None else None
    return judged_family(loaded_family, sd_model, selected)


def pass_note(p: Any) -> str | None:
    """Why this processing pass is not OMS's (the hires-fix pass), or None. img2img never
    gets here: the script is shown in txt2img only."""
    return HIRES_NOTE if getattr(p, "is_hr_pass", False) else None


class WebUIPromptSyntax:
    """The WebUI's own prompt handling as a :class:`~oms_ext.prompt_syntax.PromptSyntax`:
    ``prompt_parser`` and ``extra_networks`` are its ``modules.prompt_parser`` and
    ``modules.extra_networks`` (the same in A1111 1.6-1.10.1 and every Forge), ``opts`` its
    ``shared.opts`` (read at each call: "use old prompt editing timelines")."""

    def __init__(self, prompt_parser: Any, extra_networks: Any, opts: Any) -> None:
        self.prompt_parser = prompt_parser
        self.extra_networks = extra_networks
        self.opts = opts

    def strip_extra_networks(self, prompt: str) -> str:
        return self.extra_networks.parse_prompt(prompt)[0]

    def composable_parts(self, prompt: str) -> list[tuple[str, float]]:
        indexes, flat, _ = self.prompt_parser.get_multicond_prompt_list([prompt])
        return [(flat[i], float(weight)) for i, weight in indexes[0]]

    def first_step_text(self, prompt: str, steps: int) -> str:
        old = bool(getattr(self.opts, "use_old_scheduling", False))
        schedule = self.prompt_parser.get_learned_conditioning_prompt_schedules(
            [prompt], steps, None, old
        )[0]
        return schedule[0][1]  # [[end_at_step, text], ...]: the first entry is step one's

    def attention(self, text: str) -> list[tuple[str, float]]:
        runs = self.prompt_parser.parse_prompt_attention(text)
        return [(run, float(weight)) for run, weight in runs]


def text_rules(p: Any, opts: Any, syntax: PromptSyntax) -> TextRules:
    """How this WebUI reads the batch's prompts: the first pass's step count as prompt
    editing counts it (``p.firstpass_steps``, which doubles the steps of second-order
    samplers) and the emphasis mode (``opts.emphasis``; A1111 1.6 has ``enable_emphasis``)."""
    steps = int(getattr(p, "firstpass_steps", 0) or p.steps)
    emphasis = getattr(opts, "emphasis", None)
    if emphasis is None:
        emphasis = "Original" if getattr(opts, "enable_emphasis", True) else "None"
    return TextRules(syntax, steps, emphasis if emphasis in EMPHASIS_MODES else "Original")


def batch_inputs(
    p: Any, x: torch.Tensor, opts: Any, sd_model: Any, syntax: PromptSyntax
) -> BatchInputs:
    """Plain values for the batch about to be sampled; ``x`` is the unit noise."""
    family = model_family(sd_model)
    return collect_batch_inputs(p, x, opts, syntax, family=family, is_flow=family == "sd3")


def collect_batch_inputs(
    p: Any, x: torch.Tensor, opts: Any, syntax: PromptSyntax, *, family: str, is_flow: bool
) -> BatchInputs:
    """The host-independent part of both adapters: the pass note, the sampler's start (only
    for a first pass of a 4-channel, non-flow model), one prompt and seed per image and the
    rules the prompts are read by."""
    note = pass_note(p)
    start = None
    if note is None and not is_flow and x.shape[1] == 4:
        start = sampler_start(
            p,
            p.sampler,
            sgm_noise_multiplier=bool(getattr(opts, "sgm_noise_multiplier", False)),
        )
    count = x.shape[0]
    return BatchInputs(
        noise=x,
        start=start,
        prompts=list(p.prompts)[:count],
        text_rules=text_rules(p, opts, syntax),
        seeds=image_seeds(p, count),
        family=family,
        is_flow=is_flow,
        pass_skip=note,
    )


def image_seeds(p: Any, count: int) -> ImageSeeds:
    """The batch's seeds as ``modules.processing`` hands them to its ``ImageRNG`` (A1111 1.6+,
    Forge): ``p.seeds``, ``p.subseeds``, ``p.subseed_strength`` and "resize seed from"
    (``p.seed_resize_from_h``/``_w``, <= 0 when off)."""
    resize = (
        int(getattr(p, "seed_resize_from_h", 0) or 0),
        int(getattr(p, "seed_resize_from_w", 0) or 0),
    )
    return ImageSeeds(
        seeds=list(p.seeds)[:count],
        subseeds=list(getattr(p, "subseeds", None) or [])[:count],
        subseed_strength=float(getattr(p, "subseed_strength", 0.0) or 0.0),
        resize_from=resize if min(resize) > 0 else (0, 0),
    )


def apply_in_place(x: torch.Tensor, noise: torch.Tensor) -> None:
    """A1111 1.10: hand the new noise to the sampler by overwriting ``x`` in place."""
    x.copy_(noise.to(device=x.device, dtype=x.dtype))


def has_before_every_sampling(script_runner: Any) -> bool:
    """Whether the WebUI calls ``process_before_every_sampling`` (A1111 >= 1.10)."""
    return callable(getattr(script_runner, "process_before_every_sampling", None))


def hook_first_noise(rng: Any, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make the next ``rng.next()`` return ``transform(noise)``; every later call is the
    untouched original (per-step noise). The wrapper removes itself on its first call;
    :func:`unhook_first_noise` removes it if it was never called."""
    original = rng.next

    def first_next() -> torch.Tensor:
        unhook_first_noise(rng)
        return transform(original())

    first_next.oms_hook = True  # type: ignore[attr-defined]
    rng.next = first_next


def unhook_first_noise(rng: Any) -> None:
    """Remove a pending :func:`hook_first_noise` wrapper from ``rng`` (no-op if none)."""
    if getattr(vars(rng).get("next"), "oms_hook", False):
        del rng.next


def model_dtype(devices: Any, cmd_opts: Any) -> torch.dtype:
    """The precision A1111 runs its models in: ``devices.dtype`` (float16 unless ``--no-half``),
    and float32 with ``--precision full`` too (``modules/devices.py``, ``shared_init.py``)."""
    if getattr(cmd_opts, "no_half", False) or getattr(cmd_opts, "precision", "") == "full":
        return torch.float32
    return getattr(devices, "dtype", None) or torch.float16


def run_after(owner: Any, name: str, hook: Callable[[], None]) -> Callable[[], None]:
    """Make ``owner.<name>(...)`` call ``hook()`` after it; returns the undo. Used for
    ``modules.sd_models.unload_model_weights`` ("Unload SD checkpoint to RAM", also
    ``/sdapi/v1/unload-checkpoint``), which A1111 announces through no callback."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        hook()
        return result

    setattr(owner, name, wrapped)

    def undo() -> None:
        if getattr(owner, name) is wrapped:
            setattr(owner, name, original)

    return undo


def low_vram(cmd_opts: Any, family: str) -> bool:
    """--lowvram, --medvram, or --medvram-sdxl with an SDXL checkpoint."""
    return bool(
        getattr(cmd_opts, "lowvram", False)
        or getattr(cmd_opts, "medvram", False)
        or (family == "sdxl" and getattr(cmd_opts, "medvram_sdxl", False))
    )


def sd2_text_tower(sd_model: Any) -> Any | None:
    """The SD2.x checkpoint's OpenCLIP text tower (``FrozenOpenCLIPEmbedder.model``, under
    A1111's ``...WithCustomWords`` wrapper), to reuse as the OMS text encoder; None if the
    checkpoint is not SD2.x or the tower is not in open_clip layout."""
    if model_family(sd_model) != "sd2":
        return None
    cond = getattr(sd_model, "cond_stage_model", None)
    tower = getattr(getattr(cond, "wrapped", cond), "model", None)
    resblocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if resblocks is None or not hasattr(tower, "token_embedding"):
        return None
    return tower


def _clip_embedder(embedder: Any) -> tuple[Any, Any] | None:
    """(transformers CLIP text model, tokenizer) of A1111's ``FrozenCLIPEmbedder`` (under its
    ``...WithCustomWords`` wrapper, ``.wrapped``); None when it looks different."""
    inner = getattr(embedder, "wrapped", embedder)
    transformer = getattr(inner, "transformer", None)
    tokenizer = getattr(inner, "tokenizer", None)
    if getattr(transformer, "config", None) is None or tokenizer is None:
        return None
    return transformer, tokenizer


def checkpoint_text_encoder(
    sd_model: Any, family: str, device: torch.device | str
) -> PromptEncoder | None:
    """The loaded checkpoint's own text encoder as a module trained on it reads it
    (``python -m oms_ext.train --encoder checkpoint``), borrowed, never moved: SD1.x: CLIP-L's
    last hidden state (``cond_stage_model``); SD2.x: ViT-H as the releases read it; SDXL:
    ``hidden_states[-2]`` of CLIP-L (``conditioner.embedders[0]``) and of OpenCLIP bigG
    (``embedders[1].model``, open_clip layout), concatenated. Token ids go to ``device`` (A1111's
    ``devices.device``: under --medvram its hooks move the encoder there when called). None when
    the model is of another family or looks different."""
    from oms_ext.openclip_convert import wrap_openclip_tower
    from oms_ext.text import ClipPromptEncoder, ConcatPromptEncoder

    def on_device() -> torch.device:
        return torch.device(device)

    if model_family(sd_model) != family:
        return None
    if family == "sd2":
        tower = sd2_text_tower(sd_model)
        return None if tower is None else wrap_openclip_tower(tower, compute_device=on_device)
    if family == "sd1":
        clip = _clip_embedder(getattr(sd_model, "cond_stage_model", None))
        if clip is None:
            return None
        return ClipPromptEncoder.at_layer(
            *clip, penultimate=False, owns_model=False, compute_device=on_device
        )
    if family != "sdxl":
        return None
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", None) or []
    if len(embedders) < 2:
        return None
    clip_l = _clip_embedder(embedders[0])
    big_g = getattr(getattr(embedders[1], "wrapped", embedders[1]), "model", None)
    blocks = getattr(getattr(big_g, "transformer", None), "resblocks", None)
    if clip_l is None or blocks is None:
        return None
    first = ClipPromptEncoder.at_layer(
        *clip_l, penultimate=True, owns_model=False, compute_device=on_device
    )
    second = wrap_openclip_tower(
        big_g, num_layers=len(blocks) - 1, final_norm=False, compute_device=on_device
    )
    return ConcatPromptEncoder([first, second])
