"""Stand-ins for the WebUI objects the OMS glue touches, mirroring their attributes and the
order in which the WebUIs call things. Each class names the WebUI version it mirrors.

Only what the glue reads or calls is reproduced; sampling itself is replaced by recording
the latent the sampler starts from (after the WebUI's own noise scaling) and the per-step
noise draws an ancestral sampler makes from ``p.rng``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

from oms_ext.prompt_syntax import PlainSyntax
from oms_ext.schedules import karras_sigmas, sd_alphas_cumprod


def model_sigmas() -> torch.Tensor:
    """SD's discrete sigmas, ascending [1000] (k-diffusion ``model_wrap.sigmas``)."""
    ac = sd_alphas_cumprod().double()
    return ((1 - ac) / ac).sqrt()


def webui_slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111 1.10.1 / Forge ``modules.rng.slerp`` as ``ImageRNG.first`` calls it on one image's
    noise [C, H, W]: norms and dot products run over dim 1 (H), one angle per (channel,
    column); nearly parallel inputs take the WebUI's linear branch ``low * val + high * (1 -
    val)``."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (
        torch.sin(val * omega) / so
    ).unsqueeze(1) * high


class ImageRNG:
    """A1111 1.6-1.10.1 / Forge ``modules.rng.ImageRNG`` with the CPU noise source: one
    generator per seed; the first ``next()`` is the batch noise (``first()``), later calls draw
    per-step noise from the same generators. ``first()`` follows the WebUI's rules: with a
    variation strength each image's noise is ``slerp(strength, noise(seed), noise(subseed))``
    (a missing subseed counts as 0), and "resize seed from" draws the seed's noise at the old
    size and pastes it, centred, into the seed's noise at the new size."""

    def __init__(
        self,
        shape: tuple[int, ...],
        seeds: list[int],
        subseeds: list[int] | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from_h: int = 0,
        seed_resize_from_w: int = 0,
    ):
        self.shape = tuple(shape)
        self.seeds = seeds
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.resize_from = (int(seed_resize_from_h), int(seed_resize_from_w))
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        self.is_first = True
        self.draws = 0

    @staticmethod
    def _randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))

    def first(self) -> torch.Tensor:
        h, w = self.resize_from
        resized = h > 0 and w > 0
        noise_shape = (self.shape[0], h // 8, w // 8) if resized else self.shape
        out = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators, strict=True)):
            if resized:
                noise = self._randn(seed, noise_shape)
            else:
                noise = torch.randn(self.shape, generator=generator)
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                noise = webui_slerp(self.subseed_strength, noise, self._randn(subseed, noise_shape))
            if resized:
                x = torch.randn(self.shape, generator=generator)
                dx = (self.shape[2] - noise_shape[2]) // 2
                dy = (self.shape[1] - noise_shape[1]) // 2
                cw = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
                ch = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
                tx, ty = max(dx, 0), max(dy, 0)
                sx, sy = max(-dx, 0), max(-dy, 0)
                x[:, ty : ty + ch, tx : tx + cw] = noise[:, sy : sy + ch, sx : sx + cw]
                noise = x
            out.append(noise)
        return torch.stack(out)

    def next(self) -> torch.Tensor:
        self.draws += 1
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Stand-in k-diffusion function (name and parameters as k-diffusion's)."""


def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    """Stand-in for sd_samplers_timesteps_impl.ddim."""


def unipc(model, x, timesteps, extra_args=None, callback=None, disable=None, is_img2img=False):
    """Stand-in for sd_samplers_timesteps_impl.unipc."""


class KDiffusionSampler:
    """A1111 1.10.1 ``sd_samplers_kdiffusion.KDiffusionSampler`` (Forge f2 has the same
    ``get_sigmas``/``sample`` shape). ``sample`` scales the noise like the WebUI
    (``x * sigmas[0]`` or ``x * sqrt(1 + sigmas[0]^2)`` with the SGM multiplier), records the
    start latent, and for ancestral samplers draws ``steps`` per-step noises from ``p.rng``
    (A1111's TorchHijack)."""

    def __init__(self, func=sample_euler_ancestral, scheduler: str = "karras", opts=None):
        self.funcname = func.__name__
        self.func = func
        self.scheduler = scheduler
        self.opts = opts
        self.model_wrap = SimpleNamespace(sigmas=model_sigmas())
        self.start_latent: torch.Tensor | None = None
        self.step_noises: list[torch.Tensor] = []

    def get_sigmas(self, p, steps: int) -> torch.Tensor:
        sig = self.model_wrap.sigmas
        if self.scheduler == "karras":
            return karras_sigmas(steps, float(sig[0]), float(sig[-1])).float()
        # "Automatic" for Euler a: the model's own uniform spacing
        idx = torch.linspace(len(sig) - 1, 0, steps)
        return torch.cat([sig[idx.round().long()], torch.zeros(1, dtype=sig.dtype)]).float()

    def sample(self, p, x, conditioning=None, unconditional_conditioning=None, **_: Any):
        sigmas = self.get_sigmas(p, p.steps)
        if getattr(self.opts, "sgm_noise_multiplier", False):
            x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        else:
            x = x * sigmas[0]
        self.start_latent = x.clone()
        if "ancestral" in self.funcname:
            self.step_noises = [p.rng.next() for _ in range(p.steps)]
        return x


class CompVisSampler:
    """A1111 1.6.0-1.10.1 / Forge ``sd_samplers_timesteps.CompVisSampler`` (DDIM, PLMS, UniPC):
    ``get_timesteps`` = ``range(0, 1000, 1000 // steps) + 1`` clipped to 999; samples from the
    unit noise as is. The sampling functions read the schedule as
    ``model_wrap_cfg.inner_model.inner_model.alphas_cumprod``; A1111 1.10.1 and Forge also
    keep the timestep denoiser as ``model_wrap``, A1111 1.6.0 does not."""

    def __init__(self, func=ddim, version: str = "1.10"):
        self.funcname = func.__name__
        self.func = func
        denoiser = SimpleNamespace(inner_model=SimpleNamespace(alphas_cumprod=sd_alphas_cumprod()))
        self.model_wrap_cfg = SimpleNamespace(inner_model=denoiser)
        if version != "1.6":
            self.model_wrap = denoiser
        self.start_latent: torch.Tensor | None = None

    def get_timesteps(self, p, steps: int) -> torch.Tensor:
        return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)

    def sample(self, p, x, conditioning=None, unconditional_conditioning=None, **_: Any):
        self.start_latent = x.clone()
        return x


