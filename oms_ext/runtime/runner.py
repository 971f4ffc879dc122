"""Host-free orchestration of one OMS step for one batch.

Each host's adapter (the WebUIs' :mod:`oms_ext.webui.a1111` and :mod:`oms_ext.webui.forge`)
turns its objects into a :class:`BatchInputs`; :func:`run_oms` turns that, the user's
:class:`OMSArgs` and a model loader into an :class:`Outcome`: the noise to hand back to the
host (or None to leave its noise alone), infotext entries and a console message. Failures that
must not cost the user the image (load errors, missing downloads, out of memory, NaN/inf
output, unsupported models) become an Outcome with a skip reason; the host then samples from
its own noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from oms_ext.errors import OMSUserError
from oms_ext.loading import OMSModel
from oms_ext.prompt_syntax import TextRules, WeightedPrompt
from oms_ext.runtime.args import ALPHA_BAR_KEY, NOTE_KEY, SKIPPED_KEY, OMSArgs
from oms_ext.spaces import (
    SamplerStart,
    UnsupportedModelError,
    check_model_supported,
    needs_oms,
    noise_for_sampler,
    start_alpha_bar,
)
from oms_ext.step import oms_start
from oms_ext.text import PROMPT_TOKENS

#: Offset mixed into the image seed for the fresh noise z, so z never equals the seed's x_S.
FRESH_NOISE_SALT = 0x4F4D53  # "OMS"
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class ImageSeeds:
    """The WebUI's seeds for one batch, as it feeds them to its noise generator.

    ``seeds``/``subseeds``: one per image (the WebUI's ``p.seeds``/``p.subseeds``; with a
    variation strength all images share the seed and the subseeds differ).
    ``subseed_strength``: "Variation strength" in [0, 1]. ``resize_from``: "Resize seed from"
    (height, width) in pixels, (0, 0) when off.
    """

    seeds: Sequence[int]
    subseeds: Sequence[int] = ()
    subseed_strength: float = 0.0
    resize_from: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class BatchInputs:
    """Plain values describing one WebUI batch at the start of sampling.

    ``noise``: the WebUI's unit Gaussian noise x_S [B, C, H, W] (seeded, variation seeds
    already mixed in). ``start``: where the sampler starts. ``prompts``: one per image, as the
    WebUI holds them (the images' negative prompts are not used: OMS's unconditional text is
    the OMS negative prompt, "" by default as in the authors' code). ``text_rules``: how the
    WebUI reads them. ``seeds``: the batch's seeds (for the fresh noise z). ``family``:
    checkpoint family ("sd1", "sd2", "sdxl", ...). ``is_flow``: flow-matching model.
    ``pass_skip``: why this pass is not OMS's to touch, or None.
    """

    noise: torch.Tensor
    start: SamplerStart | None
    prompts: Sequence[str]
    text_rules: TextRules
    seeds: ImageSeeds
    family: str
    is_flow: bool = False
    pass_skip: str | None = None


@dataclass(frozen=True)
class Outcome:
    """Result of :func:`run_oms`. ``noise`` None means: keep the WebUI's noise. ``x0_hat``:
    the module's prediction [B, C, h, w] (float32, CPU) when it ran, for the preview."""

    noise: torch.Tensor | None
    infotext: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    x0_hat: torch.Tensor | None = None

    @property
    def applied(self) -> bool:
        return self.noise is not None


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError, or a RuntimeError saying "out of memory" (MPS, older torch)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom_type) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


def skipped(args: OMSArgs, reason: str, detail: str = "") -> Outcome:
    """An Outcome that leaves the noise alone and says why: ``reason`` (one short line, no
    local paths) in the infotext and the console, ``detail`` (file names, folders, what to
    download) in the console only."""
    info = args.infotext()
    info[SKIPPED_KEY] = reason
    message = f"[OMS] One More Step skipped: {reason}"
    return Outcome(None, info, f"{message}\n{detail}" if detail and detail != reason else message)


