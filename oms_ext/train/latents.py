"""Cached VAE latents and the per-step sampling of training examples.

Each image is encoded once, at the training resolution (short side; with ``--buckets`` the size
covering its bucket) and mirrored, and the two latents are stored in a safetensors file named
by a digest of the image file (name, size, modification time), the VAE's identity
(:func:`oms_ext.train.checkpoint.vae_identity`), the resolution and the bucket: changing any of
them makes a new entry, so a cache folder can be shared by runs and data sets. Per step, each
example takes a random crop of the plain or the mirrored latent (random flip): a square of
``resolution / 8`` latent cells, or its bucket's size (the paper's random crop, on the 8-pixel
grid of the latents).

Randomness is a pure function of (seed, position in the stream of examples): the data order of
each epoch is a permutation drawn from (seed, epoch) (with buckets see
:class:`oms_ext.train.buckets.BucketSchedule`), and the crop, flip, caption dropout and
noise x_S of every example come from a generator seeded with (seed, position). A run resumed
from a checkpoint, or split over any number of processes, sees exactly the same examples.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from oms_ext.train.buckets import Bucket
from oms_ext.train.data import VAE_STRIDE, Example, load_image
from oms_ext.train.errors import TrainError

#: Bytes per cached latent element (float16) and headroom factor for the disk check.
CACHE_BYTES_PER_ELEMENT = 2
DISK_HEADROOM = 1.2


@dataclass(frozen=True)
class LatentExample:
    """A cached example: latent [4, h, w] of the resized image and of its mirror image (kept in
    the cache's float16 to halve the memory of large sets; any float dtype), the caption, and
    with ``--buckets`` its bucket (width, height) px, the size of its crops."""

    latent: torch.Tensor
    flipped: torch.Tensor
    caption: str
    bucket: Bucket | None = None

    def crop_cells(self, square: int) -> tuple[int, int]:
        """(height, width) in latent cells of this example's crops: its bucket's, else
        ``square`` x ``square``."""
        if self.bucket is None:
            return square, square
        return self.bucket[1] // VAE_STRIDE, self.bucket[0] // VAE_STRIDE


@dataclass(frozen=True)
class CacheReport:
    """How the cache pass went: examples kept, images encoded now, images skipped."""

    examples: list[LatentExample]
    encoded: int
    unreadable: int
    tiny: int


def cache_key(image: Path, vae_id: str, resolution: int, bucket: Bucket | None = None) -> str:
    """Digest naming an image's cache entry (changes with the file, the VAE, the size or the
    bucket; without a bucket the key of the square-crop runs)."""
    stat = image.stat()
    text = f"{image.name}|{stat.st_size}|{stat.st_mtime_ns}|{vae_id}|{resolution}"
    if bucket is not None:
        text += f"|bucket {bucket[0]}x{bucket[1]}"
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _entry(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.safetensors"


def check_disk(folder: Path, needed_bytes: int, what: str) -> None:
    """Raise :class:`TrainError` when ``folder``'s disk has less than ``needed_bytes`` free
    (with :data:`DISK_HEADROOM`)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * DISK_HEADROOM:
        raise TrainError(
            f"not enough disk for {what}: about {needed_bytes * DISK_HEADROOM / 1e6:.0f} MB "
            f"needed in {folder}, {free / 1e6:.0f} MB free; free some space or choose another "
            f"folder"
        )


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(images: int, resolution: int) -> None:
    """Raise :class:`TrainError` when the latents of ``images`` (float16, image and mirror,
    the long side taken as twice the short one) would not fit in the available memory."""
    free = available_memory()
    needed = images * (resolution // VAE_STRIDE) ** 2 * 4 * 2 * 2 * CACHE_BYTES_PER_ELEMENT
    if free is not None and needed * DISK_HEADROOM > free:
        raise TrainError(
            f"not enough memory for the latents of {images} images: about "
            f"{needed * DISK_HEADROOM / 1e6:.0f} MB needed, {free / 1e6:.0f} MB available; "
            f"train on fewer images or at a smaller --resolution"
        )


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_latents(
    examples: Sequence[Example],
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    vae_id: str,
    cache_dir: Path,
    resolution: int,
    min_size: int,
    buckets: Sequence[Bucket] | None = None,
    progress: Callable[[int], None] | None = None,
) -> CacheReport:
    """The latents of ``examples``, read from ``cache_dir`` or encoded with ``encode``
    (images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8]) and stored; with
    ``buckets`` (one per example) each image at the size covering its bucket.

    Undecodable images and images whose short side is under ``min_size`` px are skipped and
    counted; nothing is written for them.
    """
    targets = list(buckets) if buckets is not None else [None] * len(examples)
    entries = [
        _entry(cache_dir, cache_key(e.path, vae_id, resolution, b))
        for e, b in zip(examples, targets, strict=True)
    ]
    missing = sum(not entry.is_file() for entry in entries)
    if missing:
        # plain + mirrored latents of 4 channels, the long side taken as twice the short one
        elements = (resolution // VAE_STRIDE) ** 2 * 4 * 2 * 2
        check_disk(
            cache_dir,
            missing * (elements * CACHE_BYTES_PER_ELEMENT + 1024),
            f"the latent cache of {missing} images",
        )
    kept: list[LatentExample] = []
    encoded = unreadable = tiny = 0
    for example, entry, bucket in zip(examples, entries, targets, strict=True):
        cached = _read_entry(entry)
        if cached is None:
            pixels = load_image(example.path, resolution, min_size, bucket)
            if pixels is None:
                if _decodable(example.path):
                    tiny += 1
                else:
                    unreadable += 1
                if progress:
                    progress(1)
                continue
            both = encode(torch.stack([pixels, pixels.flip(-1)])).half().cpu()
            tensors = {"latent": both[0].contiguous(), "flipped": both[1].contiguous()}
            cached = (tensors["latent"], tensors["flipped"])
            try:
                atomic_save(tensors, entry, {"resolution": str(resolution), "vae": vae_id})
            except OSError as e:
                raise TrainError(f"cannot write the latent cache in {cache_dir} ({e})") from e
            encoded += 1
        kept.append(LatentExample(cached[0], cached[1], example.caption, bucket))
        if progress:
            progress(1)
    return CacheReport(kept, encoded, unreadable, tiny)


def _read_entry(entry: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not entry.is_file():
        return None
    try:
        tensors = load_file(str(entry))
        return tensors["latent"], tensors["flipped"]
    except (SafetensorError, OSError, KeyError):
        return None  # a damaged entry is encoded again


def _decodable(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False


def example_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the example at ``position`` in the run's stream of examples."""
    return torch.Generator().manual_seed((seed * 1_000_003 + position) % (2**63))


def epoch_order(seed: int, epoch: int, count: int) -> torch.Tensor:
    """The data order of ``epoch``: a permutation of ``count`` drawn from (seed, epoch)."""
    generator = torch.Generator().manual_seed((seed * 7919 + 104_729 * (epoch + 1)) % (2**63))
    return torch.randperm(count, generator=generator)


@dataclass(frozen=True)
class Sample:
    """What the module is trained on for one example: the noise x_S it sees, the target
    v = -x0 (Sec. 3.2), and the caption ("" when dropped)."""

    noise: torch.Tensor
    target: torch.Tensor
    caption: str


def draw_sample(
    example: LatentExample,
    generator: torch.Generator,
    crop: tuple[int, int],
    caption_dropout: float,
) -> Sample:
    """Crop (``crop`` = (height, width) latent cells, random offset), flip, drop the caption
    with probability ``caption_dropout`` and draw x_S ~ N(0, I), all from ``generator``."""
    flip = bool(torch.rand((), generator=generator) < 0.5)
    latent = example.flipped if flip else example.latent
    _, h, w = latent.shape
    height, width = crop
    top = int(torch.randint(0, h - height + 1, (), generator=generator))
    left = int(torch.randint(0, w - width + 1, (), generator=generator))
    x0 = latent[:, top : top + height, left : left + width].float()
    dropped = bool(torch.rand((), generator=generator) < caption_dropout)
    noise = torch.randn(x0.shape, generator=generator)
    return Sample(noise, -x0, "" if dropped else example.caption)


def check_examples(examples: Sequence[LatentExample], size: int, *, buckets: bool) -> None:
    """Every latent must cover its crop, ``size`` x ``size`` cells or with ``buckets`` its
    bucket's, and with ``buckets`` every example must have one (raise :class:`TrainError`)."""
    if not examples:
        raise TrainError("no usable training images are left (all were skipped)")
    for example in examples:
        if buckets and example.bucket is None:
            raise TrainError("--buckets: an example has no bucket (cache it with its bucket)")
        height, width = example.crop_cells(size) if buckets else (size, size)
        h, w = example.latent.shape[-2:]
        if h < height or w < width:
            raise TrainError(
                f"a latent of {(h, w)} cells is smaller than the {height}x{width} crop; check "
                f"--resolution"
            )
