"""Check the One More Step nodes in a real, running ComfyUI through its /prompt API.

    OMS_COMFY_RECORD_DIR=<record dir> python main.py --cpu --listen 127.0.0.1   # in ComfyUI
    <ComfyUI's python> tools/comfy_check.py --url http://127.0.0.1:8188 \\
        --comfyui <ComfyUI folder> --record <record dir>

ComfyUI must have this repository in custom_nodes/ and run with OMS_COMFY_RECORD_DIR set (it
registers the check's recorder node, which saves the x and sigma of the sampler's first model
call and stops the prompt there). The tool writes random-weight files into the ComfyUI folder
(no downloads): a small SD1.x-shaped checkpoint (models/checkpoints/oms_check_sd15.safetensors,
a one-level 320-channel UNet, ComfyUI's CLIP-L and VAE shapes) and the tiny test module
(models/oms/oms_check_tiny). For every sampler x scheduler at 4 and 20 steps, denoise 0.5,
KSamplerAdvanced start_at_step, v-prediction and LCM model-sampling patches, a batch with
batch_index, it checks x == x0_hat + s0 * noise (x0_hat recomputed here with the core API,
the noise with ComfyUI's prepare_noise rule), and ComfyUI's own noise scaling with OMS off,
add_noise off and zsnr. Then one full image and the OMS preview through /prompt.

With ``--own-module NAME --checkpoint FILE`` it checks instead a module of the user's own
trained on that checkpoint's text encoder (``python -m oms_ext.train --encoder checkpoint``,
copied into models/oms; FILE in models/checkpoints, SD1.x, SD2.x or SDXL): the checkpoint's
CLIP goes to Apply's clip input, and x0_hat is recomputed with the trainer's reading of the
checkpoint file's encoder, so the start proves ComfyUI lends the text states the module was
trained on.
Prints one line per failure and a closing "N passed, N failed" line; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oms_ext.loading import load_oms  # noqa: E402

TINY = ROOT / "tests" / "data" / "oms-tiny"
CKPT = "oms_check_sd15.safetensors"
MODULE = "oms_check_tiny"
PROMPT, NEGATIVE, CFG = "a dark night", "", 2.0
SD_SIGMA_MAX = 14.614641189575195


def build_files(comfyui: Path) -> None:
    """The random-weight checkpoint and the tiny module, in ComfyUI's models folders."""
    module = comfyui / "models" / "oms" / MODULE
    if not module.exists():
        shutil.copytree(TINY, module, ignore=shutil.ignore_patterns("reference*", "inputs*"))
    ckpt = comfyui / "models" / "checkpoints" / CKPT
    if ckpt.exists():
        return
    sys.path.insert(0, str(comfyui))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # building needs no accelerator (read at import below)
    import comfy.ldm.models.autoencoder as ae
    import comfy.ldm.modules.diffusionmodules.openaimodel as oa
    import comfy.ops
    import comfy.sd1_clip
    from safetensors.torch import save_file

    ops = comfy.ops.disable_weight_init
    torch.manual_seed(0)
    unet = oa.UNetModel(
        image_size=32,
        in_channels=4,
        model_channels=320,
        out_channels=4,
        num_res_blocks=1,
        channel_mult=(1,),
        num_head_channels=64,
        use_spatial_transformer=True,
        transformer_depth=[1],
        transformer_depth_output=[1, 1],
        transformer_depth_middle=1,
        context_dim=768,
        use_linear_in_transformer=False,
        operations=ops,
    )
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    vae = ae.AutoencoderKL(
        ddconfig={
            "double_z": True,
            "z_channels": 4,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        embed_dim=4,
    )
    state = {}
    for prefix, net in (
        ("model.diffusion_model.", unet),
        ("cond_stage_model.", clip),
        ("first_stage_model.", vae),
    ):
        for key, value in net.state_dict().items():
            if value.is_floating_point():
                value = torch.randn_like(value) * 0.02
            state[prefix + key] = value.to(
                torch.float16 if value.is_floating_point() else value.dtype
            )
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_name(f".{ckpt.name}.partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(ckpt)


def post(url: str, prompt: dict) -> dict:
    """Queue ``prompt`` and wait for its /history entry."""
    body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
    request = urllib.request.Request(f"{url}/prompt", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        prompt_id = json.load(r)["prompt_id"]
    for _ in range(1200):
        with urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=60) as r:
            history = json.load(r)
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.1)
    raise TimeoutError(f"prompt {prompt_id} did not finish")


def workflow(
    label: str,
    *,
    ckpt=CKPT,
    module=MODULE,
    clip=False,
    size=64,
    sampler="euler",
    scheduler="normal",
    steps=4,
    seed=1,
    oms=True,
    denoise=1.0,
    start=None,
    patch=None,
    batch=1,
    batch_index=None,
    add_noise=True,
    record=True,
) -> dict:
    """An API-format workflow: checkpoint -> [ModelSamplingDiscrete] -> [OMS Apply] ->
    recorder -> KSampler or KSamplerAdvanced -> SaveLatent (or the full image and preview)."""
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": size, "height": size, "batch_size": batch},
        },
        "5": {"class_type": "OneMoreStepLoader", "inputs": {"module": module, "precision": "fp32"}},
    }
    model = ["1", 0]
    if patch is not None:
        kind, zsnr = patch
        wf["10"] = {
            "class_type": "ModelSamplingDiscrete",
            "inputs": {"model": model, "sampling": kind, "zsnr": zsnr},
        }
        model = ["10", 0]
    latent = ["4", 0]
    if batch_index is not None:  # LatentFromBatch keeps the rows' batch_index
        wf["4"]["inputs"]["batch_size"] = max(batch_index) + 1
        wf["11"] = {
            "class_type": "LatentFromBatch",
            "inputs": {
                "samples": latent,
                "batch_index": batch_index[0],
                "length": len(batch_index),
            },
        }
        latent = ["11", 0]
    if oms:
        wf["6"] = {
            "class_type": "OneMoreStepApply",
            "inputs": {
                "model": model,
                "oms_model": ["5", 0],
                "oms_prompt": PROMPT,
                "oms_negative": NEGATIVE,
                "oms_cfg": CFG,
                "noise_mode": "Keep seed noise",
            },
        }
        if clip:
            wf["6"]["inputs"]["clip"] = ["1", 1]
        model = ["6", 0]
    applied = model
    if record:
        wf["7"] = {
            "class_type": "OneMoreStepRecordFirstCall",
            "inputs": {"model": model, "label": label, "stop": True},
        }
        model = ["7", 0]
    common = {
        "model": model,
        "positive": ["2", 0],
        "negative": ["3", 0],
        "latent_image": latent,
        "sampler_name": sampler,
        "scheduler": scheduler,
        "steps": steps,
        "cfg": 1.0,
    }
    if start is None and add_noise:
        wf["8"] = {"class_type": "KSampler", "inputs": {**common, "seed": seed, "denoise": denoise}}
    else:
        wf["8"] = {
            "class_type": "KSamplerAdvanced",
            "inputs": {
                **common,
                "add_noise": "enable" if add_noise else "disable",
                "noise_seed": seed,
                "start_at_step": start or 0,
                "end_at_step": 10000,
                "return_with_leftover_noise": "disable",
            },
        }
    if record:
        wf["9"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["8", 0], "filename_prefix": "oms_check"},
        }
    else:
        wf["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}}
        wf["13"] = {
            "class_type": "SaveImage",
            "inputs": {"images": ["12", 0], "filename_prefix": "oms_check"},
        }
        wf["14"] = {
            "class_type": "OneMoreStepPreview",
            "inputs": {"model": applied, "samples": ["8", 0]},
        }
        wf["15"] = {
            "class_type": "SaveImage",
            "inputs": {"images": ["14", 0], "filename_prefix": "oms_check_preview"},
        }
    return wf


def prepare_noise(shape: tuple[int, ...], seed: int, batch_index=None) -> torch.Tensor:
    """comfy/sample.py prepare_noise: torch.manual_seed(seed), one randn of the latent's shape;
    with batch_index one [1, ...] draw per index up to the largest, picked by index."""
    generator = torch.manual_seed(seed)
    if batch_index is None:
        return torch.randn(shape, generator=generator)
    draws = [torch.randn((1, *shape[1:]), generator=generator) for _ in range(max(batch_index) + 1)]
    return torch.cat([draws[i] for i in batch_index])


def comfy_scaling(noise: torch.Tensor, sigma0: float, sigma_max: float) -> torch.Tensor:
    """EPS.noise_scaling with Sampler.max_denoise (comfy/model_sampling.py, samplers.py)."""
    at_max = math.isclose(sigma0, sigma_max, rel_tol=1e-5) or sigma0 > sigma_max
    return noise * (math.sqrt(1 + sigma0**2) if at_max else sigma0)


def recorded_start(record: Path, label: str, batch: int) -> tuple[torch.Tensor, float] | None:
    """The x and sigma the recorder node saved for ``label``, or None."""
    from safetensors.torch import load_file

    path = record / f"{label}.safetensors"
    if not path.exists():
        return None
    rec = load_file(str(path))
    return rec["x"][:batch], float(rec["sigma"][0])


def check_own_module(args: argparse.Namespace) -> int:
    """The start of a few samplers with a module of the user's own reading the checkpoint's
    CLIP through Apply, against x0_hat from the trainer's encoder of the checkpoint file."""
    from oms_ext.train.checkpoint import open_checkpoint
    from oms_ext.train.encoders import choose_encoder

    checkpoint = open_checkpoint(args.comfyui / "models" / "checkpoints" / args.checkpoint)
    encoder = choose_encoder("checkpoint", checkpoint, None, torch.float32).encoder
    module = load_oms(args.comfyui / "models" / "oms" / args.own_module, "cpu", torch.float32,
                      text_encoder=encoder)  # fmt: skip
    size, seed = 128, 7
    shape = (1, 4, size // 8, size // 8)
    noise = prepare_noise(shape, seed)
    x0_hat = module.predict_x0(noise, PROMPT, CFG, NEGATIVE)
    # Tight enough that another prompt's text states miss it (the control below).
    control = module.predict_x0(noise, "a bright day", CFG, NEGATIVE)
    passed, failed = 0, []
    cases = (("euler", "normal"), ("dpmpp_2m", "karras"), ("ddim", "ddim_uniform"))
    for sampler, scheduler in cases:
        label = f"own-{sampler}-{scheduler}"
        (args.record / f"{label}.safetensors").unlink(missing_ok=True)
        flow = workflow(label, ckpt=args.checkpoint, module=args.own_module, clip=True,
                        size=size, sampler=sampler, scheduler=scheduler, seed=seed)  # fmt: skip
        post(args.url, flow)
        got = recorded_start(args.record, label, 1)
        if got is None:
            failed.append(f"{label}: no first model call was recorded")
            continue
        x, sigma0 = got
        want = x0_hat + sigma0 * noise
        tolerance = 1e-5 * max(1.0, float(want.abs().max()))  # fp32 rounding of x
        err = float((x - want).abs().max())
        miss = float((x - control - sigma0 * noise).abs().max())
        line = f"{label}: sigma0 {sigma0:.4f}, max |x - expected| = {err:.3g}"
        if err > tolerance or miss <= tolerance:
            failed.append(f"{line}, another prompt's: {miss:.3g} (tolerance {tolerance:.3g})")
        else:
            passed += 1
            print(f"PASS {line} (another prompt's: {miss:.3g}, tolerance {tolerance:.3g})")
    for line in failed:
        print(f"FAIL {line}")
    print(f"{args.own_module} on {args.checkpoint} ({checkpoint.family}): "
          f"{passed} passed, {len(failed)} failed")  # fmt: skip
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--comfyui", type=Path, required=True, help="the ComfyUI folder")
    parser.add_argument("--record", type=Path, required=True, help="OMS_COMFY_RECORD_DIR")
    parser.add_argument("--samplers", default="", help="comma list (default: all of ComfyUI's)")
    parser.add_argument("--own-module", default="", help="a module trained on --checkpoint")
    parser.add_argument("--checkpoint", default="", help="its checkpoint, in models/checkpoints")
    args = parser.parse_args()
    if bool(args.own_module) != bool(args.checkpoint):
        parser.error("--own-module and --checkpoint go together")
    if args.own_module:
        return check_own_module(args)
    build_files(args.comfyui)
    with urllib.request.urlopen(f"{args.url}/system_stats", timeout=30) as r:
        version = json.load(r)["system"]["comfyui_version"]
    with urllib.request.urlopen(f"{args.url}/object_info/KSampler", timeout=30) as r:
        info = json.load(r)["KSampler"]["input"]["required"]
    samplers = args.samplers.split(",") if args.samplers else info["sampler_name"][0]
    schedulers = info["scheduler"][0]
    reference = load_oms(TINY, "cpu", torch.float32)
    x0_cache: dict[tuple, torch.Tensor] = {}
    passed, failed = 0, []

    def check(
        label: str,
        shape=(1, 4, 8, 8),
        seed=1,
        batch_index=None,
        oms=True,
        zero=False,
        sigma_max=SD_SIGMA_MAX,
        applies=None,
        **kw,
    ) -> None:
        """Run ``label``; with ``applies`` (default: ``oms``) the start must be the OMS one,
        else ComfyUI's own noise scaling."""
        nonlocal passed
        path = args.record / f"{label}.safetensors"
        path.unlink(missing_ok=True)
        post(
            args.url,
            workflow(
                label,
                seed=seed,
                oms=oms,
                batch=shape[0],
                batch_index=batch_index,
                add_noise=not zero,
                **kw,
            ),
        )
        got = recorded_start(args.record, label, shape[0])
        if got is None:
            failed.append(f"{label}: no first model call was recorded")
            return
        x, sigma0 = got
        noise = torch.zeros(shape) if zero else prepare_noise(shape, seed, batch_index)
        if oms if applies is None else applies:
            key = (shape, seed, tuple(batch_index or ()))
            if key not in x0_cache:
                x0_cache[key] = reference.predict_x0(noise, PROMPT, CFG, NEGATIVE)
            want = x0_cache[key] + sigma0 * noise
        else:
            want = comfy_scaling(noise, sigma0, sigma_max)
        err = float((x - want).abs().max())
        if err > 1e-3 * max(1.0, float(want.abs().max())):
            failed.append(f"{label}: sigma0 {sigma0:.4f}, max |x - expected| = {err:.3g}")
        else:
            passed += 1

    for sampler in samplers:
        for scheduler in schedulers:
            for steps in (4, 20):
                check(
                    f"{sampler}-{scheduler}-{steps}",
                    sampler=sampler,
                    scheduler=scheduler,
                    steps=steps,
                )
    check("denoise-0.5", denoise=0.5, sampler="dpmpp_2m", scheduler="karras", steps=10)
    check("start-at-step-5", start=5, steps=20)
    check("v-prediction", patch=("v_prediction", False))
    check("lcm", patch=("lcm", False), sampler="lcm", scheduler="sgm_uniform")
    check("batch-index", shape=(2, 4, 8, 8), batch_index=[1, 2])
    check("oms-off", oms=False)
    check("oms-off-ddim-uniform", oms=False, scheduler="ddim_uniform", steps=20)
    check("add-noise-off", zero=True, start=0, applies=False)
    zsnr_abar = 4.8973451890853435e-08  # rescale_zero_terminal_snr_sigmas' last alpha_bar
    check("zsnr", patch=("eps", True), sigma_max=math.sqrt(1 / zsnr_abar - 1), applies=False)
    full = post(args.url, workflow("image", record=False))
    images = {node: out.get("images", []) for node, out in full.get("outputs", {}).items()}
    if images.get("13") and images.get("15"):
        passed += 1
    else:
        failed.append(f"full image: outputs {images}, status {full.get('status')}")
    for line in failed:
        print(f"FAIL {line}")
    print(f"ComfyUI {version}: {len(samplers)} samplers x {len(schedulers)} schedulers")
    print(f"{passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