@dataclass
class SDModel:
    """A1111 1.10.1 ``sd_model`` flags (``is_sd1``, ``is_sd2``, ``is_sdxl``, ``is_sd3``) plus,
    for Forge f2, ``forge_objects.unet.model.predictor``."""

    is_sd1: bool = True
    is_sd2: bool = False
    is_sdxl: bool = False
    is_sd3: bool = False
    forge_objects: Any = None


class PredictionFlux:
    """Forge f2 ``backend.modules.k_prediction.PredictionFlux`` (prediction_type "const")."""

    prediction_type = "const"


class Prediction:
    """Forge f2 ``backend.modules.k_prediction.Prediction`` (eps or v_prediction)."""

    def __init__(self, prediction_type: str = "epsilon"):
        self.prediction_type = prediction_type
        self.sigmas = model_sigmas().float()


def forge_sd_model(pred: Any, **flags: bool) -> SDModel:
    unet = SimpleNamespace(model=SimpleNamespace(predictor=pred))
    return SDModel(forge_objects=SimpleNamespace(unet=unet), **flags)


class ScriptRunner:
    """``modules.scripts.ScriptRunner`` calling one script. ``version`` selects the callbacks
    the WebUI has: "1.6" (no process_before_every_sampling), "1.10" and "forge" (with it)."""

    def __init__(self, controller, version: str, script_args: list[Any]):
        self.controller = controller
        self.version = version
        self.script_args = script_args
        if version in ("1.10", "forge"):
            self.process_before_every_sampling = self._before_every_sampling

    def process(self, p):
        self.controller.process(p, self.script_args)

    def before_process_batch(self, p, **kwargs):
        pass

    def process_batch(self, p, **kwargs):
        self.controller.process_batch(p)

    def _before_every_sampling(self, p, x, noise, c=None, uc=None):
        self.controller.before_every_sampling(p, x)

    def postprocess_batch(self, p, images, **kwargs):
        self.controller.postprocess_batch(p)

    def postprocess(self, p, processed):
        self.controller.postprocess(p, processed)


