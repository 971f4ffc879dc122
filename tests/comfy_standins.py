"""Minimal stand-ins of ComfyUI's sampling path, written from ComfyUI 0.8.0's rules.

Each rule names the ComfyUI file and function it follows. They keep only what decides where a
sampler starts: the sigma schedules, ``max_denoise``, ``noise_scaling``, the wrapper chain of
``CFGGuider.sample`` and the model's (patched) ``model_sampling``. The sampler functions stop
after recording their first model call's input, the x the OMS start must equal.

:func:`install` puts them into ``sys.modules`` as ``comfy.*`` and ``folder_paths``.
"""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch

from oms_ext import schedules

# --- comfy/model_sampling.py ---------------------------------------------------------------


class EPS:
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        """EPS.noise_scaling: noise * sqrt(1 + sigma^2) when max_denoise, else noise * sigma,
        then + latent_image."""
        sigma = sigma.reshape(()) if sigma.numel() == 1 else sigma.view(-1, 1, 1, 1)
        scale = torch.sqrt(1.0 + sigma**2.0) if max_denoise else sigma
        return noise * scale + latent_image


class V_PREDICTION(EPS):
    """V_PREDICTION(EPS): same noise scaling as EPS."""


class EDM(V_PREDICTION):
    """EDM(V_PREDICTION): continuous EDM models."""


class X0(EPS):
    """X0(EPS): models that predict x0 directly."""


class CONST:
    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        """CONST.noise_scaling (flow matching): sigma * noise + (1 - sigma) * latent."""
        return sigma * noise + (1.0 - sigma) * latent_image


def _rescale_zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """rescale_zero_terminal_snr_sigmas: shift sqrt(abar) so its last value is 0, rescale so
    its first is kept, and set the last abar to 4.8973451890853435e-08."""
    root = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root**2
    abar[-1] = 4.8973451890853435e-08
    return ((1 - abar) / abar) ** 0.5


class ModelSamplingDiscrete(torch.nn.Module):
    """ModelSamplingDiscrete: SD's scaled-linear betas (0.00085..0.012, 1000 steps), sigmas in
    float32, ascending; sigma_min = sigmas[0], sigma_max = sigmas[-1]; zsnr rescales."""

    def __init__(self, zsnr: bool = False) -> None:
        super().__init__()
        abar = schedules.sd_alphas_cumprod().to(torch.float32)
        sigmas = ((1 - abar) / abar) ** 0.5
        if zsnr:
            sigmas = _rescale_zero_terminal_snr(sigmas)
        self.set_sigmas(sigmas)

    def set_sigmas(self, sigmas: torch.Tensor) -> None:
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """ModelSamplingDiscrete.timestep: index of the nearest log sigma."""
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """ModelSamplingDiscrete.sigma: log-linear interpolation between table entries."""
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


class ModelSamplingDiscreteEDM(ModelSamplingDiscrete):
    """ModelSamplingDiscreteEDM: discrete table, EDM timesteps (0.25 log sigma)."""


class ModelSamplingDiscreteDistilled(ModelSamplingDiscrete):
    """comfy_extras/nodes_model_advanced.py ModelSamplingDiscreteDistilled (LCM): every
    20th sigma of the 1000, ending at t = 999 (50 original timesteps)."""

    def __init__(self, zsnr: bool = False) -> None:
        super().__init__(zsnr)
        skip = 1000 // 50
        self.set_sigmas(self.sigmas[skip - 1 :: skip].clone())


class LCM(EPS):
    """comfy_extras/nodes_model_advanced.py LCM(EPS)."""


