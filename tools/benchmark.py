"""Cost of One More Step next to one base-model step (CPU, random weights; prints, never asserts).

Compares in one run:
* the OMS-B module (the released SD1.5/2.1 architecture, 154M parameters) at batch B (one
  conditional pass) and at batch 2B (the guided OMS step: unconditional + conditional rows);
* one step of an SD1.5-sized base UNet (diffusers UNet2DConditionModel, SD1.5 config) at
  batch 2B, i.e. one sampler step with CFG as the WebUIs run it;
* SD2.1's OpenCLIP ViT-H text encoder (transformers CLIPTextModel, 23 layers, shipped config)
  on the rows ``OMSModel.predict_x0`` encodes the first time it sees B different prompts with
  the default empty negative (B + 1 rows), and with B distinct negatives (2B rows);
* loading the OMS-B module weights from a warm page cache (released fp16 file, loaded as fp32
  and as fp16);
* peak resident memory of the process after each stage.

Usage: python tools/benchmark.py [--batch 2] [--height 64] [--width 64] [--rounds 3]
(sizes are latent sizes: 64 = 512 px). diffusers and transformers must be installed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oms_ext.loading import MODULE_FOLDER, WEIGHT_FILE_NAMES, load_module
from oms_ext.unet import build_unet, count_parameters, packaged_config

CONFIGS = Path(__file__).resolve().parents[1] / "oms_ext" / "configs"
OMS_B = "oms_b_openclip_15_21"

#: SD1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json values).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}

TARGET_MODULE = 0.15
TARGET_MODULE_AND_TEXT = 0.22
TARGET_LOAD_S = 1.0


def random_weights(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build on the meta device, allocate, fill N(0, 0.02): random weights without slow init.

    Only for modules without buffers (their contents would stay uninitialised).
    """
    with torch.device("meta"):
        module = build()
    if any(True for _ in module.buffers()):
        raise ValueError("random_weights: the module has buffers; build it normally")
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module.eval().requires_grad_(False)


