"""Cost of One More Step on the CPU: against the machine's limits and against a whole image.

Prints, never asserts. Every ratio is printed with PASS/FAIL against its target, together with
the machine it ran on (CPU model, cores, torch version, load average before and after). In
one run:

1. Module throughput, per latent size (default 64x64 and 128x128, i.e. 512 and 1024 px), at
   batch 2 (one CFG pair): the FLOPs of the OMS-B module (``torch.utils.flop_counter``, CPU
   attention included), its fp32 time next to a diffusers ``UNet2DConditionModel`` built at the
   OMS-B config with the same weights (its time embedding zeroed, output checked equal first)
   and next to an fp32 matrix-multiply probe (2048 x 2048 x 2048, best of 3 through MKL and
   oneDNN) run in the same rounds: achieved GFLOP/s over probe GFLOP/s is the efficiency.
   Where the CPU multiplies bf16 in hardware (``oms_ext.precision.cpu_bf16_is_fast``), the
   bf16 module against fp32.
2. bf16 accuracy on the test fixture (tests/data/oms-tiny): distance of the bf16 start latent
   x_T (Eq. 20) from the fp32 one, ``||x_T_bf16 - x_T_fp32|| / ||x_T_fp32||`` over each case's
   whole batch, worst case; the same for the module's prediction x0_hat.
3. End to end, 64x64 latents: ``OMSModel.predict_x0`` for one image with OMS CFG 2 (cached
   prompt; a new prompt, the ViT-H text encoder run on it while the empty negative is cached,
   as in every generation after a session's first; and first use, the encoder run on both) as
   a fraction of a 20-step SD1.5 512x512 generation with CFG, i.e. 20 steps of an SD1.5-sized
   UNet at batch 2, the SD VAE decoder at 512x512 and SD1.5's CLIP text encoder on the prompt
   and the negative (diffusers / transformers, random weights, fp32, as the WebUIs run SD on
   a CPU; the sampler's own arithmetic is left out, which makes the fraction larger).
4. First use: loading OMS-B and its ViT-H text encoder (real-size random weights stored as
   fp16 safetensors in the released folder layout) with ``oms_ext.load_oms`` from a warm page
   cache (the first load of each run warms it and is not counted), each load in a fresh
   interpreter so that it gets fresh memory, as a first use in a long-running WebUI does.

The models of sections 1 and 3 are the ones section 4 loads. Workloads are interleaved: every
round runs each once, ratios are medians of per-round ratios, so load from other processes
hits both sides of a ratio alike as long as our threads still get their cores; each section
prints the CPU share its timed work got (near 100 % when they did).

Usage: python tools/benchmark.py [--quick] [--sizes 64 128] [--rounds 3] [--threads N]
       [--skip module accuracy e2e load] [--tcmalloc]
``--quick`` = 64x64 only, one round each (under 3 minutes with one thread on a Zen 4 core; the
full run about 10). On a machine shared with other jobs use ``--threads 1``: PyTorch's threads
wait for each other at every operation, so a second thread on a busy core slows everything.
diffusers and transformers must be installed; open_clip too (tokenizer).

The C allocator matters on the CPU: glibc's malloc maps large blocks (above a threshold that grows
to at most 32 MB) afresh and returns them to the system when they are freed, and trims its heap,
so large activations are faulted in again at every forward (at 128x128, 1-1.6 GB per fp32 module
forward on the machine of the README; a few MB with tcmalloc).
The WebUIs' launch scripts (``webui.sh``, ``prepare_tcmalloc``) preload tcmalloc on Linux when
it is installed; ``--tcmalloc`` runs the benchmark the same way (found as they find it, through
``ldconfig -p``). The first line names the allocator in use.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oms_ext.loading import MODULE_FOLDER, WEIGHT_FILE_NAMES, OMSModel, load_oms  # noqa: E402
from oms_ext.precision import cpu_bf16_is_fast  # noqa: E402
from oms_ext.prompt_syntax import as_weighted  # noqa: E402
from oms_ext.step import oms_start  # noqa: E402
from oms_ext.text import _openclip_bpe_path, write_openclip_tokenizer_files  # noqa: E402
from oms_ext.train.encoders import CLIP_L_CONFIG  # noqa: E402
from oms_ext.unet import OMSUNet, count_parameters, packaged_config  # noqa: E402

CONFIGS = ROOT / "oms_ext" / "configs"
FIXTURE = ROOT / "tests" / "data" / "oms-tiny"
OMS_B = "oms_b_openclip_15_21"

#: SD1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json values).
SD15_UNET: dict[str, Any] = {
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
#: The SD VAE (stable-diffusion-v1-5 vae/config.json values).
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}
SD_STEPS = 20
OMS_CFG = 2.0
PROMPT = "a photo of a lighthouse on a rocky coast at sunset"
GEMM_N = 2048

# Targets (issue "OMS runs once per batch"): ratios, lower is better unless named otherwise.
TARGET_FP32_VS_REFERENCE = 1.0  # our fp32 time / diffusers fp32 time
TARGET_EFFICIENCY = 0.8  # achieved GFLOP/s / probe GFLOP/s, at least (idle machine)
TARGET_BF16_VS_FP32 = 0.7  # bf16 time / fp32 time
TARGET_BF16_REL_ERROR = 1e-2  # start latent, relative to fp32
TARGET_CACHED = 0.005  # OMS with a cached prompt / whole generation
TARGET_FIRST_USE = 0.01  # OMS on first use of a prompt / whole generation
TARGET_LOAD_S = 1.0  # module + text encoder, warm page cache


# ----------------------------------------------------------------------------- measuring


def machine() -> str:
    """CPU model, cores, torch version and CPU features, one line."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = "yes" if cpu_bf16_is_fast() else "no"
    return (
        f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, ATen CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}), bf16 matrix instructions: {bf16}"
    )


