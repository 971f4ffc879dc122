"""Command-line demo of the OMS core, no WebUI needed: ``python -m oms_ext.demo``.

It runs the whole OMS step on the CPU for a few WebUI sampler starts and prints what happens
to the starting latent. Without ``--module`` it uses the small random-weight module shipped
for the tests, and says so: its numbers show that the pipeline runs, not what a trained
module would do to an image.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from oms_ext.loading import load_oms
from oms_ext.schedules import sd_alphas_cumprod
from oms_ext.spaces import SamplerStart, noise_for_sampler, start_alpha_bar
from oms_ext.step import oms_start

RANDOM_TEST_MODULE = Path(__file__).resolve().parents[1] / "tests" / "data" / "oms-tiny"


def _starts() -> list[tuple[str, SamplerStart]]:
    """A few typical SD1.5 starts at 20 steps (sigma values in k-diffusion sigma space)."""
    acp = sd_alphas_cumprod()
    sigma_max = float(((1 - acp[-1]) / acp[-1]).sqrt())
    return [
        ("Euler a / Automatic", SamplerStart.from_sigmas(torch.tensor([sigma_max, 0.0]))),
        (
            "Euler a / Automatic, SGM noise multiplier",
            SamplerStart.from_sigmas(torch.tensor([sigma_max, 0.0]), sgm_noise_multiplier=True),
        ),
        ("DDIM, 20 steps (t0 = 951)", SamplerStart.from_timestep(951, acp)),
        ("UniPC (t0 = 999)", SamplerStart.from_timestep(999, acp)),
    ]


def _channel_means(x: torch.Tensor) -> str:
    return " ".join(f"{v:+.3f}" for v in x.float().mean(dim=(0, 2, 3)).tolist())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", type=Path, default=None, help="OMS module folder or file")
    parser.add_argument("--prompt", default="a dark night sky, pitch black")
    parser.add_argument("--negative", default="")
    parser.add_argument("--cfg", type=float, default=2.0, help="OMS CFG (w_psi, Eq. 21)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    path = args.module or RANDOM_TEST_MODULE
    if args.module is None:
        print(f"No --module given: using the RANDOM-WEIGHT test module in {path}.")
        print("Its numbers only show that the OMS pipeline runs; they mean nothing visually.\n")
    model = load_oms(path)

    shape = (1, 4, args.height // 8, args.width // 8)
    x_s = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    x0_hat = model.predict_x0(x_s, [args.prompt], args.cfg, [args.negative])
    print(f"prompt {args.prompt!r}, OMS CFG {args.cfg}, latent {list(shape)}")
    print(f"x_S (the seed's unit noise), channel means: {_channel_means(x_s)}")
    print(f"x0_hat = -psi_cfg(x_S, C),  channel means: {_channel_means(x0_hat)}\n")
    for name, start in _starts():
        alpha_bar = start_alpha_bar(start)
        x_t = oms_start(x0_hat, x_s, alpha_bar)
        handed = noise_for_sampler(x_t, start)
        print(f"{name}: alpha_bar0 = {alpha_bar:.6f}")
        print(f"    x_T (VP, Eq. 20) channel means: {_channel_means(x_t)}")
        print(f"    noise handed to the sampler, std {handed.std().item():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
