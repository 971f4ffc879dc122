"""The GPU-only truths of One More Step, on one NVIDIA GPU, random weights, no network.

    python tools/gpu_check.py                      # a CUDA machine: a few minutes on one GPU
    python tools/gpu_check.py --device cpu --tiny  # the CPU-runnable checks, small (in CI)

One line per check, ``PASS``/``FAIL``/``SKIP`` with its figures; exit status 1 on any FAIL.
Without a CUDA device (and without ``--device cpu``) every check is SKIP and it exits 0.

1. precision: the start latent x_T of OMS-B (module + SD 2.1's ViT-H text encoder) in fp16 and
   bf16 against fp32 (relative error, target <= 1e-2).
2. autocast / manual_cast: OMS in fp32 inside ``torch.autocast`` and inside A1111's
   ``manual_cast(fp16)`` class-wide forward swap, run through ``a1111.own_precision``, gives the
   fp32 start (<= 1e-5); the figure without it shows what the WebUI's cast would have done.
3. vram: memory held between generations (module, encoder, cached prompt states) and the peak
   of the OMS step at 512x512 and 1024x1024, from ``torch.cuda.memory_allocated`` /
   ``max_memory_allocated``, against the README's table (held within 3 %, peaks within 10 %).
4. offload: ``ModelCache.offload`` returns every byte of it to the GPU (within 1 MiB).
5. out of memory: a generation whose OMS load runs out of GPU memory (on the CPU: a simulated
   out-of-memory error) is still sampled, with "OMS skipped: out of memory" in its infotext,
   and the next one applies OMS again.
6. speed: an fp16 OMS-B forward (a CFG pair at 512x512) against diffusers'
   ``UNet2DConditionModel`` at the OMS-B config with the same weights (<= 1.0), the text
   encoder, and OMS's share of a 20-step SD1.5 512x512 and SDXL 1024x1024 generation (the
   UNet steps with CFG, random weights of the real architectures; <= 0.5 %).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oms_ext import load_oms, oms_start  # noqa: E402
from oms_ext.loading import OMSModel  # noqa: E402
from oms_ext.schedules import sd_alphas_cumprod  # noqa: E402
from oms_ext.text import SD2_OMS_LAYERS, ClipPromptEncoder  # noqa: E402
from oms_ext.unet import build_unet, packaged_config  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "oms-tiny"
CONFIGS = ROOT / "oms_ext" / "configs"
PROMPT = "a lone candle in a pitch black room"
OMS_CFG = 2.0
MIB = 2**20
#: The README's VRAM table (tools/vram_budget.py): held between generations, and the peak of
#: the OMS step at 512x512 / 1024x1024, MiB.
README_HELD_MIB = 943
README_PEAK_MIB = {64: 978, 128: 1081}
#: Targets.
MAX_HALF_ERROR = 1e-2
MAX_CAST_ERROR = 1e-5
MAX_SHARE = 0.005
SD_STEPS = 20
#: SD1.5's and SDXL's UNets (diffusers configs of runwayml/stable-diffusion-v1-5 and
#: stabilityai/stable-diffusion-xl-base-1.0), built with random weights.
SD15_UNET = {"cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64}
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


class Report:
    """Prints one line per check and counts the failures."""

    def __init__(self) -> None:
        self.failed = 0

    def line(self, status: str, name: str, detail: str) -> None:
        self.failed += status == "FAIL"
        print(f"{status} {name}: {detail}", flush=True)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.line("PASS" if ok else "FAIL", name, detail)

    def skip(self, name: str, why: str) -> None:
        self.line("SKIP", name, why)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64."""
    ref64 = ref.double().cpu()
    return ((got.double().cpu() - ref64).norm() / ref64.norm()).item()


