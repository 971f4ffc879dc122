"""Sigma schedules of the WebUIs' schedulers and the timesteps of their VP samplers.

All sigmas are k-diffusion sigmas (sigma space: ``x = x0 + sigma * eps``); a schedule for
``n`` steps is a descending float64 tensor of ``n + 1`` values ending in 0. "Model sigmas" are
the model's discrete noise levels in ascending order, shape [T] (index = VP timestep), as
k-diffusion and the WebUIs keep them. Only the first value matters to OMS (it fixes the
alpha_bar of the start), but the whole schedules are kept so they can be compared with the
WebUIs' step by step.

Facts (AUTOMATIC1111 1.10, Forge): "Karras", "Exponential", "Polyexponential", "KL Optimal" and
"Beta" run between the model's sigma_min and sigma_max (0.0292 and 14.6146 for SD);
"Align Your Steps" uses fixed tables starting at 14.615; the "DDIM" scheduler picks every
(T // n)-th model sigma from index 1 (so it starts at t = 951 for 20 steps); "Automatic" means
the sampler's default scheduler, else the model's own uniform spacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Align Your Steps sigma tables (10 steps, NVIDIA's published values) the WebUIs ship.
AYS_SIGMAS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}
#: Forge's "Align Your Steps GITS" tables (10 steps).
AYS_GITS_SIGMAS = {
    "sd15": (14.615, 4.617, 2.507, 1.236, 0.702, 0.402, 0.240, 0.156, 0.104, 0.094, 0.029),
    "sdxl": (14.615, 4.734, 2.567, 1.529, 0.987, 0.652, 0.418, 0.268, 0.179, 0.127, 0.029),
}
#: Forge's 32-step "Align Your Steps 32" tables.
AYS_32_SIGMAS = {
    "sd15": (
        14.615, 11.23951352, 8.64363081, 6.64729424, 5.57250862, 4.71648546, 3.99196065,
        3.5195609, 3.13490466, 2.79228788, 2.48773628, 2.21663865, 1.97508351, 1.7793172,
        1.61475335, 1.46540953, 1.314849, 1.16642497, 1.03475547, 0.91573744, 0.80748169,
        0.71202361, 0.621739, 0.53065202, 0.4529096, 0.37491455, 0.27461819, 0.2011529,
        0.14105873, 0.06682881, 0.03166121, 0.015,
    ),
    "sdxl": (
        14.615, 11.1491618, 8.50522127, 6.48827151, 5.43707402, 4.60398619, 3.89854704,
        3.27407457, 2.74396527, 2.29968659, 1.95448514, 1.67108715, 1.42878152, 1.23181009,
        1.06789649, 0.92579443, 0.80290886, 0.69660121, 0.60436903, 0.52852552, 0.46773344,
        0.41393379, 0.36258186, 0.31008517, 0.26518925, 0.22326461, 0.17653877, 0.13959192,
        0.10587381, 0.05519369, 0.02877334, 0.015,
    ),
}


def sd_alphas_cumprod(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """VP alpha_bar per timestep of Stable Diffusion's "scaled_linear" schedule, float64 [T].

    ``beta_t`` is spaced linearly in sqrt between ``beta_start`` and ``beta_end``;
    ``alpha_bar_t = prod_{s <= t} (1 - beta_s)``. SD1.x/SD2.x/SDXL all use the defaults.
    """
    if num_timesteps < 2 or not 0 < beta_start < beta_end < 1:
        raise ValueError(
            f"need num_timesteps >= 2 and 0 < beta_start < beta_end < 1, got {num_timesteps}, "
            f"{beta_start}, {beta_end}"
        )
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas**2, dim=0)


def model_sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The model's discrete sigmas ``sqrt((1 - abar) / abar)``, ascending, float64 [T]."""
    ac = alphas_cumprod.double()
    return ((1 - ac) / ac).sqrt()