def timed(fn: Callable[[], object], repeats: int = 1, warmup: int = 0) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` untimed calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_gib() -> float:
    """Peak resident set size of this process (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


def build_oms() -> torch.nn.Module:
    oms = random_weights(lambda: build_unet(packaged_config(OMS_B)))
    print(
        f"OMS-B module: {count_parameters(oms):,} parameters; "
        f"peak RSS {peak_rss_gib():.2f} GiB (ru_maxrss)"
    )
    return oms


def build_text() -> tuple[torch.nn.Module, int]:
    """SD2.1's ViT-H text encoder (shipped config, random weights) and its layer count."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_json_file(str(CONFIGS / "sd21_text_encoder.config.json"))
    torch.manual_seed(0)
    text = CLIPTextModel(config).eval().requires_grad_(False)
    print(
        f"ViT-H text encoder: {count_parameters(text):,} parameters, "
        f"{config.num_hidden_layers} layers; peak RSS {peak_rss_gib():.2f} GiB"
    )
    return text, config.vocab_size


def build_base() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    base = random_weights(lambda: UNet2DConditionModel(**SD15_UNET))
    print(
        f"SD1.5-sized base UNet: {count_parameters(base):,} parameters; "
        f"peak RSS {peak_rss_gib():.2f} GiB"
    )
    return base


def bench_load(oms: torch.nn.Module) -> dict[torch.dtype, float]:
    """Seconds to load the OMS-B module from a warm page cache (released fp16 file), min of 3."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / MODULE_FOLDER).mkdir()
        (folder / MODULE_FOLDER / "config.json").write_text(json.dumps(packaged_config(OMS_B)))
        weights = folder / MODULE_FOLDER / WEIGHT_FILE_NAMES[1]
        save_file({k: v.half().contiguous() for k, v in oms.state_dict().items()}, str(weights))
        loads = {}
        for dtype in (torch.float32, torch.float16):
            load_module(folder, dtype=dtype)  # warms the page cache
            loads[dtype] = min(
                timed(lambda d=dtype: load_module(folder, dtype=d)) for _ in range(3)
            )
    return loads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="images per batch (B)")
    parser.add_argument("--height", type=int, default=64, help="latent height (px / 8)")
    parser.add_argument("--width", type=int, default=64, help="latent width (px / 8)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds; each times every workload once (a base step with CFG takes "
        "20-60 s on 2 CPU cores at 64x64)",
    )
    args = parser.parse_args(argv)
    b, h, w = args.batch, args.height, args.width
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32, batch B={b}, "
        f"latent {h}x{w} ({h * 8}x{w * 8} px); {args.rounds} interleaved rounds after one "
        "warm-up round; ratios are medians of per-round ratios, so load from other processes "
        "affects both sides of each ratio alike\n"
    )
    oms, (text, vocab), base = build_oms(), build_text(), build_base()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, h, w, generator=gen)
    ctx = torch.randn(b, 77, 1024, generator=gen)
    # predict_x0 encodes each distinct text once: B different prompts + the default "" negative.
    ids = torch.randint(0, vocab, (b + 1, 77), generator=gen)
    ids_worst = torch.randint(0, vocab, (2 * b, 77), generator=gen)
    x_base = torch.randn(2 * b, 4, h, w, generator=gen)
    ctx_base = torch.randn(2 * b, 77, 768, generator=gen)
    workloads: dict[str, Callable[[], object]] = {
        f"OMS module forward, batch {b}": lambda: oms(x, ctx),
        # As OMSModel.predict_x0 runs it: one pass, latent shared by the uncond/cond contexts.
        f"OMS step with CFG ({b} latents x 2 contexts)": lambda: oms(x, torch.cat([ctx, ctx])),
        f"ViT-H text encoder, {b} prompts + empty negative": lambda: text(input_ids=ids)[0],
        f"ViT-H text encoder, {b} prompts + {b} negatives": lambda: text(input_ids=ids_worst)[0],
        f"base UNet step with CFG, batch {2 * b}": lambda: base(
            x_base, 500, encoder_hidden_states=ctx_base
        ).sample,
    }
    names = list(workloads)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(args.rounds + 1):
        for name in names:
            t = timed(workloads[name])
            if round_ > 0:
                times[name].append(t)
    print(f"\npeak RSS after all runs: {peak_rss_gib():.2f} GiB (resource.ru_maxrss)\n")
    for name in names:
        print(f"  {name:48s} {statistics.median(times[name]) * 1000:9.1f} ms (median)")

    def ratio(*parts: str) -> float:
        base_t = times[names[4]]
        return statistics.median(
            sum(times[p][i] for p in parts) / base_t[i] for i in range(len(base_t))
        )

    r_fwd, r_cfg = ratio(names[0]), ratio(names[1])
    r_text, r_all = ratio(names[2]), ratio(names[1], names[2])
    r_worst = ratio(names[1], names[3])
    loads = bench_load(oms)
    print("\nratios to one base step with CFG (median over rounds) and targets")
    print(
        f"  one OMS forward (batch {b}) / base step:       {r_fwd:6.3f}x   "
        f"target <= {TARGET_MODULE}x  {verdict(r_fwd, TARGET_MODULE)}"
    )
    print(
        f"  OMS step with CFG / base step:               {r_cfg:6.3f}x   (w != 1 adds the "
        "unconditional branch)"
    )
    print(f"  ViT-H text encoder (first use) / base step:  {r_text:6.3f}x")
    print(
        f"  OMS step with CFG + text encoder / base:     {r_all:6.3f}x   "
        f"target <= {TARGET_MODULE_AND_TEXT}x  {verdict(r_all, TARGET_MODULE_AND_TEXT)}"
    )
    print(
        f"    same with {b} distinct negatives too:       {r_worst:6.3f}x   (repeated prompts "
        "and the empty negative come from OMSModel's prompt cache: text cost 0)"
    )
    print(
        f"  OMS-B load (fp32, warm cache):               {loads[torch.float32]:6.3f} s    "
        f"target <= {TARGET_LOAD_S} s  {verdict(loads[torch.float32], TARGET_LOAD_S)}"
    )
    print(f"  OMS-B load (fp16, warm cache):               {loads[torch.float16]:6.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