def random_fill(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """N(0, 0.02) weights, norm weights 1 + N(0, 0.02), on the module's device; returned."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0.0, 0.02, generator=gen)
            if name.endswith("weight") and p.ndim == 1:
                p.add_(1.0)
    return module.eval().requires_grad_(False)


def oms_model(
    device: torch.device, tiny: bool, config_name: str = "oms_b_openclip_15_21"
) -> OMSModel:
    """An fp32 OMS model on ``device``: the test fixture (``tiny``), else a released module's
    architecture with SD 2.1's ViT-H text encoder (23 layers, as OMS reads it), random weights."""
    if tiny:
        return load_oms(FIXTURE, device=device)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    config = packaged_config(config_name)
    with torch.device("meta"):
        unet = build_unet(config)
    unet = random_fill(unet.to_empty(device=device), seed=0)
    text_config = CLIPTextConfig.from_json_file(str(CONFIGS / "sd21_text_encoder.config.json"))
    with torch.device(device):
        text = random_fill(CLIPTextModel(text_config), seed=1)
    tokenizer = CLIPTokenizer.from_pretrained(str(FIXTURE / "tokenizer"))
    encoder = ClipPromptEncoder(text, tokenizer, num_layers=SD2_OMS_LAYERS, owns_model=True)
    if unet.cfg.cross_attention_dim != encoder.hidden_size:  # the SDXL module reads 2048 wide
        raise ValueError(f"{config_name} does not read SD 2.1's encoder")
    return OMSModel(unet, encoder, config, Path(config_name), owns_text_encoder=True)


def converted(model: OMSModel, dtype: torch.dtype) -> OMSModel:
    """A copy of ``model`` in ``dtype`` (module and text encoder)."""
    return copy.deepcopy(model).to(dtype=dtype)


def start(model: OMSModel, latent: int, device: torch.device) -> torch.Tensor:
    """x_T (Eq. 20, s = 0) at t = 999 from seeded unit noise, as float32."""
    gen = torch.Generator(device=device).manual_seed(7)
    x_S = torch.randn(1, model.unet.cfg.in_channels, latent, latent, generator=gen, device=device)
    model.prompt_cache.clear()
    x0 = model.predict_x0(x_S, [PROMPT], OMS_CFG)
    return oms_start(x0, x_S, float(sd_alphas_cumprod()[-1])).float()


def check_precision(report: Report, reference: OMSModel, device: torch.device, latent: int) -> None:
    ref = start(reference, latent, device)
    dtypes = [torch.bfloat16] if device.type == "cpu" else [torch.float16, torch.bfloat16]
    for dtype in dtypes:
        error = rel_error(start(converted(reference, dtype), latent, device), ref)
        report.check(
            f"precision {str(dtype).removeprefix('torch.')}",
            error <= MAX_HALF_ERROR,
            f"start latent vs fp32 {error:.2e} (target <= {MAX_HALF_ERROR:g})",
        )


@contextlib.contextmanager
def webui_autocast(device: torch.device) -> Iterator[None]:
    """``torch.autocast("cuda")`` as A1111 samples in it (the CPU's, in bf16, on the CPU)."""
    if device.type == "cuda":
        with torch.autocast("cuda"):
            yield
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield


def check_casts(report: Report, reference: OMSModel, device: torch.device, latent: int) -> None:
    from oms_ext.webui import a1111
    from tests.webui_standins import A1111Devices

    ref = start(reference, latent, device)
    devices = A1111Devices("manual_cast", torch.float16)
    casts: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
        "autocast": lambda: webui_autocast(device),
        "manual_cast fp16": lambda: devices.manual_cast(torch.float16),
    }
    for name, cast in casts.items():
        with cast():
            # a copy: manual_cast rounds the weights of the layers it runs, in place (it casts
            # them to fp16 and back around each call)
            overridden = rel_error(start(copy.deepcopy(reference), latent, device), ref)
            with a1111.own_precision(devices):
                error = rel_error(start(reference, latent, device), ref)
        report.check(
            f"{name} around OMS in fp32",
            error <= MAX_CAST_ERROR,
            f"start latent vs fp32 {error:.1e} (target <= {MAX_CAST_ERROR:g}; "
            f"{overridden:.1e} without own_precision)",
        )


