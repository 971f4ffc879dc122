"""The OMS training loop (paper Sec. 3.2, App. D.3) on Hugging Face Accelerate.

The module psi sees pure noise x_S ~ N(0, I) and the caption's text states and is trained to
predict v = -x0 with an L2 loss: at SNR = 0 v-prediction is x0-prediction, the mean of the data
given the caption. AdamW (0.9, 0.999), weight decay 0.01, constant learning rate.

``batch_size`` is the global batch of one optimizer step (the paper's 512), split evenly over
the processes and the ``grad_accum`` micro-steps; every example's randomness depends only on
its position in the run (:mod:`oms_ext.train.latents`), so one process and several give the
same steps, and a resumed run continues exactly as an uninterrupted one (on the CPU, bit for
bit). With ``buckets`` every step takes its global batch from one aspect-ratio bucket
(:mod:`oms_ext.train.buckets`), the same in every process. Checkpoints are single safetensors
files (module, AdamW state, RNG states, step, data fingerprint; never pickles).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from oms_ext.train.buckets import BUCKET_STEP, BucketSchedule, describe
from oms_ext.train.errors import TrainError, TrainingInterrupted
from oms_ext.train.latents import (
    LatentExample,
    atomic_save,
    check_disk,
    check_examples,
    draw_sample,
    epoch_order,
    example_generator,
)
from oms_ext.unet import build_unet, count_parameters

CHECKPOINT_FORMAT = "oms-train-checkpoint-1"
#: Text states kept in memory at most (MB, float32); with more captions they are encoded anew
#: at every step.
TEXT_CACHE_MB = 4096
#: Captions per text-encoder call when the states are computed up front.
TEXT_CHUNK = 64
CHECKPOINT_GLOB = "step-*.safetensors"
MIXED_PRECISION = ("no", "bf16", "fp16")
PREVIEW_SEED = 1234


@dataclass
class TrainSettings:
    """Everything a run does besides its data, encoder and module config."""

    output_dir: Path
    steps: int = 2000
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    caption_dropout: float = 0.1
    mixed_precision: str = "no"
    seed: int = 0
    resolution: int = 512
    save_every: int = 500
    keep_checkpoints: int = 2
    preview_every: int = 0
    preview_prompts: list[str] = field(default_factory=list)
    cpu: bool = False
    progress: bool = True
    buckets: bool = False

    def check(self) -> None:
        """Raise :class:`TrainError` for values no run can use."""
        checks = [
            (self.steps >= 1, "--steps must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (
                self.batch_size % self.grad_accum == 0,
                f"--batch-size {self.batch_size} must be a multiple of --grad-accum "
                f"{self.grad_accum}",
            ),
            (self.learning_rate > 0, "--learning-rate must be positive"),
            (0.0 <= self.caption_dropout <= 1.0, "--caption-dropout must lie in [0, 1]"),
            (
                self.mixed_precision in MIXED_PRECISION,
                f"--mixed-precision: use one of {', '.join(MIXED_PRECISION)}",
            ),
            (
                self.mixed_precision != "fp16" or (not self.cpu and gpu_available()),
                "--mixed-precision fp16 needs a GPU (accelerate trains in fp32 on the CPU "
                "without saying so); on the CPU use bf16 or no",
            ),
            (
                self.resolution >= 8 and self.resolution % 8 == 0,
                "--resolution must be a positive multiple of 8 pixels",
            ),
            (
                self.save_every >= 0 and self.preview_every >= 0,
                "--save-every/--preview-every must be >= 0 (0 = never)",
            ),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (
                not self.buckets or self.resolution % BUCKET_STEP == 0,
                f"--buckets needs a --resolution that is a multiple of {BUCKET_STEP} px (the "
                f"buckets' grid), e.g. 512 or 1024",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)

    @property
    def latent_size(self) -> int:
        return self.resolution // 8

    def fingerprint(self, model_config: dict[str, Any], data_digest: str) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (``buckets`` only when
        on, so checkpoints of square-crop runs keep their fingerprint)."""
        fingerprint = {
            "model": model_config,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "resolution": self.resolution,
            "caption_dropout": self.caption_dropout,
            "data": data_digest,
        }
        if self.buckets:
            fingerprint["buckets"] = True
        return fingerprint