def fresh_noise_seed(seed: int) -> int:
    """Seed of the fresh noise z for an image seed (splitmix64 of seed + salt, 63 bits)."""
    z = (int(seed) + FRESH_NOISE_SALT + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _randn(seed: int, shape: Sequence[int]) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(fresh_noise_seed(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def variation_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mix one image's noise ``a`` [C, H, W] with its variation noise ``b`` the way the WebUIs
    mix seed and variation seed (A1111 1.10.1 / Forge ``modules.rng.slerp``): spherical
    interpolation by ``t`` ("Variation strength") of each (channel, column) vector along H;
    nearly parallel inputs (mean cosine > 0.9995) take the WebUI's linear branch, which weights
    ``a`` by ``t``."""
    a_unit = a / torch.linalg.vector_norm(a, dim=1, keepdim=True)
    b_unit = b / torch.linalg.vector_norm(b, dim=1, keepdim=True)
    cos = (a_unit * b_unit).sum(1)
    if cos.mean() > 0.9995:
        return a * t + b * (1 - t)
    angle = torch.acos(cos)
    weight_a = (torch.sin((1.0 - t) * angle) / torch.sin(angle)).unsqueeze(1)
    weight_b = (torch.sin(t * angle) / torch.sin(angle)).unsqueeze(1)
    return weight_a * a + weight_b * b


def _paste_centred(noise: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """``noise`` [C, h, w] centred on ``canvas`` [C, H, W] (cropped where larger), as the
    WebUIs place the noise of "Resize seed from" in the new size."""
    dy, dx = (canvas.shape[1] - noise.shape[1]) // 2, (canvas.shape[2] - noise.shape[2]) // 2
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    out = canvas.clone()
    out[:, max(dy, 0) : max(dy, 0) + h, max(dx, 0) : max(dx, 0) + w] = noise[
        :, max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w
    ]
    return out


def fresh_noise(seeds: ImageSeeds, shape: Sequence[int]) -> torch.Tensor:
    """The fresh noise z [B, *shape] of the "Fresh noise" mode (s > 0 in Eq. 20).

    Drawn exactly as the WebUI draws its own noise from ``seeds`` (same variation-seed mixing,
    same "resize seed from" placement, same position in the batch), but every seed passes
    through :func:`fresh_noise_seed` first, so z is never the seed's own noise x_S. Drawn on
    the CPU in float32: reproducible from the infotext's seeds on any device.
    """
    shape = tuple(shape)
    h, w = seeds.resize_from
    seed_shape = (shape[0], h // 8, w // 8) if h > 0 and w > 0 else shape
    rows = []
    for i, seed in enumerate(seeds.seeds):
        noise = _randn(seed, seed_shape)
        if seeds.subseed_strength != 0:
            subseed = seeds.subseeds[i] if i < len(seeds.subseeds) else 0
            noise = variation_slerp(seeds.subseed_strength, noise, _randn(subseed, seed_shape))
        if seed_shape != shape:
            noise = _paste_centred(noise, _randn(seed, shape))
        rows.append(noise)
    return torch.stack(rows)


def oms_prompts(
    args: OMSArgs, image_prompts: Sequence[str], rules: TextRules
) -> list[WeightedPrompt]:
    """The OMS text per image: the typed OMS prompt, else the image's own prompt, each read
    as the WebUI reads it at the first sampling step (:mod:`oms_ext.prompt_syntax`)."""
    sources = [args.prompt] * len(image_prompts) if args.prompt.strip() else image_prompts
    read = {text: rules.read(text) for text in dict.fromkeys(sources)}
    return [read[text] for text in sources]


def _check_batch(inputs: BatchInputs) -> None:
    batch = inputs.noise.shape[0]
    for name, values in (("prompts", inputs.prompts), ("seeds", inputs.seeds.seeds)):
        if len(values) != batch:
            raise ValueError(f"BatchInputs.{name}: {len(values)} entries for a batch of {batch}")


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


@torch.no_grad()
def run_oms(
    inputs: BatchInputs, args: OMSArgs, load_model: Callable[[bool], OMSModel]
) -> Outcome:
    """One OMS step (paper Eq. 20/21) for a batch, or the reason it is skipped.

    ``load_model(fp32)`` gives the model to run; ``fp32`` true asks for a float32 one, which
    is used once when a half-precision model returned NaN/inf (fp16 is broken on some GPUs).

    The returned noise replaces the WebUI's unit noise: after the WebUI's own scaling
    (``* sigma0``, ``* sqrt(1 + sigma0^2)`` or none) the sampler starts from the OMS x_T in
    its own space (:func:`oms_ext.spaces.noise_for_sampler`). It has the dtype and device of
    ``inputs.noise``. With s = 0 ("Keep seed noise") x_T keeps the seed's noise x_S.
    """
    if not args.enabled:
        return Outcome(None)
    if inputs.pass_skip is not None:
        info = args.infotext()
        info[NOTE_KEY] = inputs.pass_skip
        return Outcome(None, info, f"[OMS] {inputs.pass_skip}")
    _check_batch(inputs)
    try:
        check_model_supported(inputs.noise.shape[1], inputs.is_flow, inputs.family)
    except UnsupportedModelError as e:
        return skipped(args, e.reason)
    if inputs.start is None:
        return skipped(args, "the sampler's start could not be determined")
    alpha_bar = start_alpha_bar(inputs.start)
    if not needs_oms(alpha_bar):
        return skipped(args, f"zero-terminal-SNR start (alpha_bar0 = {alpha_bar:.2e}) needs no OMS")
    try:
        texts = oms_prompts(args, inputs.prompts, inputs.text_rules)
        negative = inputs.text_rules.read(args.negative_prompt, composable=False)
    except Exception as e:  # the WebUI's own parser raises on some malformed weights
        return skipped(args, REASON_UNREADABLE_PROMPT, f"{type(e).__name__}: {e}")
    notes = []
    try:
        model = load_model(False)
        x0_hat, x_T = _oms_x_T(model, inputs, args, alpha_bar, texts, negative)
        if not _finite(x_T) and model.dtype != torch.float32:
            half = str(model.dtype).removeprefix("torch.")
            notes.append(f"{half} gave NaN/inf on this device, OMS runs in float32 from now on")
            del model  # the half-precision model leaves memory before the fp32 one loads
            model = load_model(True)
            x0_hat, x_T = _oms_x_T(model, inputs, args, alpha_bar, texts, negative)
        longest = max(model.count_tokens([*dict.fromkeys(texts), negative]))
    except OMSUserError as e:
        return skipped(args, e.reason, str(e))
    except (RuntimeError, MemoryError) as e:
        if isinstance(e, MemoryError) or is_out_of_memory(e):
            return skipped(args, "out of memory while running the OMS module")
        raise
    if not _finite(x_T):
        return skipped(args, "the OMS module produced NaN/inf values")
    noise = noise_for_sampler(x_T, inputs.start).to(inputs.noise.device, inputs.noise.dtype)
    info = args.infotext()
    info[ALPHA_BAR_KEY] = f"{alpha_bar:.6g}"
    if longest > PROMPT_TOKENS:
        cut = f"OMS read the first {PROMPT_TOKENS} tokens of its prompt ({longest} in all)"
        info[NOTE_KEY] = cut
        notes.append(cut)
    shown = ", ".join(f'"{text}"' for text in dict.fromkeys(str(t) for t in texts))
    message = (
        f"[OMS] One More Step applied: {_describe_start(inputs.start)}, alpha_bar0 = "
        f"{alpha_bar:.6g}, OMS prompt {shown}"
    )
    return Outcome(noise, info, "; ".join([message, *notes]), x0_hat.cpu())


#: Why OMS skips a prompt the WebUI's parser cannot read.
REASON_UNREADABLE_PROMPT = (
    "the OMS prompt could not be read (WebUI prompt syntax); check its brackets and weights"
)


def _oms_x_T(
    model: OMSModel,
    inputs: BatchInputs,
    args: OMSArgs,
    alpha_bar: float,
    texts: Sequence[WeightedPrompt],
    negative: WeightedPrompt,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, x_T): the guided prediction x0_hat = -psi_cfg(x_S, C) (Eq. 21) and x_T in VP
    space (Eq. 20), in float32 on the model's device."""
    x_S = inputs.noise.float()
    x0_hat = model.predict_x0(x_S.to(model.device), texts, args.cfg, negative).float()
    if args.fresh_noise:
        s = math.sqrt(1.0 - alpha_bar)
        z = fresh_noise(inputs.seeds, x_S.shape[1:]).to(x0_hat.device)
    else:
        s, z = 0.0, None
    return x0_hat, oms_start(x0_hat, x_S.to(x0_hat.device), alpha_bar, s=s, noise=z)


def _describe_start(start: SamplerStart) -> str:
    if start.space == "timestep":
        return f"timestep sampler from t = {start.t0}"
    multiplier = ", SGM noise multiplier" if start.sgm_noise_multiplier else ""
    return f"k-diffusion sampler from sigma = {start.sigma0:.4f}{multiplier}"