def check_memory(report: Report, reference: OMSModel, device: torch.device) -> None:
    """Held bytes, peaks and offload of an fp16 model in the extension's cache, on CUDA."""
    from oms_ext.runtime.cache import CacheKey, ModelCache

    if device.type != "cuda":
        for name in ("vram held", "vram peak", "offload"):
            report.skip(name, "needs a CUDA device")
        return
    host_copy = converted(reference, torch.float16).to(device="cpu")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    cache = ModelCache()
    key = CacheKey("oms-b", str(device), "float16", "module")
    model = cache.get(key, lambda: host_copy)
    model.encode([PROMPT, ""])  # the cached states of a generation's prompt and negative
    held = (torch.cuda.memory_allocated(device) - base) / MIB
    report.check(
        "vram held",
        abs(held - README_HELD_MIB) <= 0.03 * README_HELD_MIB,
        f"{held:.0f} MiB between generations (README {README_HELD_MIB} MiB)",
    )
    for latent, readme in README_PEAK_MIB.items():
        torch.cuda.reset_peak_memory_stats(device)
        x_S = torch.randn(1, 4, latent, latent, device=device)
        model.predict_x0(x_S, [PROMPT], OMS_CFG)
        peak = (torch.cuda.max_memory_allocated(device) - base) / MIB
        report.check(
            f"vram peak {latent * 8}x{latent * 8}",
            abs(peak - readme) <= 0.10 * readme,
            f"{peak:.0f} MiB during the step (README {readme} MiB)",
        )
        del x_S
    freed = cache.offload() / MIB
    left = (torch.cuda.memory_allocated(device) - base) / MIB
    report.check("offload", left <= 1.0, f"moved {freed:.0f} MiB off the GPU, {left:.1f} MiB left")


@contextlib.contextmanager
def memory_exhausted(device: torch.device) -> Iterator[None]:
    """No memory left for OMS: on CUDA the allocator is capped near zero; on the CPU (CI) the
    module load raises the out-of-memory error CUDA would."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1e-9, device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return
    from oms_ext.runtime import provider

    def out_of_memory(*args: object, **kwargs: object) -> OMSModel:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated on the CPU)")

    real_load, provider.load_oms = provider.load_oms, out_of_memory
    try:
        yield
    finally:
        provider.load_oms = real_load


def check_out_of_memory(report: Report, device: torch.device) -> None:
    """A generation through the A1111 stand-in whose OMS load runs out of memory."""
    import tempfile

    from oms_ext.runtime.cache import ModelCache
    from oms_ext.webui.glue import Host, OMSController
    from tests import webui_standins as wi

    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder)
        wi.install_tiny_module(models / "oms")
        dtype = "fp16" if device.type == "cuda" else "fp32"
        opts = SimpleNamespace(sgm_noise_multiplier=False, oms_dtype=dtype)
        host = Host("a1111", opts, SimpleNamespace(), device, models, models, True)
        host.log, host.cache = (lambda _: None), ModelCache()
        controller = OMSController(host)

        def generate() -> dict:
            p = wi.Txt2Img(sampler_factory=lambda: wi.KDiffusionSampler(opts=opts))
            p.scripts = wi.ScriptRunner(controller, "1.10", [True, "", "", 2.0, "oms_tiny"])
            wi.process_images(p)
            return p.infotexts[0]

        with memory_exhausted(device):
            full = generate()
        again = generate()
    skipped = "out of memory" in str(full.get("OMS skipped", ""))
    report.check(
        "out of memory",
        skipped and "OMS alpha_bar0" in again,
        f"full GPU: {full.get('OMS skipped', 'not skipped')!r}; next generation "
        f"{'applies OMS' if 'OMS alpha_bar0' in again else 'does not apply OMS'}",
    )


def cuda_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Mean seconds of ``fn`` on the GPU (CUDA events, after two warm-up calls)."""
    for _ in range(2):
        fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1000 / repeats


def diffusers_unet(config: dict, device: torch.device) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return random_fill(unet, seed=2).half()