@dataclass(frozen=True)
class TrainResult:
    """The trained module network, the step it reached and the final loss."""

    model: torch.nn.Module
    step: int
    loss: float
    checkpoint: Path | None


def data_digest(examples: Sequence[LatentExample]) -> str:
    """A digest of the training set (captions, latents and buckets, in order)."""
    digest = hashlib.sha256(str(len(examples)).encode())
    for example in examples:
        digest.update(example.caption.encode())
        digest.update(example.latent.numpy().tobytes())
        if example.bucket is not None:
            digest.update(f"{example.bucket[0]}x{example.bucket[1]}".encode())
    return digest.hexdigest()[:32]


class TextStates:
    """The text states of a run's captions and of "" (caption dropout).

    The encoder is frozen, so each caption's states are computed once, before training: the
    sorted unique captions in fixed chunks of :data:`TEXT_CHUNK` (every run and process gets
    the very same values, whatever the batches), kept on the CPU in float32. That takes the
    encoder out of the steps (for OMS-S with a ViT-H it costs more than the module itself).
    When they would exceed ``limit_mb``, captions are encoded at every step instead.
    """

    def __init__(self, encoder: Any, captions: Sequence[str], limit_mb: float, progress: bool):
        from tqdm.auto import tqdm

        self.encoder = encoder
        unique = sorted({*captions, ""})
        size_mb = len(unique) * 77 * int(encoder.hidden_size) * 4 / 1e6
        self.table: torch.Tensor | None = None
        if size_mb > limit_mb:
            return
        self.index = {caption: i for i, caption in enumerate(unique)}
        chunks = []
        starts = range(0, len(unique), TEXT_CHUNK)
        with torch.no_grad():
            for i in tqdm(starts, desc="captions", unit="chunk", disable=not progress):
                chunks.append(encoder(unique[i : i + TEXT_CHUNK]).to("cpu", torch.float32))
        self.table = torch.cat(chunks)

    def __call__(self, captions: Sequence[str], device: torch.device) -> torch.Tensor:
        """Text states [B, 77, D] (float32 on ``device``) of ``captions``."""
        if self.table is None:
            with torch.no_grad():
                return self.encoder(list(captions)).to(device, torch.float32)
        rows = torch.tensor([self.index[c] for c in captions])
        return self.table[rows].to(device, torch.float32)


class _Order:
    """The example indices of each step without buckets: the stream of examples in one
    permutation per epoch (see latents.py), ``batch`` of them a step."""

    def __init__(self, seed: int, count: int, batch: int) -> None:
        self.seed, self.count, self.batch = seed, count, batch
        self.epoch, self.order = -1, torch.empty(0, dtype=torch.long)

    def _at(self, position: int) -> int:
        epoch = position // self.count
        if epoch != self.epoch:
            self.epoch, self.order = epoch, epoch_order(self.seed, epoch, self.count)
        return int(self.order[position % self.count])

    def __call__(self, step: int) -> list[int]:
        first = step * self.batch
        return [self._at(p) for p in range(first, first + self.batch)]


def gpu_available() -> bool:
    """Whether accelerate will train on a GPU (CUDA/ROCm, Intel XPU or Apple MPS)."""
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return (
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or (mps is not None and mps.is_available())
    )


def _accelerator(settings: TrainSettings) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # A fresh state per run, so one process can train several times (tests, notebooks).
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(mixed_precision=settings.mixed_precision, cpu=settings.cpu)


