"""Cost of One More Step next to one base-model step (CPU, random weights; prints, never asserts).

Compares in one run:
* the OMS-B module (the released SD1.5/2.1 architecture, 154M parameters) at batch B (one
  conditional pass) and at batch 2B (the guided OMS step: unconditional + conditional rows);
* one step of an SD1.5-sized base UNet (diffusers UNet2DConditionModel, SD1.5 config) at
  batch 2B, i.e. one sampler step with CFG as the WebUIs run it;
* SD2.1's OpenCLIP ViT-H text encoder (transformers CLIPTextModel, 23 layers, shipped config)
  encoding B prompts + B negatives;
* loading the OMS-B module weights from a warm page cache (released fp16 file, loaded as fp32
  and as fp16);
* peak resident memory of the process after each stage.

Usage: python tools/benchmark.py [--batch 2] [--height 64] [--width 64] [--repeats 3]
[--warmup 1] [--base-repeats 1]
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


def timed(fn: Callable[[], object], repeats: int, warmup: int) -> float:
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


def current_rss() -> str:
    try:
        import psutil
    except ImportError:
        return "n/a (psutil not installed)"
    return f"{psutil.Process().memory_info().rss / 2**30:.2f} GiB (psutil)"


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


def bench_oms(b: int, h: int, w: int, rep: dict[str, int]) -> tuple[float, float, float]:
    """(module forward at batch b, OMS step with CFG at batch 2b, warm-cache load) in s."""
    gen = torch.Generator().manual_seed(0)
    oms_config = packaged_config(OMS_B)
    oms = random_weights(lambda: build_unet(oms_config))
    print(f"\nOMS-B module: {count_parameters(oms):,} parameters")
    x = torch.randn(b, 4, h, w, generator=gen)
    ctx = torch.randn(b, 77, 1024, generator=gen)
    t_mod = timed(lambda: oms(x, ctx), **rep)
    # As OMSModel.predict_x0 runs it: one pass, latent shared by the uncond/cond contexts.
    t_oms = timed(lambda: oms(x, torch.cat([ctx, ctx])), **rep)
    print(f"  module forward at batch {b}:            {t_mod * 1000:8.1f} ms")
    print(f"  OMS step with CFG (batch {2 * b}):          {t_oms * 1000:8.1f} ms")
    print(f"  peak RSS: {peak_rss_gib():.2f} GiB (resource.ru_maxrss)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / MODULE_FOLDER).mkdir()
        (folder / MODULE_FOLDER / "config.json").write_text(json.dumps(oms_config))
        weights = folder / MODULE_FOLDER / WEIGHT_FILE_NAMES[1]
        save_file({k: v.half().contiguous() for k, v in oms.state_dict().items()}, str(weights))
        size_mb = weights.stat().st_size / 1e6
        loads = {}
        for dtype in (torch.float32, torch.float16):
            load_module(folder, dtype=dtype)  # warms the page cache
            loads[dtype] = min(
                timed(lambda d=dtype: load_module(folder, dtype=d), repeats=1, warmup=0)
                for _ in range(3)
            )
    print(f"\nload OMS-B module from warm cache ({size_mb:.0f} MB fp16 file), min of 3:")
    print(f"  as fp32: {loads[torch.float32] * 1000:8.1f} ms")
    print(f"  as fp16: {loads[torch.float16] * 1000:8.1f} ms")
    return t_mod, t_oms, loads[torch.float32]


def bench_text(b: int, rep: dict[str, int]) -> float:
    """Seconds to encode b prompts + b negatives with a random-weight ViT-H text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_json_file(str(CONFIGS / "sd21_text_encoder.config.json"))
    torch.manual_seed(0)
    text = CLIPTextModel(config).eval().requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (2 * b, 77), generator=torch.Generator())
    t_text = timed(lambda: text(input_ids=ids).last_hidden_state, **rep)
    print(
        f"\nViT-H text encoder ({count_parameters(text):,} parameters, "
        f"{config.num_hidden_layers} layers), {b} prompts + {b} negatives "
        f"(random token ids; tokenizing not timed): {t_text * 1000:8.1f} ms"
    )
    print(f"  peak RSS: {peak_rss_gib():.2f} GiB (resource.ru_maxrss)")
    return t_text


def bench_base(b: int, h: int, w: int, rep: dict[str, int]) -> float:
    """Seconds for one SD1.5-sized UNet step with CFG (batch 2b)."""
    from diffusers import UNet2DConditionModel

    gen = torch.Generator().manual_seed(1)
    base = random_weights(lambda: UNet2DConditionModel(**SD15_UNET))
    x = torch.randn(2 * b, 4, h, w, generator=gen)
    ctx = torch.randn(2 * b, 77, 768, generator=gen)
    t_base = timed(lambda: base(x, 500, encoder_hidden_states=ctx).sample, **rep)
    print(
        f"\nSD1.5-sized base UNet ({count_parameters(base):,} parameters), one step with CFG "
        f"(batch {2 * b}): {t_base * 1000:8.1f} ms"
    )
    print(f"  peak RSS: {peak_rss_gib():.2f} GiB (resource.ru_maxrss); now {current_rss()}")
    return t_base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="images per batch (B)")
    parser.add_argument("--height", type=int, default=64, help="latent height (px / 8)")
    parser.add_argument("--width", type=int, default=64, help="latent width (px / 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--base-repeats",
        type=int,
        default=1,
        help="timed base-UNet steps (one takes about a minute on 2 CPU cores at 64x64, batch 4)",
    )
    args = parser.parse_args(argv)
    b, h, w = args.batch, args.height, args.width
    rep = {"repeats": args.repeats, "warmup": args.warmup}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32, batch B={b}, "
        f"latent {h}x{w} ({h * 8}x{w * 8} px), median of {args.repeats} "
        f"({args.base_repeats} for the base UNet) after {args.warmup} warm-up"
    )
    print(f"peak RSS at start: {peak_rss_gib():.2f} GiB (resource.ru_maxrss)")
    t_mod, t_oms, load = bench_oms(b, h, w, rep)
    t_text = bench_text(b, rep)
    t_base = bench_base(b, h, w, {**rep, "repeats": args.base_repeats})

    r_mod = t_oms / t_base
    r_text = (t_oms + t_text) / t_base
    print("\nratios and targets")
    print(f"  module forward at batch {b} / base step:     {t_mod / t_base:6.3f}x")
    print(
        f"  OMS step with CFG / base step:             {r_mod:6.3f}x   "
        f"target <= {TARGET_MODULE}x  {verdict(r_mod, TARGET_MODULE)}"
    )
    print(f"  ViT-H text encoder / base step:            {t_text / t_base:6.3f}x")
    print(
        f"  OMS step with CFG + text encoder / base:   {r_text:6.3f}x   "
        f"target <= {TARGET_MODULE_AND_TEXT}x  {verdict(r_text, TARGET_MODULE_AND_TEXT)}"
    )
    print(
        f"  OMS-B load (fp32, warm cache):             {load:6.3f} s    "
        f"target <= {TARGET_LOAD_S} s  {verdict(load, TARGET_LOAD_S)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