def timestep_to_sigma(t: torch.Tensor, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma at (fractional) timesteps ``t``: log-sigma interpolated between neighbours."""
    t = t.double().clamp(0, model_sigmas.shape[0] - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigmas = model_sigmas.double().log()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def sigma_to_timestep(sigma: float, model_sigmas: torch.Tensor) -> float:
    """Fractional timestep of ``sigma``: inverse of :func:`timestep_to_sigma`, clamped."""
    log_sigmas = model_sigmas.double().log()
    target = math.log(sigma)
    if target <= log_sigmas[0]:
        return 0.0
    if target >= log_sigmas[-1]:
        return float(model_sigmas.shape[0] - 1)
    high = int(torch.searchsorted(log_sigmas, torch.tensor(target, dtype=torch.float64)))
    low = high - 1
    w = (target - float(log_sigmas[low])) / float(log_sigmas[high] - log_sigmas[low])
    return low + w


def uniform_sigmas(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """The model's own spacing ("Automatic" without default, "Uniform"): t from T-1 to 0."""
    t = torch.linspace(model_sigmas.shape[0] - 1, 0, _check_n(n), dtype=torch.float64)
    return _append_zero(timestep_to_sigma(t, model_sigmas))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) Eq. 5: ``sigma^(1/rho)`` spaced linearly from max to min."""
    ramp = torch.linspace(0, 1, _check_n(n), dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas spaced linearly in log sigma from max to min."""
    log_sigmas = torch.linspace(
        math.log(sigma_max), math.log(sigma_min), _check_n(n), dtype=torch.float64
    )
    return _append_zero(log_sigmas.exp())


def polyexponential_sigmas(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0
) -> torch.Tensor:
    """Log sigma interpolated from max to min along the ramp ``(1 - i / (n - 1)) ** rho``."""
    ramp = torch.linspace(1, 0, _check_n(n), dtype=torch.float64) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return _append_zero((ramp * (log_max - log_min) + log_min).exp())


def sgm_uniform_sigmas(
    n: int, model_sigmas: torch.Tensor, sigma_min: float, sigma_max: float
) -> torch.Tensor:
    """Timesteps spaced linearly from sigma_max's to sigma_min's, the last one dropped."""
    start = sigma_to_timestep(sigma_max, model_sigmas)
    end = sigma_to_timestep(sigma_min, model_sigmas)
    t = torch.linspace(start, end, _check_n(n) + 1, dtype=torch.float64)[:-1]
    return _append_zero(timestep_to_sigma(t, model_sigmas))


def normal_sigmas(
    n: int, model_sigmas: torch.Tensor, sigma_min: float, sigma_max: float
) -> torch.Tensor:
    """Timesteps spaced linearly from sigma_max's to sigma_min's, both ends included."""
    start = sigma_to_timestep(sigma_max, model_sigmas)
    end = sigma_to_timestep(sigma_min, model_sigmas)
    t = torch.linspace(start, end, _check_n(n), dtype=torch.float64)
    return _append_zero(timestep_to_sigma(t, model_sigmas))