def check_speed(report: Report, reference: OMSModel, device: torch.device) -> None:
    names = ("speed vs diffusers", "speed text encoder", "share SD1.5 512x512", "share SDXL 1024")
    if device.type != "cuda":
        for name in names:
            report.skip(name, "needs a CUDA device")
        return
    try:
        import diffusers  # noqa: F401
    except ImportError:
        for name in names:
            report.skip(name, "needs diffusers (pip install -r requirements-test.txt)")
        return
    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark import diffusers_reference

    model = converted(reference, torch.float16)
    ref = diffusers_reference(copy.deepcopy(reference.unet).cpu()).to(device).half()
    context = model.encode(["", PROMPT])
    x = torch.randn(1, 4, 64, 64, device=device, dtype=torch.float16)
    pair, t0 = x.expand(2, -1, -1, -1), torch.zeros(2, device=device)
    with torch.no_grad():
        ours = cuda_seconds(functools.partial(model.unet, x, context), 20)
        theirs = cuda_seconds(functools.partial(ref, pair, t0, context), 20)
    report.check(
        "speed vs diffusers",
        ours / theirs <= 1.0,
        f"OMS-B fp16 CFG pair 512x512 {ours * 1e3:.2f} ms, diffusers {theirs * 1e3:.2f} ms, "
        f"ratio {ours / theirs:.3f} (target <= 1)",
    )
    del ref
    text = cuda_seconds(functools.partial(model.text_encoder, [PROMPT]), 20)
    report.line("INFO", "speed text encoder", f"ViT-H fp16, one prompt: {text * 1e3:.2f} ms")
    for name, config, latent, width, extra in (
        ("share SD1.5 512x512", SD15_UNET, 64, 768, None),
        ("share SDXL 1024", SDXL_UNET, 128, 2048, "sdxl"),
    ):
        unet = diffusers_unet(config, device)
        xb = torch.randn(2, 4, latent, latent, device=device, dtype=torch.float16)
        cond = torch.randn(2, 77, width, device=device, dtype=torch.float16)
        added = None
        if extra:
            added = {
                "text_embeds": torch.randn(2, 1280, device=device, dtype=torch.float16),
                "time_ids": torch.randn(2, 6, device=device, dtype=torch.float16),
            }
        t = torch.full((2,), 999.0, device=device)
        xs = torch.randn(1, 4, latent, latent, device=device)
        with torch.no_grad():
            step = cuda_seconds(functools.partial(unet, xb, t, cond, added_cond_kwargs=added), 3)
            oms = cuda_seconds(functools.partial(model.predict_x0, xs, [PROMPT], OMS_CFG), 5)
        share = oms / (oms + SD_STEPS * step)
        report.check(
            name,
            share <= MAX_SHARE,
            f"OMS step {oms * 1e3:.1f} ms (cached prompt), {SD_STEPS} UNet steps with CFG "
            f"{SD_STEPS * step:.2f} s: {share:.2%} (target <= {MAX_SHARE:.1%})",
        )
        del unet
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--tiny", action="store_true", help="the test fixture instead of OMS-B (fast; for CI)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = Report()
    if device.type == "cuda" and not torch.cuda.is_available():
        for name in ("precision", "casts", "memory", "out of memory", "speed"):
            report.skip(name, "no CUDA device here (run on a GPU, or pass --device cpu)")
        return 0
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        memory = props.total_memory / 2**30
        print(f"device: {props.name}, {memory:.0f} GiB, torch {torch.__version__}")
    started = time.time()
    latent = 8 if args.tiny else 64
    reference = oms_model(device, args.tiny)
    with torch.no_grad():
        check_precision(report, reference, device, latent)
        check_casts(report, reference, device, latent)
        if args.tiny:
            for name in ("vram held", "vram peak", "offload", "speed"):
                report.skip(name, "measured on OMS-B only (without --tiny)")
        else:
            check_memory(report, reference, device)
            check_speed(report, reference, device)
    check_out_of_memory(report, device)
    print(f"done in {time.time() - started:.0f} s, {report.failed} failed", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
