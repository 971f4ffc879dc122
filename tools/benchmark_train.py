"""Training throughput of ``python -m oms_ext.train``'s step, against the machine's limits.

Prints, never asserts; ratios carry PASS/FAIL against their targets. In one run:

1. One training step (forward, backward, AdamW) of OMS-S and OMS-B in fp32 at 64x64 latents
   (512 px), batch ``--batch`` (default 8), with 77 text states of the SD2.1 width (1024):
   images/s, the FLOPs of forward + backward (``torch.utils.flop_counter``, CPU attention and
   its backward included) over the step time, against the same run's fp32 matrix-multiply
   probe (``tools/benchmark.py``'s: 2048^3 through MKL and oneDNN). Target: OMS-B >= 0.6 of
   the probe. Rounds are interleaved (probe, OMS-S, OMS-B), medians reported.
2. Latent caching against encoding every step: the SD VAE's encoder (random weights at the real
   size, diffusers ``AutoencoderKL`` with SD's config, fp32) on one 512x512 image, as a
   multiple of the OMS-S and OMS-B training time per image. Caching pays that once per image
   (twice: the image and its mirror), instead of once per image per step.
3. The README's toy example on this machine: 12 images through the SD VAE at 256 px (encoded
   with their mirrors) and 200 OMS-S steps of 4 at 32x32 latents, estimated from timed calls.
4. Where a GPU is at hand (CUDA), section 1 there too. Section 1 also prints the time the
   paper's schedule (2,000 steps of 512) would take at the measured images/s.

Usage: python tools/benchmark_train.py [--rounds 3] [--batch 8] [--threads N] [--skip vae toy]
On a machine shared with other jobs use ``--threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchmark import gemm_probe, load_average, machine  # noqa: E402

from oms_ext.train import module_config  # noqa: E402
from oms_ext.unet import build_unet, count_parameters  # noqa: E402

TEXT_WIDTH = 1024
CONTEXT = 77
TARGET_OMS_B = 0.6
PAPER_STEPS, PAPER_BATCH = 2000, 512
TOY_IMAGES, TOY_STEPS, TOY_BATCH, TOY_PX = 12, 200, 4, 256


def training_step(size: str, batch: int, side: int, device: str) -> tuple[Callable[[], None], Any]:
    """A closure running one training step of preset ``size`` (and the model)."""
    torch.manual_seed(0)
    model = build_unet(module_config(size, TEXT_WIDTH)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    x_s = torch.randn(batch, 4, side, side, generator=gen).to(device)
    target = torch.randn(batch, 4, side, side, generator=gen).to(device)
    context = torch.randn(batch, CONTEXT, TEXT_WIDTH, generator=gen).to(device)

    def step() -> None:
        loss = F.mse_loss(model(x_s, context), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, (model, x_s, context, target)


def forward_backward_flops(model: torch.nn.Module, x_s, context, target) -> int:
    """FLOPs of one forward + backward (multiply-add = 2), CPU attention included."""
    from torch.utils import flop_counter

    mapping = {}
    ops = torch.ops.aten
    forward = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:

        def fwd(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
            return flop_counter.sdpa_flop_count(q, k, v)

        mapping[forward] = fwd  # FlopCounterMode wraps it (passes out_shape)
    if backward is not None:

        def bwd(grad: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
            return flop_counter.sdpa_backward_flop_count(grad, q, k, v)

        mapping[backward] = bwd
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        F.mse_loss(model(x_s, context), target).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def wall(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_steps(rounds: int, batch: int, device: str) -> dict[str, float]:
    """Section 1 (and 4): images/s and efficiency of OMS-S / OMS-B steps; returns images/s."""
    probe = gemm_probe(torch.float32) if device == "cpu" else _cuda_probe()
    steps = {name: training_step(name, batch, 64, device) for name in ("oms-s", "oms-b")}
    flops = {name: forward_backward_flops(*parts) for name, (_, parts) in steps.items()}
    for fn, _ in steps.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    probes = []
    for _ in range(rounds):
        probes.append(probe())
        for name, (fn, _) in steps.items():
            times[name].append(wall(fn, device))
    peak = statistics.median(probes)
    print(
        f"\n1. training step, fp32, 64x64 latents, batch {batch}, {device}: probe "
        f"{peak:.1f} GFLOP/s"
    )
    rates = {}
    for name, (_, parts) in steps.items():
        seconds = statistics.median(times[name])
        achieved = flops[name] / seconds / 1e9
        rates[name] = batch / seconds
        ratio = achieved / peak
        mark = f" (target >= {TARGET_OMS_B}: {'PASS' if ratio >= TARGET_OMS_B else 'FAIL'})"
        print(
            f"   {name.upper()}: {count_parameters(parts[0]) / 1e6:.1f} M params, "
            f"{flops[name] / batch / 1e9:.1f} GFLOP per image fwd+bwd, {seconds:.3f} s/step, "
            f"{rates[name]:.2f} images/s, {achieved:.1f} GFLOP/s = {ratio:.2f} of the probe"
            + (mark if name == "oms-b" else "")
        )
    for name, rate in rates.items():
        days = PAPER_STEPS * PAPER_BATCH / rate / 86400
        print(
            f"   {name.upper()}: the paper's {PAPER_STEPS} x {PAPER_BATCH} schedule would take "
            f"{days:.2f} days ({days * 24:.1f} h) here (module only, cached latents)"
        )
    return rates


def _cuda_probe() -> Callable[[], float]:
    n = 8192
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")

    def probe() -> float:
        best = min(wall(lambda: torch.mm(a, b), "cuda") for _ in range(3))
        return 2 * n**3 / best / 1e9

    return probe


def sd_vae_encoder_seconds(px: int, rounds: int) -> float:
    """Median seconds of the SD VAE's encoder (real size, random weights) on one image."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    ).eval()
    image = torch.rand(1, 3, px, px) * 2 - 1
    with torch.no_grad():
        vae.encode(image)
        return statistics.median(
            wall(lambda: vae.encode(image).latent_dist.mean, "cpu") for _ in range(rounds)
        )


