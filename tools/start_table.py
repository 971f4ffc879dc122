"""Print (or write into the README) where every WebUI sampler and scheduler starts sampling.

For SD1.5 at 20 steps, each sampler x scheduler pair of AUTOMATIC1111 1.10 and Forge gets the
VP alpha_bar of its real first step (the alpha_bar OMS must use), computed with
``oms_ext.schedules`` and ``oms_ext.spaces``. A second table lists, per distinct start, the
factor that ``noise_for_sampler`` applies to the OMS x_T with the SGM noise multiplier off/on.

Usage: ``python tools/start_table.py`` prints the markdown; ``--write`` replaces the block
between ``<!-- start-table:begin -->`` and ``<!-- start-table:end -->`` in README.md.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oms_ext import schedules, spaces

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- start-table:begin -->"
END = "<!-- start-table:end -->"
STEPS = 20


@dataclass(frozen=True)
class WebUISampler:
    """How a WebUI sampler picks its start (facts from A1111 1.10.1 and Forge's sampler lists)."""

    label: str
    kind: str = "kdiffusion"  # "kdiffusion", "timestep" (WebUI timesteps) or "unipc"
    default_scheduler: str | None = None
    discard_next_to_last_sigma: bool = False
    starts_at_sigma_max: bool = False  # DPM fast / adaptive ignore the schedule's first sigma
    lcm_table: bool = False  # LCM samples on every 20th model sigma
    forge_only: bool = False


SAMPLERS = (
    WebUISampler("DPM++ 2M", default_scheduler="karras"),
    WebUISampler("DPM++ SDE", default_scheduler="karras"),
    WebUISampler("DPM++ 2M SDE", default_scheduler="exponential"),
    WebUISampler("DPM++ 2M SDE Heun", default_scheduler="exponential"),
    WebUISampler("DPM++ 2S a", default_scheduler="karras"),
    WebUISampler(
        "DPM++ 3M SDE", default_scheduler="exponential", discard_next_to_last_sigma=True
    ),
    WebUISampler("Euler a"),
    WebUISampler("Euler"),
    WebUISampler("LMS"),
    WebUISampler("Heun"),
    WebUISampler("DPM2", default_scheduler="karras", discard_next_to_last_sigma=True),
    WebUISampler("DPM2 a", default_scheduler="karras", discard_next_to_last_sigma=True),
    WebUISampler("DPM fast", starts_at_sigma_max=True),
    WebUISampler("DPM adaptive", starts_at_sigma_max=True),
    WebUISampler("Restart", default_scheduler="karras"),
    WebUISampler("LCM", lcm_table=True),
    WebUISampler("HeunPP2", forge_only=True),
    WebUISampler("IPNDM", forge_only=True),
    WebUISampler("IPNDM_V", forge_only=True),
    WebUISampler("DEIS", forge_only=True),
    WebUISampler("DDPM", forge_only=True),
    WebUISampler("DDIM", kind="timestep"),
    WebUISampler("DDIM CFG++", kind="timestep"),
    WebUISampler("PLMS", kind="timestep"),
    WebUISampler("UniPC", kind="unipc"),
)


@functools.cache
def sampler_start(
    sampler: WebUISampler, scheduler: str, *, always_discard: bool = False
) -> spaces.SamplerStart:
    """Where the WebUI starts ``sampler`` with ``scheduler`` for SD1.5 at STEPS steps."""
    ac = schedules.sd_alphas_cumprod()
    discard = sampler.discard_next_to_last_sigma or always_discard
    if sampler.kind == "unipc":
        return spaces.SamplerStart.from_timestep(ac.shape[0] - 1, ac)
    if sampler.kind == "timestep":
        t0 = int(schedules.webui_timesteps(STEPS, discard_next_to_last_sigma=discard)[-1])
        return spaces.SamplerStart.from_timestep(t0, ac)
    model_sigmas = schedules.model_sigmas_from_alphas_cumprod(ac)
    table = schedules.lcm_model_sigmas(model_sigmas) if sampler.lcm_table else model_sigmas
    sigmas = schedules.kdiffusion_sigmas(
        scheduler,
        STEPS,
        table,
        default_scheduler=sampler.default_scheduler,
        discard_next_to_last_sigma=discard,
    )
    sampler_sigma0 = float(model_sigmas[-1]) if sampler.starts_at_sigma_max else None
    return spaces.SamplerStart.from_sigmas(
        sigmas, alphas_cumprod=ac, sampler_sigma0=sampler_sigma0
    )


def _scales_noise_elsewhere(start: spaces.SamplerStart) -> bool:
    return start.noise_sigma is not None and not math.isclose(
        start.noise_sigma, start.sigma0, rel_tol=1e-6
    )


def _cell(start: spaces.SamplerStart) -> str:
    text = f"{spaces.start_alpha_bar(start):.6f}"
    return text + "\\*" if _scales_noise_elsewhere(start) else text


def _header(names: list[str]) -> str:
    labels = {
        s.name: s.label + (" (F)" if s.hosts == ("Forge",) else "") for s in schedules.SCHEDULERS
    }
    cols = ["Automatic", *(labels[n] for n in names)]
    return "| sampler | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols)


def sampler_table() -> str:
    """Wide table: alpha_bar at the first step for every sampler x scheduler pair."""
    names = list(schedules.SCHEDULER_NAMES)
    lines = [_header(names)]
    for sampler in SAMPLERS:
        cells = [_cell(sampler_start(sampler, n)) for n in ("automatic", *names)]
        label = sampler.label + (" (F)" if sampler.forge_only else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, sampler in (
        ("any other k-diffusion sampler, discard option on", WebUISampler("Euler")),
        ("DDIM, DDIM CFG++, PLMS, discard option on", WebUISampler("DDIM", kind="timestep")),
    ):
        cells = [
            _cell(sampler_start(sampler, n, always_discard=True)) for n in ("automatic", *names)
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def distinct_starts_table() -> str:
    """One row per distinct start: sigma0, nearest timestep, alpha_bar and the noise factors."""
    seen: dict[str, spaces.SamplerStart] = {}
    for sampler in SAMPLERS:
        for name in ("automatic", *schedules.SCHEDULER_NAMES):
            for discard in (False, True):
                start = sampler_start(sampler, name, always_discard=discard)
                sigma0 = spaces.alpha_bar_to_sigma(spaces.start_alpha_bar(start))
                seen.setdefault(f"{sigma0:.4f}", start)
    lines = [
        "| sigma0 | nearest t | alpha_bar0 | x_T factor, SGM multiplier off | SGM on / timestep |",
        "|---|---|---|---|---|",
    ]
    for key in sorted(seen, key=float, reverse=True):
        start = seen[key]
        abar = spaces.start_alpha_bar(start)
        sigma0 = spaces.alpha_bar_to_sigma(abar)
        off = math.sqrt(1 + sigma0**2) / sigma0
        lines.append(
            f"| {key} | {spaces.nearest_timestep(start)} | {abar:.6f} | {off:.6f} | 1 |"
        )
    return "\n".join(lines)


def render() -> str:
    """The markdown block kept between the README markers."""
    return "\n".join(
        [
            f"<!-- generated by tools/start_table.py (SD1.5, {STEPS} steps); do not edit -->",
            "",
            sampler_table(),
            "",
            "(F) = Forge only. \\* = DPM fast/adaptive integrate from the model's sigma_max but "
            "the WebUI scales the noise by the schedule's first sigma; `noise_for_sampler` "
            "corrects for that. \"Discard option\" = the setting \"Always discard next-to-last "
            "sigma\" (DPM2, DPM2 a and DPM++ 3M SDE always do it). A zero-terminal-SNR model or "
            "setting starts at sigma0 ~ 4500 (alpha_bar ~ 5e-8): OMS changes nothing there.",
            "",
            distinct_starts_table(),
            "",
            "x_T factor: what `noise_for_sampler` multiplies the OMS x_T (VP space) by before "
            "handing it back as the WebUI's noise; the WebUI then scales it by sigma0 (or "
            "sqrt(1 + sigma0^2) with the SGM noise multiplier; timestep samplers use it as is).",
        ]
    )


def readme_block(text: str) -> str:
    """The text between the start-table markers of README text (markers excluded)."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md must contain {BEGIN} followed by {END}")
    return text[begin + len(BEGIN) : end].strip("\n")


def write_readme(path: Path = README) -> None:
    text = path.read_text(encoding="utf-8")
    readme_block(text)  # validates the markers
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{render()}\n{END}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the README block")
    args = parser.parse_args()
    if args.write:
        write_readme()
    else:
        print(render())


if __name__ == "__main__":
    main()