class ModelSamplingDiscreteFlow(torch.nn.Module):
    """ModelSamplingDiscreteFlow: sigmas in (0, 1] (flow matching, SD3/Flux)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("sigmas", torch.linspace(1e-3, 1.0, 1000))

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]


def build_model_sampling(kind: str = "eps", zsnr: bool = False) -> Any:
    """comfy/model_base.py model_sampling / nodes_model_advanced ModelSamplingDiscrete.patch:
    ``class ModelSampling(base, prediction)`` for "eps", "v_prediction", "lcm", "x0", "edm"
    and "flow"."""
    if kind == "flow":
        return type("ModelSampling", (ModelSamplingDiscreteFlow, CONST), {})()
    base, prediction = {
        "eps": (ModelSamplingDiscrete, EPS),
        "v_prediction": (ModelSamplingDiscrete, V_PREDICTION),
        "lcm": (ModelSamplingDiscreteDistilled, LCM),
        "x0": (ModelSamplingDiscrete, X0),
        "edm": (ModelSamplingDiscreteEDM, EDM),
    }[kind]
    return type("ModelSampling", (base, prediction), {})(zsnr)


# --- comfy/latent_formats.py ---------------------------------------------------------------


class SD15:
    latent_channels = 4


class SDXL:
    latent_channels = 4


class SD3:
    latent_channels = 16


# --- comfy/patcher_extension.py ------------------------------------------------------------


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    APPLY_MODEL = "apply_model"


class WrapperExecutor:
    """WrapperExecutor: calls wrappers[idx](executor, *args); calling the executor runs the
    next wrapper, the last one runs the original; ``class_obj`` is the wrapped instance."""

    def __init__(self, original: Callable, class_obj: Any, wrappers: list, idx: int) -> None:
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, wrappers, idx

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(
            *args, **kwargs
        )

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


def get_all_wrappers(kind: str, model_options: dict) -> list:
    """get_all_wrappers(..., is_model_options=True): every key's list, in insertion order."""
    found = model_options.get("transformer_options", {}).get("wrappers", {}).get(kind, {})
    return [w for key_list in found.values() for w in key_list]


# --- comfy/model_patcher.py and comfy/model_management.py ----------------------------------


class ModelPatcher:
    """ModelPatcher: holds a model and its devices; ``clone`` shares the model and copies the
    object patches and each wrapper list; ``get_model_object`` sees object patches first."""

    def __init__(self, model: Any, load_device: Any, offload_device: Any, size: int = 0) -> None:
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.wrappers: dict[str, dict[str, list]] = {}
        self.object_patches: dict[str, Any] = {}
        self.model_options: dict[str, Any] = {"transformer_options": {}}

    def clone(self) -> ModelPatcher:
        n = ModelPatcher(self.model, self.load_device, self.offload_device)
        n.object_patches = dict(self.object_patches)
        n.wrappers = {k: {k1: list(w) for k1, w in v.items()} for k, v in self.wrappers.items()}
        return n

    def add_wrapper_with_key(self, kind: str, key: str, wrapper: Callable) -> None:
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, kind: str, key: str) -> None:
        self.wrappers.get(kind, {}).pop(key, None)

    def get_wrappers(self, kind: str, key: str) -> list:
        return self.wrappers.get(kind, {}).get(key, [])

    def add_object_patch(self, name: str, obj: Any) -> None:
        self.object_patches[name] = obj

    def get_model_object(self, name: str) -> Any:
        if name in self.object_patches:
            return self.object_patches[name]
        return getattr(self.model, name)