def train(
    settings: TrainSettings,
    examples: Sequence[LatentExample],
    encoder: Any,
    model_config: dict[str, Any],
    *,
    family: str,
    resume: Path | None = None,
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train a module of ``model_config`` on ``examples`` with text ``encoder`` (a
    :class:`~oms_ext.text.PromptEncoder`); ``family`` picks the preview colours.

    ``resume``: a checkpoint file of this run to continue from. ``after_step(step)`` runs after
    every optimizer step. Ctrl-C (KeyboardInterrupt) writes a checkpoint of the last finished
    step, says where it is and raises :class:`~oms_ext.train.errors.TrainingInterrupted`.
    """
    settings.check()
    check_examples(examples, settings.latent_size, buckets=settings.buckets)
    accelerator = _accelerator(settings)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = settings.batch_size // settings.grad_accum
    if micro % world:
        raise TrainError(
            f"--batch-size {settings.batch_size} / --grad-accum {settings.grad_accum} = {micro} "
            f"examples per micro-step do not split over {world} processes"
        )
    local = micro // world
    digest = data_digest(examples)
    fingerprint = settings.fingerprint(model_config, digest)

    torch.manual_seed(settings.seed)
    model = build_unet(model_config).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=settings.learning_rate,
        betas=settings.adam_betas,
        eps=settings.adam_eps,
        weight_decay=settings.weight_decay,
    )
    start = 0
    if resume is not None:
        start = load_checkpoint(resume, model, optimizer, fingerprint)
    model, optimizer = accelerator.prepare(model, optimizer)
    encoder.to(device=accelerator.device)
    texts = TextStates(
        encoder, [e.caption for e in examples], TEXT_CACHE_MB, progress=settings.progress
    )
    order: _Order | BucketSchedule
    if settings.buckets:
        order = BucketSchedule(settings.seed, [e.bucket for e in examples], settings.batch_size)
    else:
        order = _Order(settings.seed, len(examples), settings.batch_size)
    main = accelerator.is_main_process
    checkpoints = settings.output_dir / "checkpoints"
    if main:
        accelerator.print(
            f"OMS training: {count_parameters(model) / 1e6:.1f} M parameters, "
            f"{len(examples)} images, {settings.steps} steps of {settings.batch_size} "
            f"({world} process(es) x {local} x {settings.grad_accum} accumulation)"
        )
        if isinstance(order, BucketSchedule):
            accelerator.print(
                f"buckets: {describe([e.bucket for e in examples])} "
                f"({order.steps_per_epoch} steps an epoch, each from one bucket)"
            )

    def save(at: int) -> Path:
        return _save(
            accelerator, model, optimizer, at, fingerprint, checkpoints, settings.keep_checkpoints
        )

    bar = _progress(settings, start, enabled=main and settings.progress)
    step, loss_value, saved = start, math.nan, None
    try:
        while step < settings.steps:
            loss_value = _optimizer_step(
                accelerator,
                model,
                optimizer,
                texts,
                examples,
                order,
                settings,
                step=step,
                rank=rank,
                local=local,
                micro=micro,
            )
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if settings.save_every and step % settings.save_every == 0 and step < settings.steps:
                saved = save(step)
            if settings.preview_every and step % settings.preview_every == 0 and main:
                write_preview(accelerator.unwrap_model(model), encoder, settings, step, family)
            if after_step is not None:
                after_step(step)
    except KeyboardInterrupt:
        bar.close()
        if step > start:
            saved = save(step)
            accelerator.print(
                f"\nInterrupted after step {step}: checkpoint {saved}; continue with --resume "
                f"{saved}"
            )
        else:
            accelerator.print(f"\nInterrupted before step {step + 1} finished: no checkpoint")
        raise TrainingInterrupted(step, saved) from None
    bar.close()
    if step > start and settings.save_every:
        saved = save(step)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    return TrainResult(unwrapped.eval().requires_grad_(False), step, loss_value, saved)


def _progress(settings: TrainSettings, start: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=settings.steps,
        initial=start,
        desc="OMS",
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
    )


def _optimizer_step(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    texts: TextStates,
    examples: Sequence[LatentExample],
    order: Callable[[int], list[int]],
    settings: TrainSettings,
    *,
    step: int,
    rank: int,
    local: int,
    micro: int,
) -> float:
    """One optimizer step over the global batch ``order(step)``; returns its mean loss.
    Example j of the batch is at stream position step * batch_size + j: its randomness."""
    total = torch.zeros((), device=accelerator.device)
    chosen = order(step)
    square = settings.latent_size
    for k in range(settings.grad_accum):
        first = k * micro + rank * local
        samples = []
        for j in range(first, first + local):
            example = examples[chosen[j]]
            crop = example.crop_cells(square) if settings.buckets else (square, square)
            generator = example_generator(settings.seed, step * settings.batch_size + j)
            samples.append(draw_sample(example, generator, crop, settings.caption_dropout))
        noise = torch.stack([s.noise for s in samples]).to(accelerator.device)
        target = torch.stack([s.target for s in samples]).to(accelerator.device)
        context = texts([s.caption for s in samples], accelerator.device)
        last = k == settings.grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                v = model(noise, context)
            # Sec. 3.2: L2 between psi(x_S, C) and v = -x0.
            loss = F.mse_loss(v.float(), target) / settings.grad_accum
            accelerator.backward(loss)
        total += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(total, reduction="mean"))


def _save(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    step: int,
    fingerprint: dict[str, Any],
    folder: Path,
    keep: int,
) -> Path:
    path = folder / f"step-{step:06d}.safetensors"
    if accelerator.is_main_process:
        save_checkpoint(path, accelerator.unwrap_model(model), optimizer, step, fingerprint)
        for old in sorted(folder.glob(CHECKPOINT_GLOB))[:-keep]:
            old.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return path


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: Any,
    step: int,
    fingerprint: dict[str, Any],
) -> None:
    """Module weights, AdamW state, RNG states, step and run fingerprint in one safetensors
    file, written atomically."""
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()
    }
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for name, value in values.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{index}.{name}"] = tensor.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "param_groups": json.dumps(state["param_groups"]),
    }
    params = sum(t.numel() * t.element_size() for t in tensors.values())
    check_disk(path.parent, params, "a training checkpoint")
    try:
        atomic_save(tensors, path, metadata)
    except OSError as e:
        raise TrainError(f"cannot write the checkpoint {path} ({e})") from e


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: Any, fingerprint: dict[str, Any]
) -> int:
    """Restore a checkpoint of :func:`save_checkpoint` into ``model``/``optimizer`` and the
    RNG; returns its step. Refuses one of another run (other data, model, batch or seed)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainError(f"--resume {path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise TrainError(f"--resume {path.name}: not a readable checkpoint ({e})") from e
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"--resume {path.name}: not an OMS training checkpoint")
    saved = json.loads(metadata["fingerprint"])
    if saved != json.loads(json.dumps(fingerprint, sort_keys=True)):
        differs = sorted(k for k in {*saved, *fingerprint} if saved.get(k) != fingerprint.get(k))
        raise TrainError(
            f"--resume {path.name}: the checkpoint is of another run (different "
            f"{', '.join(differs)}); resume with the settings and data it was made with"
        )
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
        strict=True,
    )
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": json.loads(metadata["param_groups"])}
    )
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return int(metadata["step"])