def simple_sigmas(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Every (T / n)-th model sigma counted down from the largest."""
    stride = model_sigmas.shape[0] / _check_n(n)
    picks = [model_sigmas[-(1 + int(i * stride))] for i in range(n)]
    return _append_zero(torch.stack(picks).double())


def ddim_uniform_sigmas(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """The WebUIs' "DDIM" scheduler: model sigmas at 1, 1 + k, 1 + 2k, ... (k = T // n), reversed.

    For T = 1000 and 20 steps the first sigma is the one of timestep 951. When n does not
    divide T the WebUIs' schedule has more than n + 1 values (e.g. 33 sigmas for 32 steps);
    that is kept.
    """
    stride = max(model_sigmas.shape[0] // _check_n(n), 1)
    indices = torch.arange(1, model_sigmas.shape[0], stride).flip(0)
    return _append_zero(model_sigmas.double()[indices])


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas spaced linearly in arctan(sigma) from max to min (n + 1 points, last is sigma_min).

    Matches the WebUIs, whose "KL Optimal" ends on sigma_min rather than on 0.
    """
    frac = torch.arange(_check_n(n) + 1, dtype=torch.float64) / n
    return torch.tan(frac * math.atan(sigma_min) + (1 - frac) * math.atan(sigma_max))


def beta_sigmas(
    n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6
) -> torch.Tensor:
    """Lee et al. (2024, arXiv 2407.12173): sigma at Beta(alpha, beta) quantiles of 1 - i/(n-1).

    The WebUIs' defaults are alpha = beta = 0.6.
    """
    levels = [1 - i / (n - 1) for i in range(n)] if _check_n(n) > 1 else [1.0]
    quantiles = torch.tensor([_beta_ppf(q, alpha, beta) for q in levels], dtype=torch.float64)
    return _append_zero(sigma_min + quantiles * (sigma_max - sigma_min))


def align_your_steps_sigmas(n: int, table: tuple[float, ...]) -> torch.Tensor:
    """NVIDIA's Align Your Steps: the fixed ``table``, log-linearly resampled to n points."""
    if _check_n(n) == len(table):
        return _append_zero(torch.tensor(table, dtype=torch.float64))
    log_table = torch.tensor(table, dtype=torch.float64).log()
    positions = torch.linspace(0, len(table) - 1, n, dtype=torch.float64)
    low = positions.floor().long().clamp(max=len(table) - 2)
    w = positions - low
    return _append_zero(((1 - w) * log_table[low] + w * log_table[low + 1]).exp())


def turbo_sigmas(n: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Forge's "Turbo": model sigmas at timesteps round(k * T / n - 1), k = n..1."""
    steps = model_sigmas.shape[0]
    t = (torch.arange(_check_n(n), 0, -1, dtype=torch.float64) * (steps / n) - 1).round()
    return _append_zero(timestep_to_sigma(t.clamp(0, steps - 1), model_sigmas))


@dataclass(frozen=True)
class Scheduler:
    """A WebUI scheduler: internal name, UI label, and the hosts that offer it."""

    name: str
    label: str
    hosts: tuple[str, ...] = ("A1111", "Forge")


#: The schedulers of AUTOMATIC1111 1.10 and Forge, in their UI order ("Automatic" excluded:
#: it resolves to the sampler's default scheduler, see :func:`kdiffusion_sigmas`).
SCHEDULERS: tuple[Scheduler, ...] = (
    Scheduler("uniform", "Uniform"),
    Scheduler("karras", "Karras"),
    Scheduler("exponential", "Exponential"),
    Scheduler("polyexponential", "Polyexponential"),
    Scheduler("sgm_uniform", "SGM Uniform"),
    Scheduler("kl_optimal", "KL Optimal"),
    Scheduler("align_your_steps", "Align Your Steps"),
    Scheduler("simple", "Simple"),
    Scheduler("normal", "Normal"),
    Scheduler("ddim", "DDIM"),
    Scheduler("beta", "Beta"),
    Scheduler("turbo", "Turbo", ("Forge",)),
    Scheduler("align_your_steps_GITS", "Align Your Steps GITS", ("Forge",)),
    Scheduler("align_your_steps_11", "Align Your Steps 11", ("Forge",)),
    Scheduler("align_your_steps_32", "Align Your Steps 32", ("Forge",)),
)
SCHEDULER_NAMES = tuple(s.name for s in SCHEDULERS)


def scheduler_sigmas(
    name: str,
    n: int,
    model_sigmas: torch.Tensor,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    is_sdxl: bool = False,
) -> torch.Tensor:
    """Schedule of the scheduler ``name`` for ``n`` steps, as the WebUIs build it.

    ``sigma_min``/``sigma_max`` default to the model's range (the WebUIs' "sigma min/max"
    options override them); ``is_sdxl`` picks the SDXL Align Your Steps tables.
    """
    lo = float(model_sigmas[0]) if sigma_min is None else sigma_min
    hi = float(model_sigmas[-1]) if sigma_max is None else sigma_max
    family = "sdxl" if is_sdxl else "sd15"
    match name:
        case "uniform":
            return uniform_sigmas(n, model_sigmas)
        case "karras":
            return karras_sigmas(n, lo, hi)
        case "exponential":
            return exponential_sigmas(n, lo, hi)
        case "polyexponential":
            return polyexponential_sigmas(n, lo, hi)
        case "sgm_uniform":
            return sgm_uniform_sigmas(n, model_sigmas, lo, hi)
        case "kl_optimal":
            return kl_optimal_sigmas(n, lo, hi)
        case "align_your_steps" | "align_your_steps_11":
            return align_your_steps_sigmas(n, AYS_SIGMAS[family])
        case "simple":
            return simple_sigmas(n, model_sigmas)
        case "normal":
            return normal_sigmas(n, model_sigmas, lo, hi)
        case "ddim":
            return ddim_uniform_sigmas(n, model_sigmas)
        case "beta":
            return beta_sigmas(n, lo, hi)
        case "turbo":
            return turbo_sigmas(n, model_sigmas)
        case "align_your_steps_GITS":
            return align_your_steps_sigmas(n, AYS_GITS_SIGMAS[family])
        case "align_your_steps_32":
            return align_your_steps_sigmas(n, AYS_32_SIGMAS[family])
    known = ", ".join(SCHEDULER_NAMES)
    raise ValueError(f"unknown scheduler {name!r}; known: {known}")


def kdiffusion_sigmas(
    scheduler: str,
    steps: int,
    model_sigmas: torch.Tensor,
    *,
    default_scheduler: str | None = None,
    discard_next_to_last_sigma: bool = False,
    is_sdxl: bool = False,
) -> torch.Tensor:
    """The schedule a WebUI k-diffusion sampler gets for ``steps`` steps (model's sigma range).

    ``scheduler`` is a scheduler name or "automatic" (then the sampler's
    ``default_scheduler``, else the model's uniform spacing). With
    ``discard_next_to_last_sigma`` (DPM2, DPM2 a, DPM++ 3M SDE, or the "Always discard
    next-to-last sigma" option) the WebUI builds ``steps + 1`` sigmas and drops the
    second-to-last, which can move the first sigma of step-count dependent schedules.
    """
    name = default_scheduler if scheduler == "automatic" else scheduler
    n = _check_n(steps) + (1 if discard_next_to_last_sigma else 0)
    if name is None:
        sigmas = uniform_sigmas(n, model_sigmas)
    else:
        sigmas = scheduler_sigmas(name, n, model_sigmas, is_sdxl=is_sdxl)
    if discard_next_to_last_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def lcm_model_sigmas(model_sigmas: torch.Tensor, original_steps: int = 50) -> torch.Tensor:
    """The WebUIs' LCM sampler's sigma table: every (T / 50)-th sigma ending at t = T - 1."""
    skip = model_sigmas.shape[0] // original_steps
    return model_sigmas[skip - 1 :: skip]


def webui_timesteps(steps: int, *, discard_next_to_last_sigma: bool = False) -> torch.Tensor:
    """Ascending VP timesteps of the WebUIs' DDIM, DDIM CFG++ and PLMS samplers.

    ``1, 1 + k, 1 + 2k, ...`` below 1000 with ``k = 1000 // steps``; sampling starts at the
    last one (951 for 20 steps, 751 for 4). UniPC ignores them and starts at 999.
    """
    n = _check_n(steps) + (1 if discard_next_to_last_sigma else 0)
    return (torch.arange(0, 1000, 1000 // n) + 1).clamp(0, 999)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.double(), sigmas.new_zeros(1, dtype=torch.float64)])


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of steps must be an int >= 1, got {n!r}")
    return n


def _beta_ppf(q: float, alpha: float, beta: float) -> float:
    """Quantile of the Beta(alpha, beta) distribution by bisection on its CDF."""
    if q <= 0:
        return 0.0
    if q >= 1:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        if _beta_cdf(mid, alpha, beta) < q:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def _beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta function I_x(a, b) (continued fraction, Lentz's method)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _beta_cdf(1.0 - x, b, a)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a