def bench_vae(rates: dict[str, float], rounds: int) -> None:
    seconds = sd_vae_encoder_seconds(512, rounds)
    print(
        f"\n2. latent caching: the SD VAE encoder takes {seconds:.2f} s per 512x512 image "
        f"(fp32, CPU)"
    )
    for name, rate in rates.items():
        print(
            f"   = {seconds * rate:.1f}x the {name.upper()} training time per image: encoding "
            f"every step would make a step {1 + seconds * rate:.1f}x as long; the cache pays "
            f"it twice per image (image and mirror), once"
        )


def bench_toy(rounds: int) -> None:
    vae = sd_vae_encoder_seconds(TOY_PX, rounds)
    step, _ = training_step("oms-s", TOY_BATCH, TOY_PX // 8, "cpu")
    step()
    seconds = statistics.median(wall(step, "cpu") for _ in range(max(rounds, 5)))
    cache = 2 * TOY_IMAGES * vae
    train = TOY_STEPS * seconds
    print(
        f"\n3. README toy example: caching {TOY_IMAGES} images at {TOY_PX} px "
        f"{cache:.0f} s, {TOY_STEPS} OMS-S steps of {TOY_BATCH} at "
        f"{TOY_PX // 8}x{TOY_PX // 8} {train:.0f} s ({seconds:.3f} s/step): about "
        f"{(cache + train) / 60:.1f} min plus loading"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=("vae", "toy"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}\nload average before: {load_average()}")
    rates = bench_steps(args.rounds, args.batch, "cpu")
    if "vae" not in args.skip:
        bench_vae(rates, args.rounds)
    if "toy" not in args.skip:
        bench_toy(args.rounds)
    if torch.cuda.is_available():
        bench_steps(args.rounds, args.batch, "cuda")
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