def allocator() -> str:
    """The C allocator of this process, as the first line of the report names it."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "the system's malloc"
    return "tcmalloc (preloaded)" if "libtcmalloc" in maps else "the system's malloc"


def find_tcmalloc() -> str | None:
    """Path of the tcmalloc library the WebUIs' ``webui.sh`` (``prepare_tcmalloc``) would
    preload: the first ``libtcmalloc_minimal.so.N`` or ``libtcmalloc.so.N`` ``ldconfig -p``
    lists."""
    path = "/sbin:/usr/sbin:" + os.environ.get("PATH", "")
    ldconfig = shutil.which("ldconfig", path=path)
    if ldconfig is None:
        return None
    try:
        listed = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in listed.stdout.splitlines():
        if re.search(r"libtcmalloc(_minimal|)\.so\.\d", line) and "=>" in line:
            return line.split("=>", 1)[1].strip()
    return None


def release_free_memory() -> None:
    """Give the memory this process has freed back to the system (glibc: ``malloc_trim``;
    tcmalloc keeps freed memory until ``MallocExtension_ReleaseFreeMemory``). Without it, under
    tcmalloc, the 2.8 GB freed after writing the test folder slowed each fresh interpreter's
    fp32 load from 0.8 to 2-3.5 s on the machine of the README."""
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return
    if hasattr(process, "MallocExtension_ReleaseFreeMemory"):
        process.MallocExtension_ReleaseFreeMemory()
    if hasattr(process, "malloc_trim"):
        process.malloc_trim(0)


def load_average() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        return "n/a"


#: Process CPU seconds and wall seconds x threads of every timed call, for :func:`cpu_share`.
_USAGE = {"cpu": 0.0, "capacity": 0.0}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn`` in seconds."""
    with torch.no_grad():
        cpu, start = _cpu_seconds(), time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    _USAGE["cpu"] += _cpu_seconds() - cpu
    _USAGE["capacity"] += wall * torch.get_num_threads()
    return wall


def cpu_share() -> float:
    """CPU time this process got during timed calls over (wall time x threads): near 1 on an
    idle machine; well below when other processes held cores and our threads waited."""
    return _USAGE["cpu"] / max(_USAGE["capacity"], 1e-9)


def run_rounds(
    workloads: dict[str, Callable[[], object]], rounds: int, warm: set[str]
) -> dict[str, list[float]]:
    """Time every workload once per round, interleaved; the names in ``warm`` get one untimed
    call first (the others cost tens of seconds, where first-call setup is noise)."""
    for name in workloads:
        if name in warm:
            timed(workloads[name])
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(rounds):
        for name, fn in workloads.items():
            times[name].append(timed(fn))
    return times