class ModelManagement(types.ModuleType):
    """comfy/model_management.py: the CPU as torch device and offload device (``--cpu``);
    ``unet_dtype`` picks float32 there (should_use_fp16/bf16 are False on the CPU);
    ``load_models_gpu(force_full_load=True)`` moves every weight to the load device."""

    class InterruptProcessingException(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("comfy.model_management")
        self.loads: list[tuple[list, bool]] = []
        self.device = torch.device("cpu")

    def get_torch_device(self) -> torch.device:
        return self.device

    def unet_offload_device(self) -> torch.device:
        return torch.device("cpu")

    def unet_dtype(self, device=None, model_params=0, supported_dtypes=()) -> torch.dtype:
        return torch.float32

    def load_models_gpu(self, models, memory_required=0, force_full_load=False, **kw) -> None:
        self.loads.append((list(models), force_full_load))
        for patcher in models:
            patcher.model.to(patcher.load_device)


# --- comfy/utils.py ------------------------------------------------------------------------


class ProgressBar:
    """ProgressBar(total): update(n) adds n, update_absolute(v) sets it (hook: the page)."""

    instances: ClassVar[list[ProgressBar]] = []

    def __init__(self, total: int, node_id: Any = None) -> None:
        self.total, self.current = total, 0
        ProgressBar.instances.append(self)

    def update(self, value: int) -> None:
        self.current = min(self.current + value, self.total)


# --- comfy/samplers.py ---------------------------------------------------------------------

#: KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"] (SAMPLER_NAMES), ComfyUI 0.8.0.
KSAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
    "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde",
    "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
]  # fmt: skip
SAMPLER_NAMES = [*KSAMPLER_NAMES, "ddim", "uni_pc", "uni_pc_bh2"]
#: SCHEDULER_HANDLERS' keys, in order.
SCHEDULER_NAMES = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
    "linear_quadratic", "kl_optimal",
]  # fmt: skip
#: Where oms_ext.schedules has the same scheduler (Forge took these from ComfyUI).
_SAME_AS_OMS = {
    "simple": "simple",
    "sgm_uniform": "sgm_uniform",
    "karras": "karras",
    "exponential": "exponential",
    "ddim_uniform": "ddim",
    "beta": "beta",
    "normal": "normal",
    "kl_optimal": "kl_optimal",
}


def _linear_quadratic(sigma_max: float, steps: int, threshold: float = 0.025) -> torch.Tensor:
    """linear_quadratic_schedule: linear to ``threshold`` over half the steps, quadratic
    after, as 1 - s, times sigma_max."""
    if steps == 1:
        return torch.tensor([sigma_max, 0.0])
    lin = steps // 2
    diff = lin - threshold * steps
    quad = steps - lin
    a = diff / (lin * quad**2)
    b = threshold / lin - 2 * diff / quad**2
    c = a * lin**2
    schedule = [i * threshold / lin for i in range(lin)]
    schedule += [a * i * i + b * i + c for i in range(lin, steps)] + [1.0]
    return torch.tensor([1.0 - s for s in schedule]) * sigma_max


def calculate_sigmas(model_sampling: Any, scheduler: str, steps: int) -> torch.Tensor:
    """calculate_sigmas: the scheduler's schedule for ``steps`` steps, float32 (FloatTensor);
    karras/exponential/kl_optimal between the model's sigma_min and sigma_max."""
    if scheduler == "linear_quadratic":
        return _linear_quadratic(float(model_sampling.sigma_max), steps).float()
    model_sigmas = model_sampling.sigmas.double()
    out = schedules.scheduler_sigmas(_SAME_AS_OMS[scheduler], steps, model_sigmas)
    return out.float()


class Sampler:
    def max_denoise(self, model_wrap: Any, sigmas: torch.Tensor) -> bool:
        """Sampler.max_denoise: sigmas[0] within rel. 1e-5 of sigma_max, or above it."""
        max_sigma = float(model_wrap.inner_model.model_sampling.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


class KSAMPLER(Sampler):
    """KSAMPLER.sample: x = model_sampling.noise_scaling(sigmas[0], noise, latent,
    max_denoise), then sampler_function(model, x, sigmas)."""

    def __init__(self, sampler_function: Callable, name: str) -> None:
        self.sampler_function, self.name = sampler_function, name

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):  # fmt: skip
        ms = model_wrap.inner_model.model_sampling
        x = ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        return self.sampler_function(model_wrap, x, sigmas)