@dataclass
class Txt2Img:
    """A1111 1.10.1 ``StableDiffusionProcessingTxt2Img`` (the attributes the glue reads),
    with ``sample()`` following the order of 1.6 (``version="1.6"``: create sampler, first
    ``rng.next()``, sample), 1.10.1 (then ``process_before_every_sampling(x=...)`` before
    sampling, x edited in place) or Forge f2.0.1 (hook, then ``p.modified_noise`` read once
    and reset). With ``enable_hr`` the hires pass sets ``is_hr_pass``, makes a new ImageRNG
    and calls the hook again (twice on Forge)."""

    prompt: str = "a photo of a cat"
    negative_prompt: str = ""
    seed: int = 1000
    subseed: int = 7000
    subseed_strength: float = 0.0
    seed_resize_from_h: int = 0
    seed_resize_from_w: int = 0
    steps: int = 4
    second_order_sampler: bool = False
    batch_size: int = 2
    n_iter: int = 1
    width: int = 64
    height: int = 64
    enable_hr: bool = False
    version: str = "1.10"
    sampler_factory: Any = None
    sd_model: SDModel = field(default_factory=SDModel)
    is_hr_pass: bool = False
    modified_noise: Any = None
    extra_generation_params: dict = field(default_factory=dict)
    samplers: list = field(default_factory=list)
    rngs: list = field(default_factory=list)
    infotexts: list = field(default_factory=list)
    comments: dict = field(default_factory=dict)
    scripts: Any = None
    devices: Any = None

    def comment(self, text: str) -> None:
        """``StableDiffusionProcessing.comment``: shown under the result (``Processed``)."""
        self.comments[text] = 1

    def sample(self) -> torch.Tensor:
        self.sampler = self.sampler_factory()
        self.samplers.append(self.sampler)
        x = self.rng.next()
        if self.version != "1.6":
            self.scripts.process_before_every_sampling(self, x=x, noise=x)
        if self.version == "forge" and self.modified_noise is not None:
            x = self.modified_noise
            self.modified_noise = None
        samples = self.sampler.sample(self, x)
        if self.enable_hr:
            self.is_hr_pass = True
            self.rng = ImageRNG(
                samples.shape[1:],
                self.seeds,
                subseeds=self.subseeds,
                subseed_strength=self.subseed_strength,
                seed_resize_from_h=self.seed_resize_from_h,
                seed_resize_from_w=self.seed_resize_from_w,
            )
            self.rngs.append(self.rng)
            noise = self.rng.next()
            calls = 2 if self.version == "forge" else (1 if self.version == "1.10" else 0)
            for _ in range(calls):
                self.scripts.process_before_every_sampling(self, x=samples, noise=noise)
            if self.version == "forge" and self.modified_noise is not None:
                noise, self.modified_noise = self.modified_noise, None
            self.hires_noise = noise
            self.is_hr_pass = False
        return samples