def per_round(times: dict[str, list[float]], fn: Callable[..., float], *names: str) -> float:
    """Median over rounds of ``fn(time of names[0], time of names[1], ...)`` in each round."""
    return statistics.median(fn(*vals) for vals in zip(*(times[n] for n in names), strict=True))


def verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "FAIL"


def gemm_probe(dtype: torch.dtype) -> Callable[[], float]:
    """Best-of-3 GFLOP/s of an n x n x n matrix product (n = GEMM_N), as a function.

    The product runs through both of PyTorch's CPU matrix libraries, ``torch.mm`` (MKL or
    OpenBLAS) and oneDNN (the same product as a 1x1 convolution over channels-last rows, the
    library our convolutions run on); the faster one counts.
    """
    n = GEMM_N
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    # Rows of a as 16 x (n/16) pixels with n channels, channels last; weight = b^T as 1x1 conv.
    pixels = a.view(16, 1, n // 16, n).permute(0, 3, 1, 2)
    kernel = b.t().contiguous().view(n, n, 1, 1)

    def probe() -> float:
        best = min(
            timed(fn)
            for fn in (lambda: torch.mm(a, b), lambda: F.conv2d(pixels, kernel))
            for _ in range(3)
        )
        return 2 * n**3 / best / 1e9

    return probe


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (multiply-add = 2), matrix products, convolutions and attention."""
    from torch.utils import flop_counter

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:  # the CPU attention kernel is not in the counter's own table

        def sdpa_flops(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
            return flop_counter.sdpa_flop_count(q, k, v)

        mapping[cpu_sdpa] = sdpa_flops  # FlopCounterMode wraps it (passes out_shape)
    with torch.no_grad(), flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as c:
        fn()
    return c.get_total_flops()


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` (Frobenius norms, in float64)."""
    ref64 = ref.double()
    return ((got.double() - ref64).norm() / ref64.norm()).item()


# ----------------------------------------------------------------------------- models


def random_fill(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """N(0, 0.02) weights and biases; norms get weight 1 + N(0, 0.02). In place, returned."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.02
            is_norm_weight = name.endswith("weight") and p.ndim == 1
            p.copy_(noise + 1.0 if is_norm_weight else noise)
    return module.eval().requires_grad_(False)


def write_oms_folder(folder: Path) -> None:
    """OMS-B and the SD 2.1 ViT-H text encoder, random weights, fp16, in the released layout
    (text encoder and tokenizer in subfolders the pointer files name with ``"."``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from oms_ext.unet import build_unet

    config = packaged_config(OMS_B)
    (folder / MODULE_FOLDER).mkdir(parents=True)
    (folder / MODULE_FOLDER / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        unet = build_unet(config)
    unet = random_fill(unet.to_empty(device="cpu"), seed=0)
    weights = {k: v.half() for k, v in unet.state_dict().items()}
    save_file(weights, str(folder / MODULE_FOLDER / WEIGHT_FILE_NAMES[1]))
    del unet, weights
    index = {
        "_class_name": "OMSPipeline",
        "oms_module": ["diffusers_patch.models.unet_2d_condition_woct", "UNet2DConditionWoCTModel"],
        "oms_text_encoder": ["transformers", "CLIPTextModel"],
        "oms_tokenizer": ["transformers", "CLIPTokenizer"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    for pointer, cls, sub in (
        ("oms_text_encoder", "CLIPTextModel", "text_encoder"),
        ("oms_tokenizer", "CLIPTokenizer", "tokenizer"),
    ):
        (folder / pointer).mkdir()
        (folder / pointer / "config.json").write_text(
            json.dumps({"_class_name": cls, "_name_or_path": ".", "subfolder": sub})
        )
    (folder / "text_encoder").mkdir()
    shutil.copy(CONFIGS / "sd21_text_encoder.config.json", folder / "text_encoder" / "config.json")
    text_config = CLIPTextConfig.from_json_file(str(CONFIGS / "sd21_text_encoder.config.json"))
    torch.manual_seed(0)
    text = CLIPTextModel(text_config)
    text_weights = {k: v.half() for k, v in text.state_dict().items() if "position_ids" not in k}
    save_file(text_weights, str(folder / "text_encoder" / "model.fp16.safetensors"))
    write_openclip_tokenizer_files(_openclip_bpe_path(), folder / "tokenizer")


def diffusers_reference(ours: OMSUNet) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel at the OMS-B config with the weights of ``ours`` (an
    OMS-B module), time embedding and time projections zeroed: the same function of (latent,
    text states)."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in packaged_config(OMS_B).items() if not k.startswith("_")}
    config.pop("subfolder", None)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref = ref.to_empty(device="cpu")
    ours_state = ours.state_dict()
    state = {}
    for name, tensor in ref.state_dict().items():
        if name in ours_state:
            state[name] = ours_state[name]
        elif name.startswith("time_embedding.") or ".time_emb_proj." in name:
            state[name] = torch.zeros_like(tensor)
        else:
            raise RuntimeError(f"diffusers reference: {name} has no counterpart in our module")
    ref.load_state_dict(state, strict=True)
    return ref.eval().requires_grad_(False)


def random_model(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    with torch.device("meta"):
        module = build()
    if any(True for _ in module.buffers()):
        raise ValueError("random_model: the module has buffers; build it normally")
    return random_fill(module.to_empty(device="cpu"), seed)


# ----------------------------------------------------------------------------- sections


#: Run in a fresh interpreter by :func:`bench_load`: prints the seconds load_oms took.
LOAD_SCRIPT = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[4]))
# Imported before the clock starts: a WebUI has transformers' CLIP classes loaded already.
from transformers import CLIPTextModel, CLIPTokenizer
from oms_ext.loading import load_oms
import oms_ext.text
start = time.perf_counter()
load_oms(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
print(time.perf_counter() - start)
"""


def bench_load(folder: Path, rounds: int, dtypes: list[torch.dtype]) -> dict[str, list[float]]:
    """Seconds to load module + text encoder with load_oms, per dtype, interleaved rounds.

    Each load runs in a fresh interpreter (imports not counted), so it gets fresh memory as a
    first use in a long-running WebUI does, rather than memory an earlier load freed.
    """
    def load(dtype: torch.dtype) -> float:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                LOAD_SCRIPT,
                str(ROOT),
                str(folder),
                str(dtype).removeprefix("torch."),
                str(torch.get_num_threads()),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.split()[-1])

    for dtype in dtypes:
        load(dtype)  # warms the page cache
    times: dict[str, list[float]] = {str(d): [] for d in dtypes}
    for _ in range(rounds):
        for dtype in dtypes:
            times[str(dtype)].append(load(dtype))
    return times


CFG32, PAIR32, REF32, CFG16 = (
    "ours fp32, CFG pass",
    "ours fp32, batch 2",
    "diffusers fp32, batch 2",
    "ours bf16, CFG pass",
)


def bench_module(
    models: dict[torch.dtype, OMSModel], size: int, rounds: int, report: list[str]
) -> None:
    """Section 1 at one latent size; appends result lines to ``report``.

    One CFG pair = one latent against two text states. diffusers (like the authors' pipeline)
    runs it as the batch ``cat[x, x]``; ours also runs that batch (same kernels: parity) and,
    as ``OMSModel.predict_x0`` does, as one latent whose text-free leading layers run once.
    """
    ours = models[torch.float32].unet
    ref = diffusers_reference(ours)
    gen = torch.Generator().manual_seed(size)
    x1 = torch.randn(1, 4, size, size, generator=gen)
    x2 = torch.cat([x1, x1])
    ctx = torch.randn(2, 77, ours.cfg.cross_attention_dim, generator=gen)
    with torch.no_grad():
        want = ref(x2, 0, encoder_hidden_states=ctx).sample
        same_batch = rel_error(ours(x2, ctx), want)
        cfg_pass = rel_error(ours(x1, ctx), want)
    with torch.device("meta"):
        meta = OMSUNet(ours.cfg)
        flops = {
            PAIR32: count_flops(lambda: meta(x2.to("meta"), ctx.to("meta"))),
            CFG32: count_flops(lambda: meta(x1.to("meta"), ctx.to("meta"))),
        }
    flops[REF32], flops[CFG16] = flops[PAIR32], flops[CFG32]
    probes = {"fp32": gemm_probe(torch.float32)}
    workloads: dict[str, Callable[[], object]] = {
        CFG32: lambda: ours(x1, ctx),
        PAIR32: lambda: ours(x2, ctx),
        REF32: lambda: ref(x2, 0, encoder_hidden_states=ctx).sample,
    }
    bf16 = torch.bfloat16 in models
    if bf16:
        ours16 = models[torch.bfloat16].unet
        x16, ctx16 = x1.bfloat16(), ctx.bfloat16()
        workloads[CFG16] = lambda: ours16(x16, ctx16)
        probes["bf16"] = gemm_probe(torch.bfloat16)
        with torch.no_grad():
            bf16_err = rel_error(ours16(x16, ctx16).float(), want)
    gflops: dict[str, list[float]] = {name: [] for name in probes}
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for fn in workloads.values():
        timed(fn)
    for _ in range(rounds):
        for name, probe in probes.items():
            gflops[name].append(probe())
        for name, fn in workloads.items():
            times[name].append(timed(fn))

    def ratio(a: str, b: str) -> float:
        return per_round(times, lambda x, y: x / y, a, b)

    def efficiency(name: str, probe: str) -> float:
        pairs = zip(times[name], gflops[probe], strict=True)
        return statistics.median(flops[name] / 1e9 / t / p for t, p in pairs)

    px = size * 8
    report.append(
        f"latent {size}x{size} ({px}x{px} px), one CFG pair (1 latent, 2 text states): "
        f"{flops[PAIR32] / 1e9:.1f} GFLOP as a batch of 2, {flops[CFG32] / 1e9:.1f} GFLOP with "
        "the text-free layers run once"
    )
    report.append(
        f"  diffusers UNet2DConditionModel, same weights, time embedding zeroed, batch "
        f"cat[x, x]; ours differs from it by {same_batch:.1e} (batch 2) and {cfg_pass:.1e} "
        "(CFG pass), relative"
    )
    for name in times:
        t = statistics.median(times[name])
        report.append(
            f"  {name:24s} {t:8.2f} s  {flops[name] / 1e9 / t:6.1f} GFLOP/s  (median of rounds)"
        )
    for name in gflops:
        report.append(
            f"  {name} matmul probe          {statistics.median(gflops[name]):6.1f} GFLOP/s  "
            f"({GEMM_N}^3, best of MKL and oneDNN x 3 per round)"
        )
    r_cfg, r_same = ratio(CFG32, REF32), ratio(PAIR32, REF32)
    report.append(
        f"  fp32 one CFG pair, ours / diffusers:  {r_cfg:6.3f}   target <= "
        f"{TARGET_FP32_VS_REFERENCE}   {verdict(r_cfg, TARGET_FP32_VS_REFERENCE)}"
    )
    report.append(
        f"    same batch of 2, ours / diffusers:  {r_same:6.3f}   (the same kernels: parity; "
        "the CFG pass gains by running the text-free layers once)"
    )
    eff = efficiency(PAIR32, "fp32")
    report.append(
        f"  fp32 efficiency, batch 2 / probe:     {eff:6.3f}   target >= {TARGET_EFFICIENCY}   "
        f"{verdict(eff, TARGET_EFFICIENCY, higher_is_better=True)}"
    )
    if bf16:
        r16 = ratio(CFG16, CFG32)
        report.append(
            f"  bf16 / fp32 time, CFG pass:           {r16:6.3f}   target <= "
            f"{TARGET_BF16_VS_FP32}   {verdict(r16, TARGET_BF16_VS_FP32)}"
        )
        report.append(
            f"  bf16 efficiency, CFG pass / probe:    {efficiency(CFG16, 'bf16'):6.3f}   (bf16 "
            f"output differs from fp32 by {bf16_err:.1e} relative)"
        )


def bench_accuracy(report: list[str]) -> None:
    """Section 2: bf16 against fp32 on the conformance fixture."""
    inputs = json.loads((FIXTURE / "inputs.json").read_text())
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    a = inputs["alpha_bar"]["t999"]
    models = {d: load_oms(FIXTURE, dtype=d) for d in (torch.float32, torch.bfloat16)}
    worst_xt, worst_x0 = 0.0, 0.0
    for case, spec in inputs["cases"].items():
        x_s, z = ref[f"{case}/x_T_S"], ref[f"{case}/noise_z"]
        for w in (1.0, 2.0):
            x0 = {d: m.predict_x0(x_s, spec["prompts"], w) for d, m in models.items()}
            for s in (0.0, math.sqrt(1 - a)):
                x_t = {d: oms_start(v, x_s, a, s=s, noise=z) for d, v in x0.items()}
                worst_xt = max(worst_xt, rel_error(x_t[torch.bfloat16], x_t[torch.float32]))
            worst_x0 = max(worst_x0, rel_error(x0[torch.bfloat16], x0[torch.float32]))
    report.append(
        f"  start latent x_T, bf16 vs fp32:    {worst_xt:.1e}  target <= {TARGET_BF16_REL_ERROR}"
        f"   {verdict(worst_xt, TARGET_BF16_REL_ERROR)}   (||x_T_bf16 - x_T_fp32|| / ||x_T_fp32||,"
        " worst of 2 cases x w in {1, 2} x s in {0, sqrt(1 - abar)}, abar at t = 999)"
    )
    report.append(
        f"  prediction x0_hat, bf16 vs fp32:   {worst_x0:.1e}  (x_T is mostly noise, which bf16 "
        "does not touch; this is the module's own error)"
    )


#: SD1.5's text encoder (openai/clip-vit-large-patch14 text tower, as in SD1.5's folder).
STEP, DECODE, ENCODE = "SD1.5 UNet step, batch 2", "SD VAE decode 512x512", "SD1.5 text encoder x2"


def bench_e2e(models: dict[torch.dtype, OMSModel], rounds: int, report: list[str]) -> None:
    """Section 3: OMS for one image against a 20-step SD1.5 512x512 generation with CFG."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    base = random_model(lambda: UNet2DConditionModel(**SD15_UNET), seed=1)
    vae = random_model(lambda: AutoencoderKL(**SD_VAE), seed=2)
    torch.manual_seed(3)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG)).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(7)
    x_base = torch.randn(2, 4, 64, 64, generator=gen)
    ctx_base = torch.randn(2, 77, 768, generator=gen)
    z = torch.randn(1, 4, 64, 64, generator=gen)
    ids = torch.randint(0, 49408, (2, 77), generator=gen)
    x_s = torch.randn(1, 4, 64, 64, generator=gen)
    workloads: dict[str, Callable[[], object]] = {
        STEP: lambda: base(x_base, 500, encoder_hidden_states=ctx_base),
        DECODE: lambda: vae.decode(z),
        ENCODE: lambda: clip(input_ids=ids),
    }
    for dtype, model in models.items():
        tag = "fp32" if dtype == torch.float32 else "bf16"

        def new_prompt(model: OMSModel = model) -> object:
            model.prompt_cache.pop(as_weighted(PROMPT), None)
            return model.predict_x0(x_s, PROMPT, OMS_CFG)

        def first(model: OMSModel = model) -> object:
            model.prompt_cache.clear()
            return model.predict_x0(x_s, PROMPT, OMS_CFG)

        workloads[f"OMS {tag}, cached prompt"] = lambda m=model: m.predict_x0(x_s, PROMPT, OMS_CFG)
        workloads[f"OMS {tag}, new prompt"] = new_prompt
        workloads[f"OMS {tag}, first use"] = first
    warm = {n for n in workloads if n != STEP and n != DECODE}
    times = run_rounds(workloads, rounds, warm)
    report.append(
        f"one 512x512 image, OMS CFG {OMS_CFG}: the module once on the latent against the empty "
        "negative and the prompt; a new prompt also runs the ViT-H encoder on the prompt (the "
        "negative cached, as after a session's first generation), first use on both"
    )
    for name, values in times.items():
        report.append(f"  {name:28s} {statistics.median(values):8.2f} s (median of rounds)")

    def fraction(oms: float, step: float, decode: float, encode: float) -> float:
        return oms / (SD_STEPS * step + decode + encode)

    gen_t = SD_STEPS * statistics.median(times[STEP])
    gen_t += statistics.median(times[DECODE]) + statistics.median(times[ENCODE])
    report.append(
        f"  generation = {SD_STEPS} UNet steps + VAE decode + text encoder (prompt and "
        f"negative): {gen_t:.1f} s; OMS as a fraction of it:"
    )
    auto = torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    for dtype in models:
        tag = "fp32" if dtype == torch.float32 else "bf16"
        mark = " (what 'auto' picks here)" if dtype == auto else ""
        for kind, target in (
            ("cached prompt", TARGET_CACHED),
            ("new prompt", TARGET_FIRST_USE),
            ("first use", TARGET_FIRST_USE),
        ):
            f = per_round(times, fraction, f"OMS {tag}, {kind}", STEP, DECODE, ENCODE)
            report.append(
                f"  OMS {tag}, {kind + ':':15s} {100 * f:6.2f} %   target <= {100 * target:.1f} %"
                f"   {verdict(f, target)}{mark}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64x64 only, one round each")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="latent sizes for section 1"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=["module", "accuracy", "e2e", "load"],
        help="sections to leave out",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument(
        "--tcmalloc",
        action="store_true",
        help="run with tcmalloc preloaded, as the WebUIs' webui.sh does on Linux",
    )
    args = parser.parse_args(argv)
    if args.tcmalloc and not allocator().startswith("tcmalloc"):
        lib = find_tcmalloc()
        if lib is None:
            parser.error(
                "--tcmalloc: no libtcmalloc found by 'ldconfig -p'; install it (Debian/Ubuntu: "
                "apt install libtcmalloc-minimal4) or leave the option out"
            )
        preload = " ".join(filter(None, (lib, os.environ.get("LD_PRELOAD"))))
        env = {**os.environ, "LD_PRELOAD": preload}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ([64] if args.quick else [64, 128])
    rounds = args.rounds or (1 if args.quick else 3)
    bf16 = cpu_bf16_is_fast()
    dtypes = [torch.float32, torch.bfloat16] if bf16 else [torch.float32]
    print(f"machine: {machine()}; allocator: {allocator()}")
    print(f"load average before: {load_average()}")
    print(
        f"{rounds} interleaved round(s); ratios are medians of per-round ratios"
        + ("" if bf16 else "; no bf16 matrix instructions: bf16 rows left out")
    )
    sys.stdout.flush()
    report: list[str] = []
    shown = 0

    def show(section_share: bool = True) -> None:
        """Print the report lines added since the last call (and the section's CPU share)."""
        nonlocal shown
        if section_share and _USAGE["capacity"] > 0:
            share = cpu_share()
            note = "" if share >= 0.85 else "; below 85 %: other processes held cores"
            report.append(f"  (CPU share of this section's timed work: {100 * share:.0f} %{note})")
        print("\n".join(report[shown:]), flush=True)
        shown = len(report)
        _USAGE.update(cpu=0.0, capacity=0.0)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_oms_folder(folder)
        if "load" not in args.skip:
            release_free_memory()
            loads = bench_load(folder, rounds, dtypes)
            report.append(
                "first use: OMS-B module + ViT-H text encoder from fp16 safetensors, warm cache, "
                "each load in a fresh interpreter"
            )
            for name, values in loads.items():
                t = statistics.median(values)
                tag = "fp32" if "float32" in name else "bf16"
                report.append(
                    f"  load as {tag}: {t:6.2f} s (median; min {min(values):.2f})   "
                    f"target <= {TARGET_LOAD_S} s   {verdict(t, TARGET_LOAD_S)}"
                )
            show(section_share=False)
        models = {d: load_oms(folder, dtype=d) for d in dtypes}
    unet = models[torch.float32].unet
    text = models[torch.float32].text_encoder
    print(
        f"OMS-B module {count_parameters(unet):,} parameters; ViT-H text encoder "
        f"{count_parameters(text.model):,} parameters",
        flush=True,
    )
    if "accuracy" not in args.skip:
        report.append("bf16 accuracy on the test fixture (tests/data/oms-tiny)")
        if bf16:
            bench_accuracy(report)
        else:
            report.append("  not run: bf16 is not used on this CPU")
        show(section_share=False)
    if "module" not in args.skip:
        for size in sizes:
            bench_module(models, size, rounds, report)
            show()
    if "e2e" not in args.skip:
        bench_e2e(models, rounds, report)
        show()
    print(f"\nload average after: {load_average()}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory: {peak:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
