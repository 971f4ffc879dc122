"""VRAM One More Step needs on a GPU, per setting, for the released OMS-B modules.

Usage: ``python tools/vram_budget.py`` (about a minute on a 2-core CPU).

The held part uses the accounting the tests check (``OMSModel.tensors()``: the module's
weights and buffers, an own text encoder's, the cached text states), at the released fp16
precision: OMS-B (the SD1.x/2.x and the SDXL module share the architecture) and SD 2.1's ViT-H
text encoder. The peak adds the activations of one guided OMS forward (batch 2: prompt and
negative), measured with PyTorch's memory profiler on the CPU in bfloat16, which has fp16's
2 bytes per element; GPU attention kernels keep the same order of memory. Nothing here needs
a GPU or the real weights (random weights of the real shapes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oms_ext.unet import OMSUNet, UNetConfig, packaged_config

#: Latent sizes of the images OMS starts (VAE downsampling 8); SD1.x, SD2.x and SDXL alike.
IMAGES = (("512x512", 64), ("1024x1024", 128))
#: SD 2.1's ViT-H text encoder, 23 layers as OMS reads it (the config the package ships).
VIT_H: dict = json.loads(
    (Path(__file__).resolve().parents[1] / "oms_ext" / "configs" / "sd21_text_encoder.config.json")
    .read_text()
)
MIB = 2**20


def parameter_bytes(module: torch.nn.Module, bytes_per_element: int = 2) -> int:
    """Bytes of the module's parameters and buffers at ``bytes_per_element`` (fp16: 2)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() for t in tensors) * bytes_per_element


def module_and_encoder_bytes() -> tuple[int, int]:
    """fp16 bytes of OMS-B and of the ViT-H text encoder, built on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = OMSUNet(UNetConfig.from_dict(packaged_config("oms_b_openclip_15_21")))
        encoder = CLIPTextModel(CLIPTextConfig.from_dict(VIT_H))
    return parameter_bytes(unet), parameter_bytes(encoder)


def activation_peak(latent: int) -> int:
    """Peak bytes allocated beyond the weights during one guided forward of OMS-B (batch 2,
    ``latent`` x ``latent``), bf16 on the CPU."""
    config = UNetConfig.from_dict(packaged_config("oms_b_openclip_15_21"))
    unet = OMSUNet(config).to(torch.bfloat16).eval().requires_grad_(False)
    x = torch.randn(1, 4, latent, latent, dtype=torch.bfloat16)
    context = torch.randn(2, 77, config.cross_attention_dim, dtype=torch.bfloat16)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        unet(x, context)
    # Each op's own allocations, and frees (negative "[memory]" events), in time order.
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    module, encoder = module_and_encoder_bytes()
    states = 2 * 77 * VIT_H["hidden_size"] * 2  # prompt + "" negative, fp16
    print(f"OMS-B module (fp16): {module / MIB:.0f} MiB")
    print(f"ViT-H text encoder (fp16): {encoder / MIB:.0f} MiB")
    peaks = {image: activation_peak(latent) for image, latent in IMAGES}
    rows = (  # setting, held between generations, weights resident during the step
        ("keep on GPU between generations", module + encoder + states, module + encoder),
        ("auto, normal VRAM: kept", module + encoder + states, module + encoder),
        ("auto, --medvram/--lowvram: encoder on the CPU, freed", 0, module),
        ("free after each generation", 0, module + encoder),
        ("OMS off (any setting)", 0, 0),
    )
    head = " | ".join(f"peak during the OMS step, {image}" for image, _ in IMAGES)
    print(f"| setting | held between generations | {head} |")
    print("|---|---|" + "---|" * len(IMAGES))
    for setting, between, resident in rows:
        cells = " | ".join(
            f"{(resident + states + peaks[image]) / MIB:.0f} MiB" if resident else "0 MiB"
            for image, _ in IMAGES
        )
        print(f"| {setting} | {between / MIB:.0f} MiB | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