def process_images(p: Txt2Img) -> Processed:
    """``modules.processing.process_images_inner`` (A1111 1.6-1.10.1, Forge): seeds as the WebUI
    assigns them (``all_seeds[i] = seed + i`` unless a variation strength is set, then every
    image shares the seed and ``all_subseeds[i] = subseed + i`` varies), then per batch the
    prompt/seed slices, a new ``p.rng``, before_process_batch, process_batch, the step count
    of ``setup_conds``, sample, postprocess_batch, and the batch's infotext from
    ``extra_generation_params``."""
    p.all_prompts = (
        [p.prompt] * (p.batch_size * p.n_iter) if isinstance(p.prompt, str) else p.prompt
    )
    p.all_negative_prompts = [p.negative_prompt] * len(p.all_prompts)
    count = len(p.all_prompts)
    p.all_seeds = [p.seed + (i if p.subseed_strength == 0 else 0) for i in range(count)]
    p.all_subseeds = [p.subseed + i for i in range(count)]
    p.scripts.process(p)
    for n in range(p.n_iter):
        p.iteration = n
        sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
        p.prompts, p.negative_prompts = p.all_prompts[sl], p.all_negative_prompts[sl]
        p.seeds, p.subseeds = p.all_seeds[sl], p.all_subseeds[sl]
        p.rng = ImageRNG(
            (4, p.height // 8, p.width // 8),
            p.seeds,
            subseeds=p.subseeds,
            subseed_strength=p.subseed_strength,
            seed_resize_from_h=p.seed_resize_from_h,
            seed_resize_from_w=p.seed_resize_from_w,
        )
        p.rngs.append(p.rng)
        p.scripts.before_process_batch(p)
        p.scripts.process_batch(p)
        # setup_conds: prompt editing counts the sampler's total steps (second-order
        # samplers such as Heun and DPM2 take two model calls a step: SamplerData.total_steps)
        p.firstpass_steps = p.steps * (2 if p.second_order_sampler else 1)
        # with devices.without_autocast() if devices.unet_needs_upcast else devices.autocast():
        with p.devices.autocast() if p.devices is not None else contextlib.nullcontext():
            samples = p.sample()
        p.scripts.postprocess_batch(p, samples)
        p.infotexts.append(dict(p.extra_generation_params))
    # Processed(p, images, infotexts=...): comments are read here, then scripts' postprocess.
    count = len(p.all_prompts)
    processed = Processed(
        images=[f"image {i}" for i in range(count)],
        infotexts=[create_infotext(p, i) for i in range(count)],
        comments="".join(f"{comment}\n" for comment in p.comments),
    )
    p.scripts.postprocess(p, processed)
    return processed


@dataclass
class Processed:
    """``modules.processing.Processed``: the run's images (the API returns every one of them,
    as base64), their infotexts and the comments shown under the result."""

    images: list
    infotexts: list
    comments: str
    #: 1 when a grid comes first (batch of several images with grids on), else 0
    index_of_first_image: int = 0


def start_alpha_bar_of(sampler: Any, steps: int) -> float:
    """The VP alpha_bar where the stand-in sampler starts (test oracle, from WebUI facts)."""
    if isinstance(sampler, CompVisSampler):
        t0 = 999 if sampler.funcname == "unipc" else int(sampler.get_timesteps(None, steps)[-1])
        return float(sampler.model_wrap_cfg.inner_model.inner_model.alphas_cumprod[t0])
    sigma = float(sampler.get_sigmas(None, steps)[0])
    return 1.0 / (1.0 + sigma * sigma)


def vp_start_of(sampler: Any, steps: int) -> torch.Tensor:
    """The recorded start latent in VP space (x_vp = x_kd * sqrt(abar) for k-diffusion)."""
    if isinstance(sampler, CompVisSampler):
        return sampler.start_latent
    return sampler.start_latent * math.sqrt(start_alpha_bar_of(sampler, steps))


TINY_MODULE = Path(__file__).resolve().parent / "data" / "oms-tiny"
_TINY_PARTS = (
    "model_index.json",
    "oms_module",
    "oms_text_encoder",
    "oms_tokenizer",
    "text_encoder",
    "tokenizer",
)


def install_tiny_module(models_dir: Path, name: str = "oms_tiny") -> Path:
    """Copy the tiny OMS test module (released layout, 32-d text) to ``models_dir/name``."""
    target = models_dir / name
    target.mkdir(parents=True)
    for part in _TINY_PARTS:
        src = TINY_MODULE / part
        if src.is_dir():
            shutil.copytree(src, target / part)
        else:
            shutil.copy2(src, target / part)
    return target


def install_own_module(
    models_dir: Path, name: str = "mine", family: str = "sd1", borrows: bool = True
) -> Path:
    """A module as ``python -m oms_ext.train`` writes it (the tiny module's weights): training
    facts in the weights' metadata and, with ``borrows``, a pointer marked as reading the
    checkpoint's own text encoder (and no encoder files of its own)."""
    from safetensors.torch import load_file, save_file

    from oms_ext.loading import TRAINING_METADATA_KEY, read_header
    from oms_ext.text import ENCODER_SOURCE_CHECKPOINT, ENCODER_SOURCE_KEY

    target = install_tiny_module(models_dir, name)
    weights = target / "oms_module" / "diffusion_pytorch_model.safetensors"
    _, metadata = read_header(weights)
    facts = {"family": family, "encoder": "test", "steps": 3, "images": 4}
    save_file(load_file(weights), weights, {**metadata, TRAINING_METADATA_KEY: json.dumps(facts)})
    if borrows:
        pointer = target / "oms_text_encoder" / "config.json"
        data = json.loads(pointer.read_text())
        data.update({"_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"})
        data[ENCODER_SOURCE_KEY] = ENCODER_SOURCE_CHECKPOINT
        pointer.write_text(json.dumps(data))
        shutil.rmtree(target / "text_encoder")
    return target


# --- infotext, as the WebUIs write and read it ---------------------------------------------


def quote(value: Any) -> Any:
    """A1111 1.10.1 / Forge ``modules.infotext_utils.quote``: a value holding a comma, a colon
    or a newline is written as a JSON string; anything else as it is."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(value, ensure_ascii=False)


def infotext_line(params: dict[str, Any]) -> str:
    """The ``key: value`` line of ``modules.processing.create_infotext`` (None values left out,
    a key equal to its value written alone)."""
    return ", ".join(
        k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None
    )


def create_infotext(p: Txt2Img, index: int) -> str:
    """``modules.processing.create_infotext`` for image ``index`` of the run: its prompt, a
    "Negative prompt:" line when there is one, then the parameter line (steps, its seed, the
    batch's ``extra_generation_params``)."""
    params = {"Steps": p.steps, "Seed": p.all_seeds[index], "Size": f"{p.width}x{p.height}"}
    params.update(p.infotexts[index // p.batch_size])
    negative = p.all_negative_prompts[index]
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{p.all_prompts[index]}{negative_line}\n{infotext_line(params)}".strip()


def parse_generation_parameters(text: str) -> dict[str, str]:
    """``modules.infotext_utils.parse_generation_parameters``: the last line is the parameter
    line when it holds at least three ``key: value`` pairs; the lines before a "Negative
    prompt:" line are the prompt, the ones after it the negative prompt."""
    *lines, last = text.strip().split("\n")
    params = parse_infotext_line(last)
    if len(params) < 3:
        lines, params = [*lines, last], {}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **params}


def save_button_fields(infotext: str) -> tuple[str, str]:
    """What the Save button under the gallery reads of the selected image's info text
    (``modules.ui_common.save_files``: ``parameters['Seed']`` and ``parameters['Prompt']`` of
    ``parse_generation_parameters``, a KeyError when there is no seed)."""
    parameters = parse_generation_parameters(infotext)
    return parameters["Seed"], parameters["Prompt"]


#: ``modules.infotext_utils.re_param_code``: a key, then a JSON string or text up to a comma.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext_line(line: str) -> dict[str, str]:
    """``modules.infotext_utils.parse_generation_parameters`` on the parameter line: every value
    comes back as a string, JSON strings are decoded (``unquote``)."""
    out = {}
    for key, value in _RE_PARAM.findall(line):
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        out[key] = value
    return out


def run_xyz_cells(p: Txt2Img, cells: list[dict[str, Any]]) -> list[Txt2Img]:
    """``scripts/xyz_grid.py`` (A1111 1.10.1, Forge): each cell runs ``process_images`` on a
    SHALLOW ``copy(p)`` after its axes set their values (here ``p.oms_<field>``), so every
    cell shares ``p.extra_generation_params`` with the others. Returns the cells' copies."""
    done = []
    for values in cells:
        pc = copy.copy(p)
        pc.infotexts = []
        for name, value in values.items():
            setattr(pc, name, value)
        process_images(pc)
        done.append(pc)
    return done


# --- A1111's precision casts around sampling --------------------------------------------------


class A1111Devices:
    """A1111 1.10.1 ``modules/devices.py``: ``autocast()``, which ``process_images_inner``
    samples inside, and ``manual_cast(dtype)``, which it returns instead of
    ``torch.autocast("cuda")`` on GTX 16xx / XPU / MPS without ``--upcast-sampling``.

    ``mode``: "autocast" (``torch.autocast("cuda")``, played by the CPU's autocast in bf16: no
    CUDA here), "manual_cast" (the layer classes of ``patch_module_list`` get a forward that
    casts tensor inputs and weights to ``dtype`` around the original, kept as the class's
    ``org_forward``; MultiheadAttention is cast to float32) or "off" (``--no-half``: no cast).
    """

    patch_module_list = (
        torch.nn.Linear,
        torch.nn.Conv2d,
        torch.nn.MultiheadAttention,
        torch.nn.GroupNorm,
        torch.nn.LayerNorm,
    )

    def __init__(self, mode: str, dtype: torch.dtype = torch.float16) -> None:
        self.mode = mode
        self.dtype = dtype

    def autocast(self) -> Any:
        if self.mode == "autocast":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        if self.mode == "manual_cast":
            return self.manual_cast(self.dtype)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def manual_cast(self, dtype: torch.dtype):
        def casting(target: torch.dtype):
            def forward(module, *args, **kwargs):
                args = [a.to(target) if isinstance(a, torch.Tensor) else a for a in args]
                kwargs = {
                    k: v.to(target) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
                }
                weights = {p.dtype for p in module.parameters()}
                module.to(target)
                try:
                    return type(module).org_forward(module, *args, **kwargs)
                finally:
                    if weights and weights != {target}:
                        module.to(weights.pop())

            return forward

        patched = []
        for cls in self.patch_module_list:
            if "org_forward" in vars(cls):
                continue
            cls.org_forward = cls.forward
            target = torch.float32 if cls is torch.nn.MultiheadAttention else dtype
            cls.forward = casting(target)
            patched.append(cls)
        try:
            yield
        finally:
            for cls in patched:
                cls.forward = cls.org_forward
                del cls.org_forward


# --- Forge's memory manager -------------------------------------------------------------------


def _leave_device(module: torch.nn.Module, device: torch.device) -> None:
    """Move ``module`` to ``device``; the meta device plays the GPU in placement tests and its
    tensors hold no values, so leaving it keeps where tensors are, not what they hold."""
    if any(t.device.type == "meta" for t in (*module.parameters(), *module.buffers())):
        module.to_empty(device=device)
    else:
        module.to(device)


def module_bytes(module: torch.nn.Module, device: torch.device) -> int:
    """``backend.memory_management.module_size(..., include_device=device)``: bytes of the
    module's tensors on ``device``."""
    tensors = (*module.parameters(), *module.buffers())
    return sum(t.nbytes for t in tensors if t.device == torch.device(device))


class ForgeModelPatcher:
    """Forge f2.0.1 ``backend.patcher.base.ModelPatcher``: a module with the device it is
    loaded to and the one it is offloaded to, and weight patches (LoRAs) that
    ``forge_patch_model`` adds to the weights when the manager loads it and
    ``forge_unpatch_model`` takes out again (``patches``: parameter name -> added value).
    ``clone()`` shares the module, with patches of its own."""

    def __init__(self, model, load_device, offload_device, size=0, current_device=None):
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.current_device = torch.device(current_device or offload_device)
        self.patches: dict[str, float] = {}
        self.backup: dict[str, torch.Tensor] = {}

    def clone(self) -> ForgeModelPatcher:
        n = ForgeModelPatcher(self.model, self.load_device, self.offload_device)
        n.patches = dict(self.patches)
        return n

    def is_clone(self, other: Any) -> bool:
        return getattr(other, "model", None) is self.model

    def forge_patch_model(self, target_device=None) -> torch.nn.Module:
        params = dict(self.model.named_parameters())
        for name, delta in self.patches.items():
            self.backup[name] = params[name].detach().clone()
            params[name].data += delta
        if target_device is not None:
            self.model.to(target_device)
        return self.model

    def forge_unpatch_model(self, target_device=None) -> None:
        params = dict(self.model.named_parameters())
        for name, weight in self.backup.items():
            params[name].data = weight.to(params[name].device)
        self.backup = {}
        if target_device is not None:
            _leave_device(self.model, target_device)


class ForgeLoadedModel:
    """Forge f2.0.1 ``backend.memory_management.LoadedModel``: an entry of
    ``current_loaded_models``; ``model`` is the patcher, equal entries share it."""

    def __init__(self, patcher: ForgeModelPatcher) -> None:
        self.model = patcher
        self.device = patcher.load_device

    def model_load(self) -> None:
        """``LoadedModel.model_load`` (all loaded to GPU): patch, then move to the device."""
        self.model.forge_patch_model(self.device)
        self.model.current_device = self.model.load_device

    def model_unload(self, avoid_model_moving: bool = False) -> None:
        """``LoadedModel.model_unload``: unpatch; move to the offload device unless
        ``avoid_model_moving`` (a clone taking over, an abandoned model)."""
        if avoid_model_moving:
            self.model.forge_unpatch_model()
        else:
            self.model.forge_unpatch_model(self.model.offload_device)
            self.model.current_device = self.model.offload_device

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ForgeLoadedModel) and self.model is other.model


class ForgeCLIP:
    """Forge f2.0.1 ``backend.patcher.clip.CLIP``: the text encoders (``cond_stage_model``),
    tokenizers and a patcher. ``clone()`` shares the encoders and tokenizers, with a patcher
    clone of its own; ``sd_forge_lora/networks.py`` ``load_networks`` makes such a clone,
    with the LoRAs' patches, each time the LoRA set changes and sets it as
    ``forge_objects.clip``."""

    def __init__(self, cond_stage_model: Any, tokenizer: Any, patcher: ForgeModelPatcher | None):
        self.cond_stage_model = cond_stage_model
        self.tokenizer = tokenizer
        self.patcher = patcher

    def clone(self) -> ForgeCLIP:
        return ForgeCLIP(self.cond_stage_model, self.tokenizer, self.patcher.clone())

    def with_lora(self, name: str, delta: float) -> ForgeCLIP:
        """A clone whose patcher adds ``delta`` to the weight ``name`` (a LoRA, reduced)."""
        clone = self.clone()
        clone.patcher.patches[name] = delta
        return clone


class ForgeMemoryManagement:
    """The rules of Forge f2.0.1 ``backend.memory_management`` the extension relies on.

    ``load_models_gpu``: a model loaded already moves to the front of
    ``current_loaded_models`` (most recent first) and only the inference reserve is freed;
    otherwise its clones are unloaded in place (``unload_model_clones``), room is made with
    ``free_memory(1.3 * its size + reserve)`` on its device, and it is patched and moved there
    (``LoadedModel.model_load``). ``free_memory`` first unloads, in place, models nothing else
    references (``sys.getrefcount(patcher) <= 2``), then unloads models on that device, last
    used first, until ``capacity`` leaves enough free (``capacity`` None: nothing needs
    evicting). ``minimum_inference_memory``: the reserve (1 GiB in Forge; ``reserve`` bytes
    here). ``text_encoder_device`` is the CPU in low-VRAM modes (``vram_state`` LOW/NO_VRAM),
    else the GPU; ``should_use_fp16`` is false on the CPU. ``device`` stands for the GPU;
    ``load_calls`` records, per ``load_models_gpu`` call, the devices each model's tensors
    were on when the manager was asked (before it made room).
    """

    def __init__(
        self,
        device: str = "cpu",
        *,
        low_vram: bool = False,
        fp16: bool = True,
        capacity: int | None = None,
        reserve: int = 0,
    ):
        self.device = torch.device(device)
        self.low_vram = low_vram
        self.fp16 = fp16
        self.capacity = capacity
        self.reserve = reserve
        self.current_loaded_models: list[ForgeLoadedModel] = []
        self.load_calls: list[list[set[torch.device]]] = []

    def get_torch_device(self) -> torch.device:
        return self.device

    def text_encoder_device(self) -> torch.device:
        return torch.device("cpu") if self.low_vram else self.device

    def should_use_fp16(self, device=None, **_: Any) -> bool:
        return self.fp16 and (device is None or torch.device(device).type != "cpu")

    def should_use_bf16(self, device=None, **_: Any) -> bool:
        return False

    def minimum_inference_memory(self) -> int:
        return self.reserve

    def get_free_memory(self, device) -> float:
        if self.capacity is None:
            return float("inf")
        used = sum(module_bytes(m.model.model, device) for m in self.current_loaded_models)
        return self.capacity - used

    def load_models_gpu(self, models, memory_required=0, hard_memory_preservation=0) -> None:
        self.load_calls.append(
            [{t.device for t in (*m.model.parameters(), *m.model.buffers())} for m in models]
        )
        reserve = max(self.minimum_inference_memory(), memory_required)
        to_load, already = [], []
        for patcher in models:
            loaded = ForgeLoadedModel(patcher)
            if loaded in self.current_loaded_models:
                index = self.current_loaded_models.index(loaded)
                self.current_loaded_models.insert(0, self.current_loaded_models.pop(index))
                already.append(loaded)
            else:
                to_load.append(loaded)
        if not to_load:
            for device in {m.device for m in already}:
                if device.type != "cpu":
                    self.free_memory(reserve, device, already)
            return
        for loaded in to_load:
            self.unload_model_clones(loaded.model)
        for loaded in to_load:
            size = sum(
                t.nbytes
                for t in (*loaded.model.model.parameters(), *loaded.model.model.buffers())
                if t.device != loaded.device
            )
            if loaded.device.type != "cpu":
                self.free_memory(size * 1.3 + reserve, loaded.device, already)
        for loaded in to_load:
            loaded.model_load()
            self.current_loaded_models.insert(0, loaded)

    def unload_model_clones(self, model) -> None:
        for loaded in [m for m in self.current_loaded_models if model.is_clone(m.model)]:
            self.current_loaded_models.remove(loaded)
            loaded.model_unload(avoid_model_moving=True)

    def free_memory(self, memory_required, device, keep_loaded=(), free_all=False) -> None:
        import sys

        for i in range(len(self.current_loaded_models) - 1, -1, -1):
            # the list's reference and getrefcount's argument: nobody else holds the patcher
            if sys.getrefcount(self.current_loaded_models[i].model) <= 2:
                self.current_loaded_models.pop(i).model_unload(avoid_model_moving=True)
        if free_all:
            memory_required = float("inf")
        for i in range(len(self.current_loaded_models) - 1, -1, -1):
            if not free_all and self.get_free_memory(device) > memory_required:
                break
            loaded = self.current_loaded_models[i]
            if loaded.device == torch.device(device) and loaded not in keep_loaded:
                self.current_loaded_models.pop(i).model_unload()

    def unload_all_models(self) -> None:
        self.free_memory(1e30, self.device, free_all=True)

    def holds(self, module: torch.nn.Module) -> bool:
        """Whether a loaded model's patcher wraps ``module`` (for tests)."""
        return any(loaded.model.model is module for loaded in self.current_loaded_models)

    def install(self, monkeypatch: Any) -> None:
        """Register this manager as ``backend.memory_management`` (and the patcher class as
        ``backend.patcher.base``) in ``sys.modules`` for the test."""
        import sys

        mm = ModuleType("backend.memory_management")
        for name in (
            "get_torch_device",
            "text_encoder_device",
            "should_use_fp16",
            "should_use_bf16",
            "load_models_gpu",
            "unload_model_clones",
            "free_memory",
            "unload_all_models",
            "minimum_inference_memory",
            "get_free_memory",
        ):
            setattr(mm, name, getattr(self, name))
        mm.current_loaded_models = self.current_loaded_models
        base = ModuleType("backend.patcher.base")
        base.ModelPatcher = ForgeModelPatcher
        modules = {
            "backend": ModuleType("backend"),
            "backend.patcher": ModuleType("backend.patcher"),
            "backend.memory_management": mm,
            "backend.patcher.base": base,
        }
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)


# --- the WebUI's prompt handling ------------------------------------------------------------


def prompt_parser_module() -> SimpleNamespace:
    """``modules.prompt_parser`` of A1111 1.10.1 / Forge: the three functions the extension
    calls, returning the WebUI's data shapes (a schedule per prompt as ``[[end_step, text],
    ...]``; ``(indexes, flat prompts, prompt indexes)`` for ``AND``; ``[[text, weight], ...]``
    for emphasis). The rules behind them are oms_ext's :class:`PlainSyntax`, which the opt-in
    test in tests/test_prompt_syntax.py checks against the WebUI's own parser."""

    def get_learned_conditioning_prompt_schedules(
        prompts, base_steps, hires_steps=None, use_old_scheduling=False
    ):
        syntax = PlainSyntax(use_old_scheduling)
        return [[[base_steps, syntax.first_step_text(p, base_steps)]] for p in prompts]

    def get_multicond_prompt_list(prompts):
        flat, index_of, res = [], {}, []
        for prompt in prompts:
            entry = []
            for text, weight in PlainSyntax().composable_parts(prompt):
                if text not in index_of:
                    index_of[text] = len(flat)
                    flat.append(text)
                entry.append((index_of[text], weight))
            res.append(entry)
        return res, flat, index_of

    def parse_prompt_attention(text):
        return [[run, weight] for run, weight in PlainSyntax().attention(text)]

    return SimpleNamespace(
        get_learned_conditioning_prompt_schedules=get_learned_conditioning_prompt_schedules,
        get_multicond_prompt_list=get_multicond_prompt_list,
        parse_prompt_attention=parse_prompt_attention,
    )


def extra_networks_module() -> SimpleNamespace:
    """``modules.extra_networks`` (A1111 1.10.1 / Forge): ``parse_prompt`` returns the prompt
    without ``<kind:args>`` tags and the tags found."""

    def parse_prompt(prompt):
        found: dict[str, list[str]] = {}

        def take(match):
            found.setdefault(match.group(1), []).append(match.group(2))
            return ""

        return re.sub(r"<(\w+):([^>]+)>", take, prompt), found

    return SimpleNamespace(parse_prompt=parse_prompt)


# --- A1111's low-VRAM hooks -------------------------------------------------------------------


class A1111LowVram:
    """A1111 1.10.1 ``modules/lowvram.py`` (``--medvram``/``--lowvram``) for an SD2.x
    checkpoint. ``setup_for_low_vram`` leaves the text tower on the CPU and registers
    ``send_me_to_gpu`` as forward pre-hook on ``cond_stage_model.model`` and on its
    ``token_embedding`` (both with the cond stage model as "parent"); the hook moves the parent
    to ``devices.device`` and the module there before to the CPU. ``load_model`` registers
    these hooks before ``sd_hijack`` wraps the token embedding (``EmbeddingsWithFixes``), so
    the hooks sit on the original embedding. The cond cache (``p.cached_c``) means a re-roll of
    the same prompt never calls the tower, so it is still on the CPU when sampling starts.

    ``device`` stands for the GPU (meta: no GPU here). A module called with inputs on another
    device than its weights fails on a real GPU; the hook checks that, as torch would there.
    """

    def __init__(self, device: str = "meta") -> None:
        self.device = torch.device(device)
        self.module_in_gpu: torch.nn.Module | None = None

    def setup_sd2(self, cond_stage_model: torch.nn.Module) -> None:
        tower = cond_stage_model.model
        parents = {tower: cond_stage_model, tower.token_embedding: cond_stage_model}

        def send_me_to_gpu(module, inputs):
            parent = parents.get(module, module)
            if self.module_in_gpu is not parent:
                if self.module_in_gpu is not None:
                    self.module_in_gpu.to("cpu")
                parent.to(self.device)
                self.module_in_gpu = parent
            for value in inputs:
                if isinstance(value, torch.Tensor) and value.device != self.device:
                    raise RuntimeError(
                        "Expected all tensors to be on the same device, but found at least two "
                        f"devices, {self.device} and {value.device}!"
                    )

        tower.register_forward_pre_hook(send_me_to_gpu)
        tower.token_embedding.register_forward_pre_hook(send_me_to_gpu)