def latest_checkpoint(output_dir: Path) -> Path:
    """The checkpoint of the highest step in ``output_dir/checkpoints``."""
    found = sorted((output_dir / "checkpoints").glob(CHECKPOINT_GLOB))
    if not found:
        raise TrainError(f"--resume latest: no checkpoint in {output_dir / 'checkpoints'}")
    return found[-1]


@torch.no_grad()
def write_preview(
    model: torch.nn.Module, encoder: Any, settings: TrainSettings, step: int, family: str
) -> Path | None:
    """A PNG strip of x0_hat = -psi(x_S, prompt) for the preview prompts (fixed x_S), in the
    preview colours of ``family``'s latents: ``previews/step-NNNNNN.png``."""
    from PIL import Image

    from oms_ext.preview import preview_images

    prompts = settings.preview_prompts
    if not prompts:
        return None
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    size = settings.latent_size
    x_s = torch.randn(
        (len(prompts), 4, size, size), generator=torch.Generator().manual_seed(PREVIEW_SEED)
    )
    context = encoder(list(prompts)).to(param.device, param.dtype)
    x0_hat = -model(x_s.to(param.device, param.dtype), context)
    model.train(was_training)
    side = max(64, size * 8)
    images = preview_images(
        x0_hat.float().cpu(),
        family if family in ("sd1", "sd2", "sdxl") else "sd1",
        size=(side, side),
    )
    strip = torch.cat(list(images), dim=1).numpy()
    path = settings.output_dir / "previews" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(strip).save(tmp, format="PNG")
    tmp.replace(path)
    return path
