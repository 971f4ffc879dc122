"""``python -m oms_ext.train``: flags, an optional TOML/JSON config file, the whole run.

Values come from the defaults, then the config file (``--config``; keys are the flag names
with ``_`` or ``-``), then the flags given: a flag always wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oms_ext.errors import OMSUserError
from oms_ext.train.errors import TrainError, TrainingInterrupted
from oms_ext.train.presets import PRESETS

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEFAULTS: dict[str, Any] = {
    "checkpoint": None,
    "encoder": "checkpoint",
    "family": None,
    "size": "oms-s",
    "name": "oms_own",
    "steps": 2000,
    "batch_size": 8,
    "grad_accum": 1,
    "learning_rate": 5e-5,
    "weight_decay": 0.01,
    "caption_dropout": 0.1,
    "mixed_precision": "no",
    "seed": 0,
    "resolution": None,
    "buckets": False,
    "min_image_size": None,
    "require_captions": False,
    "caption_column": "text",
    "cache_dir": None,
    "models_dir": None,
    "save_every": 500,
    "keep_checkpoints": 2,
    "preview_every": 100,
    "preview_prompts": None,
    "resume": None,
    "save_fp16": False,
    "cpu": False,
}
REQUIRED = ("data", "output_dir")
_PATHS = ("data", "output_dir", "checkpoint", "cache_dir", "models_dir")
#: Resolution of each family (App. D.3: 512 px, 1024 px for SDXL).
RESOLUTIONS = {"sd1": 512, "sd2": 512, "sdxl": 1024}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m oms_ext.train",
        description="Train a One More Step module on a folder of captioned images.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", type=Path, help="TOML or JSON file of settings (flags override)")
    p.add_argument(
        "--data",
        type=Path,
        help="image folder: same-name .txt captions, or "
        "metadata.jsonl/metadata.csv (file_name, text)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="SD1.x/SD2.x/SDXL checkpoint (.safetensors) "
        "or diffusers folder: its VAE makes the latents",
    )
    p.add_argument(
        "--encoder",
        help="text encoder: 'checkpoint' (its own CLIP-L / SDXL pair, "
        "default), 'release' (SD2.1 OpenCLIP ViT-H, as OMS-B) or a folder with "
        "text_encoder/ and tokenizer/",
    )
    p.add_argument(
        "--family",
        choices=("sd1", "sd2", "sdxl"),
        help="latent space, for a VAE " "file or folder that does not tell",
    )
    p.add_argument(
        "--size", help=f"module size: {', '.join(PRESETS)} or a config JSON " "(default oms-s)"
    )
    p.add_argument(
        "--output-dir", type=Path, help="where the module, checkpoints/ and " "previews/ go"
    )
    p.add_argument("--name", help="module folder name (default oms_own)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 2000, the paper's)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="global batch per step, over all processes "
        "and accumulation (default 8; the paper: 512)",
    )
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--learning-rate", type=float, help="AdamW learning rate (default 5e-5)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    p.add_argument(
        "--caption-dropout",
        type=float,
        help='share of captions replaced by "" ' "so OMS CFG works (default 0.1)",
    )
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), help="default no")
    p.add_argument("--seed", type=int, help="seed of the data order, crops, flips and noise")
    p.add_argument(
        "--resolution",
        type=int,
        help="training size in pixels, short side " "(default 512, SDXL 1024)",
    )
    p.add_argument(
        "--buckets",
        action="store_true",
        help="aspect-ratio buckets: each image is trained at the 64 px grid size of about "
        "the resolution's area nearest its shape (1:2 .. 2:1), not as a square crop",
    )
    p.add_argument(
        "--min-image-size",
        type=int,
        help="skip images whose short side is below " "this (default: half the resolution)",
    )
    p.add_argument(
        "--require-captions",
        action="store_true",
        help="refuse images without a " 'caption instead of training them with ""',
    )
    p.add_argument("--caption-column", help="caption column of metadata.jsonl/csv (text)")
    p.add_argument("--cache-dir", type=Path, help="latent cache (default ~/.cache/oms_ext/latents)")
    p.add_argument(
        "--models-dir",
        type=Path,
        help="folder holding " "stabilityai--stable-diffusion-2-1/ for --encoder release",
    )
    p.add_argument(
        "--save-every",
        type=int,
        help="checkpoint every N steps (default 500, 0 = " "only at the end)",
    )
    p.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default 2)")
    p.add_argument(
        "--preview-every",
        type=int,
        help="preview picture every N steps (default " "100, 0 = never)",
    )
    p.add_argument(
        "--preview-prompts",
        nargs="+",
        help="prompts of the previews (default: the " "first four captions)",
    )
    p.add_argument("--resume", help="checkpoint file to continue from, or 'latest'")
    p.add_argument("--save-fp16", action="store_true", help="write fp16 weights as the releases")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    return p


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings of a TOML or JSON file, keys normalised to the flags' ``snake_case``."""
    toml = _toml()
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else toml.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, toml.TOMLDecodeError) as e:
        raise TrainError(f"--config {path}: cannot read it ({e})") from e
    if not isinstance(data, dict):
        raise TrainError(f"--config {path}: expected a table of settings")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(DEFAULTS) - set(REQUIRED))
    if unknown:
        raise TrainError(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    for key in _PATHS:
        if data.get(key) is not None:
            data[key] = (path.parent / str(data[key])).expanduser()
    return data


def _toml() -> Any:
    """tomllib (Python 3.11+) or its backport tomli (requirements-train.txt)."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise TrainError(
                "TOML config files need Python 3.11 or the tomli package "
                "(pip install -r requirements-train.txt); or write the config as JSON"
            ) from None
    return tomllib


def resolve_options(argv: Sequence[str]) -> dict[str, Any]:
    """Defaults < config file < flags."""
    given = vars(build_parser().parse_args(list(argv)))
    config_path = given.pop("config", None)
    from_file = read_config_file(config_path) if config_path is not None else {}
    options = {**DEFAULTS, **from_file, **given}
    missing = [f"--{k.replace('_', '-')}" for k in REQUIRED if options.get(k) is None]
    if missing:
        raise TrainError(f"missing {' and '.join(missing)} (a flag or a config file entry)")
    return options


@dataclass(frozen=True)
class Prepared:
    """What the data pass found: examples kept and the counts the run reports."""

    examples: list
    images: int
    uncaptioned: int
    unreadable: int
    tiny: int


def run(argv: Sequence[str]) -> Path:
    """The whole run; returns the module folder."""
    from accelerate import PartialState

    from oms_ext.train.checkpoint import (
        open_checkpoint,
    )
    from oms_ext.train.data import scan_folder
    from oms_ext.train.encoders import choose_encoder
    from oms_ext.train.export import export_module
    from oms_ext.train.latents import check_memory
    from oms_ext.train.presets import module_config
    from oms_ext.train.trainer import TrainSettings, latest_checkpoint, train

    o = resolve_options(argv)
    state = PartialState(cpu=bool(o["cpu"]))
    say = print if state.is_main_process else (lambda *_: None)
    if o["checkpoint"] is None:
        raise TrainError("missing --checkpoint: the SD checkpoint (or VAE) whose latents to learn")
    scan = scan_folder(
        o["data"], caption_column=o["caption_column"], require_captions=o["require_captions"]
    )
    checkpoint = open_checkpoint(Path(o["checkpoint"]), o["family"])
    family = checkpoint.family
    resolution = int(o["resolution"] or RESOLUTIONS[family])
    say(
        f"OMS training data: {len(scan.examples)} images in {o['data']}"
        + (f', {scan.uncaptioned} without a caption (trained with "")' if scan.uncaptioned else "")
    )
    settings = TrainSettings(
        output_dir=Path(o["output_dir"]),
        steps=int(o["steps"]),
        batch_size=int(o["batch_size"]),
        grad_accum=int(o["grad_accum"]),
        learning_rate=float(o["learning_rate"]),
        weight_decay=float(o["weight_decay"]),
        caption_dropout=float(o["caption_dropout"]),
        mixed_precision=str(o["mixed_precision"]),
        seed=int(o["seed"]),
        resolution=resolution,
        save_every=int(o["save_every"]),
        keep_checkpoints=int(o["keep_checkpoints"]),
        preview_every=int(o["preview_every"]),
        preview_prompts=list(o["preview_prompts"] or []),
        cpu=bool(o["cpu"]),
        buckets=bool(o["buckets"]),
    )
    settings.check()  # before any slow work
    resume = o["resume"]
    resume_path = None
    if resume is not None:
        resume_path = latest_checkpoint(settings.output_dir) if resume == "latest" else Path(resume)
    choice = choose_encoder(str(o["encoder"]), checkpoint, o["models_dir"], torch.float32)
    config = module_config(str(o["size"]), choice.encoder.hidden_size)
    _check_output_disk(Path(o["output_dir"]), config, o)
    check_memory(len(scan.examples), resolution)
    buckets = _plan_buckets(settings, scan.examples, o, say) if settings.buckets else None
    report = _cached_latents(state, o, scan.examples, checkpoint, resolution, buckets)
    skipped = report.unreadable + report.tiny
    say(
        f"Latents: {report.encoded} encoded, {len(report.examples) - report.encoded} from the "
        "cache"
        + (
            f"; skipped {report.unreadable} unreadable and {report.tiny} too small image(s)"
            if skipped
            else ""
        )
    )
    if not settings.preview_prompts:  # the first four captions
        captions = dict.fromkeys(e.caption for e in report.examples if e.caption)
        settings.preview_prompts = list(captions)[:4]
    result = train(
        settings, report.examples, choice.encoder, config, family=family, resume=resume_path
    )
    if not state.is_main_process:
        return settings.output_dir / str(o["name"])
    facts = {
        "family": family,
        "encoder": choice.description,
        # "checkpoint" (borrowed), "release" (SD 2.1's ViT-H) or "module" (copied into it)
        "encoder_source": o["encoder"] if o["encoder"] in ("checkpoint", "release") else "module",
        "size": str(o["size"]) if str(o["size"]).lower() in PRESETS else "custom",
        "steps": result.step,
        "images": len(report.examples),
        "resolution": resolution,
        "buckets": settings.buckets,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "caption_dropout": settings.caption_dropout,
        "final_loss": result.loss,
    }
    out = export_module(
        settings.output_dir / str(o["name"]),
        result.model,
        config,
        choice,
        facts,
        fp16=bool(o["save_fp16"]),
    )
    print(f"OMS module written: {out} (step {result.step}, loss {result.loss:.4f})")
    return out


def _min_size(o: dict[str, Any], resolution: int) -> int:
    return int(o["min_image_size"] or resolution // 2)


def _plan_buckets(settings: Any, examples: list, o: dict[str, Any], say: Any) -> list:
    """The bucket of each image (from the image headers), saying which small buckets were
    merged into a neighbour."""
    from oms_ext.train.buckets import image_size, plan_buckets

    sizes = [image_size(e.path) for e in examples]
    resolution = settings.resolution
    plan = plan_buckets(sizes, resolution, settings.batch_size, _min_size(o, resolution))
    for count, small, into in plan.merged:
        say(
            f"buckets: {count} image(s) of {small[0]}x{small[1]} trained in {into[0]}x{into[1]} "
            f"(fewer than the {settings.batch_size} of a step)"
        )
    return plan.buckets


def _check_output_disk(output_dir: Path, config: dict[str, Any], o: dict[str, Any]) -> None:
    """Before training: room for the module and its checkpoints (fp32 weights + AdamW's two
    moments each, as many as are kept)."""
    from oms_ext.train.latents import check_disk
    from oms_ext.unet import expected_parameter_count

    params = expected_parameter_count(config)
    checkpoints = int(o["keep_checkpoints"]) if int(o["save_every"]) else 1
    needed = params * (2 if o["save_fp16"] else 4) + checkpoints * params * 4 * 3
    check_disk(output_dir, needed, "the module and its checkpoints")


def _cached_latents(
    state: Any,
    o: dict[str, Any],
    examples: list,
    checkpoint: Any,
    resolution: int,
    buckets: list | None,
) -> Any:
    """Latents of ``examples`` (with ``buckets``: each at its bucket's size) through the cache;
    the main process encodes what is missing while the others wait, then they read it."""
    from tqdm.auto import tqdm

    from oms_ext.train.checkpoint import SCALING_FACTORS, encode_images, load_vae, vae_identity
    from oms_ext.train.latents import cache_latents

    device = state.device
    # fp32 even on a GPU: SDXL's VAE overflows in fp16, and each image is encoded only once.
    vae_dtype = torch.float32
    scale = SCALING_FACTORS[checkpoint.family]
    cache_dir = Path(o["cache_dir"] or Path.home() / ".cache" / "oms_ext" / "latents")
    bar = tqdm(total=len(examples), desc="latents", unit="img", disable=not state.is_main_process)
    with state.main_process_first(), bar:
        vae = load_vae(checkpoint, device, vae_dtype)
        return cache_latents(
            examples,
            lambda images: encode_images(vae, images, scale),
            vae_id=vae_identity(vae, scale, vae_dtype),
            cache_dir=cache_dir,
            resolution=resolution,
            min_size=_min_size(o, resolution),
            buckets=buckets,
            progress=bar.update,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one line and exit status 2 for a user's mistake; on Ctrl-C no traceback,
    exit status 130 (the trainer has said which checkpoint to resume from, if any)."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except OMSUserError as e:
        print(f"oms_ext.train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingInterrupted:
        return EXIT_INTERRUPTED  # the trainer has said where its checkpoint is
    except KeyboardInterrupt:
        print("oms_ext.train: interrupted before training started", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