def _first_call(model: Callable, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion samplers (and dpm_fast/dpm_adaptive, from sigma_max = sigmas[0]): the first
    model call is model(x, sigmas[0])."""
    return model(x, sigmas[0] * x.new_ones(x.shape[0]))


def _first_call_unipc(model: Callable, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """comfy/extra_samplers/uni_pc.py sample_unipc: x / sqrt(1 + s0^2) into VP space, and
    predict_eps_sigma multiplies the model input back by sqrt(s0^2 + 1)."""
    s0 = sigmas[0]
    x_vp = x / torch.sqrt(1.0 + s0**2.0)
    return model(x_vp * ((s0**2 + 1.0) ** 0.5), s0 * x.new_ones(x.shape[0]))


def sampler_object(name: str) -> KSAMPLER:
    """sampler_object: uni_pc/uni_pc_bh2 their own function, ddim = euler, else ksampler."""
    return KSAMPLER(_first_call_unipc if name.startswith("uni_pc") else _first_call, name)


class CFGGuider:
    """CFGGuider.sample: copies model_options, merges the ModelPatcher's wrappers into them
    (sampler_helpers.prepare_model_patcher) and runs outer_sample through the OUTER_SAMPLE
    wrappers; outer_sample loads the model and calls sampler.sample with itself as
    model_wrap (inner_model: the model with its object patches applied)."""

    def __init__(self, model_patcher: ModelPatcher) -> None:
        self.model_patcher = model_patcher
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), sigma.clone()))
        return x

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
               disable_pbar=False, seed=None):  # fmt: skip
        if sigmas.shape[-1] == 0:
            return latent_image
        options = {"transformer_options": {"wrappers": {}}}
        for kind, keyed in self.model_patcher.wrappers.items():
            target = options["transformer_options"]["wrappers"].setdefault(kind, {})
            for key, wrappers in keyed.items():
                target.setdefault(key, []).extend(wrappers)
        executor = WrapperExecutor(
            self.outer_sample, self, get_all_wrappers(WrappersMP.OUTER_SAMPLE, options), 0
        )
        return executor.execute(noise, latent_image, sampler, sigmas, denoise_mask, callback,
                                disable_pbar, seed, latent_shapes=[latent_image.shape])  # fmt: skip

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None,
                     callback=None, disable_pbar=False, seed=None, latent_shapes=None):  # fmt: skip
        ms = self.model_patcher.get_model_object("model_sampling")
        self.inner_model = SimpleNamespace(model_sampling=ms)
        return sampler.sample(self, sigmas, {"seed": seed}, callback, noise, latent_image,
                              denoise_mask, disable_pbar)  # fmt: skip


class KSampler:
    """comfy/samplers.py KSampler: sigmas for ``steps`` (+1 then drop the penultimate for the
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS); denoise < 1 takes the last steps + 1 of
    int(steps / denoise); sample() cuts at last_step, then starts at start_step."""

    SCHEDULERS = SCHEDULER_NAMES
    SAMPLERS = SAMPLER_NAMES
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset(
        {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
    )

    def __init__(self, model: ModelPatcher, steps: int, sampler: str, scheduler: str,
                 denoise: float | None = None) -> None:  # fmt: skip
        self.model, self.sampler, self.scheduler = model, sampler, scheduler
        self.set_steps(steps, denoise)

    def calculate_sigmas(self, steps: int) -> torch.Tensor:
        discard = self.sampler in self.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
        ms = self.model.get_model_object("model_sampling")
        sigmas = calculate_sigmas(ms, self.scheduler, steps + 1 if discard else steps)
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas

    def set_steps(self, steps: int, denoise: float | None) -> None:
        if denoise is None or denoise > 0.9999:
            self.sigmas = self.calculate_sigmas(steps)
        else:
            self.sigmas = self.calculate_sigmas(int(steps / denoise))[-(steps + 1) :]

    def sample(self, guider: CFGGuider, noise, latent_image, start_step=None, last_step=None,
               denoise_mask=None, seed=None):  # fmt: skip
        sigmas = self.sigmas
        if last_step is not None and last_step < len(sigmas) - 1:
            sigmas = sigmas[: last_step + 1]
        if start_step is not None:
            if start_step >= len(sigmas) - 1:
                return latent_image
            sigmas = sigmas[start_step:]
        return guider.sample(noise, latent_image, sampler_object(self.sampler), sigmas,
                             denoise_mask, seed=seed)  # fmt: skip


# --- comfy/sample.py -----------------------------------------------------------------------


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: list[int] | None = None):
    """prepare_noise: torch.manual_seed(seed), one randn of the latent's shape on the CPU; with
    batch_index, one [1, ...] draw per index up to the largest, picked by index."""
    generator = torch.manual_seed(seed)
    if batch_index is None:
        return torch.randn(latent.size(), generator=generator, dtype=latent.dtype)
    unique, inverse = np.unique(batch_index, return_inverse=True)
    draws = []
    for i in range(unique[-1] + 1):
        noise = torch.randn([1, *latent.shape[1:]], generator=generator, dtype=latent.dtype)
        if i in unique:
            draws.append(noise)
    return torch.cat([draws[i] for i in inverse])


# --- folder_paths.py -----------------------------------------------------------------------


class FolderPaths(types.ModuleType):
    """folder_paths: ``models_dir``, ``folder_names_and_paths`` {name: ([folders], {exts})},
    get_folder_paths (a copy of the list), add_model_folder_path (extra_model_paths.yaml: a
    new name gets an empty extension set)."""

    def __init__(self, base: Path) -> None:
        super().__init__("folder_paths")
        self.models_dir = str(base / "models")
        self.folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}

    def get_folder_paths(self, name: str) -> list[str]:
        return self.folder_names_and_paths[name][0][:]

    def add_model_folder_path(self, name: str, path: str, is_default: bool = False) -> None:
        if name in self.folder_names_and_paths:
            paths = self.folder_names_and_paths[name][0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)
        else:
            self.folder_names_and_paths[name] = ([path], set())


# --- installing ----------------------------------------------------------------------------


class Comfy(SimpleNamespace):
    """The installed stand-ins: ``mm`` (model management), ``folder_paths``, ``server``."""


def install(monkeypatch: Any, base: Path) -> Comfy:
    """Put the stand-ins into ``sys.modules`` (undone by ``monkeypatch``)."""
    this = sys.modules[__name__]
    mm = ModelManagement()
    fp = FolderPaths(base)
    modules = {
        "comfy": types.ModuleType("comfy"),
        "comfy.model_management": mm,
        "folder_paths": fp,
    }
    for name, names in {
        "comfy.model_sampling": (
            "EPS", "V_PREDICTION", "EDM", "X0", "CONST", "ModelSamplingDiscrete",
            "ModelSamplingDiscreteEDM", "ModelSamplingDiscreteFlow",
        ),
        "comfy.latent_formats": ("SD15", "SDXL", "SD3"),
        "comfy.patcher_extension": ("WrappersMP", "WrapperExecutor", "get_all_wrappers"),
        "comfy.model_patcher": ("ModelPatcher",),
        "comfy.utils": ("ProgressBar",),
        "comfy.samplers": ("KSAMPLER", "Sampler", "KSampler", "CFGGuider", "calculate_sigmas"),
        "comfy.sample": ("prepare_noise",),
    }.items():  # fmt: skip
        module = types.ModuleType(name)
        for attr in names:
            setattr(module, attr, getattr(this, attr))
        modules[name] = module
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        if "." in name:
            monkeypatch.setattr(modules["comfy"], name.split(".", 1)[1], module, raising=False)
    monkeypatch.delitem(sys.modules, "server", raising=False)
    ProgressBar.instances.clear()
    return Comfy(mm=mm, folder_paths=fp)


def sd_model(kind: str = "eps", zsnr: bool = False, latent_format: Any = None) -> ModelPatcher:
    """A MODEL as CheckpointLoaderSimple gives it: a ModelPatcher whose model has a
    model_sampling (build_model_sampling) and a latent_format (SD15 unless given: SD1.x and
    SD2.x models alike, comfy/supported_models.py SD15/SD20 ``latent_format``)."""
    model = SimpleNamespace(
        model_sampling=build_model_sampling(kind, zsnr),
        latent_format=latent_format if latent_format is not None else SD15(),
        to=lambda device: None,
    )
    return ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def model_sampling_patch(model: ModelPatcher, kind: str, zsnr: bool = False) -> ModelPatcher:
    """nodes_model_advanced.py ModelSamplingDiscrete.patch: a clone with the
    "model_sampling" object patch."""
    patched = model.clone()
    patched.add_object_patch("model_sampling", build_model_sampling(kind, zsnr))
    return patched
