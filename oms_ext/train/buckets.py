"""Aspect-ratio buckets (``--buckets``): train each image near its own shape, not a square crop.

The buckets are the sizes (width, height) in multiples of :data:`BUCKET_STEP` = 64 px (8 latent
cells) whose area is at most ``resolution**2`` and as close to it as the grid allows, with an
aspect ratio within 1:2 .. 2:1 (as kohya-ss sd-scripts and SDXL's multi-aspect training).
Each image goes to the bucket nearest its aspect ratio (in log ratio), is resized to cover it
(:func:`oms_ext.train.data.cover_size`) and randomly cropped to it on the latent grid at every
step.

One optimizer step takes its whole global batch from one bucket (the module's batch needs one
shape, and every process then agrees on the bucket of each step). A bucket with fewer usable
images than a batch is merged into the nearest bucket that has enough
(:func:`plan_buckets`), so a batch does not repeat a few images many times; the last batch of
each bucket in an epoch is filled with images of the same bucket taken again from the start of
its epoch order (:class:`BucketSchedule`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

#: Bucket sides are multiples of this many pixels (8 latent cells).
BUCKET_STEP = 64
#: Largest ratio of the long to the short side of a bucket.
MAX_ASPECT = 2.0
#: A bucket: (width, height) in pixels.
Bucket = tuple[int, int]


def bucket_sizes(resolution: int) -> list[Bucket]:
    """The buckets of ``resolution`` (px, a multiple of 64), sorted by aspect ratio (w / h):
    for each width on the 64 px grid the tallest height with w * h <= resolution**2, where
    w >= h and w / h <= 2, and the same turned upright."""
    area = resolution * resolution
    found = set()
    for width in range(resolution, int(resolution * MAX_ASPECT) + 1, BUCKET_STEP):
        height = area // width // BUCKET_STEP * BUCKET_STEP
        if height >= BUCKET_STEP and width / height <= MAX_ASPECT:
            found |= {(width, height), (height, width)}
    return sorted(found, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log ratio) that of a width x height image;
    of two equally near, the first."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image as it is shown (EXIF rotation applied), from its header;
    None when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            rotated = image.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF Orientation
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    return (height, width) if rotated else (width, height)


@dataclass(frozen=True)
class BucketPlan:
    """The bucket of each image and the merges made (moved image count, from, to)."""

    buckets: list[Bucket]
    merged: list[tuple[int, Bucket, Bucket]]


def plan_buckets(
    sizes: Sequence[tuple[int, int] | None], resolution: int, batch: int, min_size: int
) -> BucketPlan:
    """The bucket of each image of ``sizes`` (None: unreadable) for ``batch`` examples a step.

    Images go to their nearest bucket; then, while some bucket holds fewer than ``batch``
    usable images (readable, short side >= ``min_size``) and others exist, the smallest (the
    first by aspect ratio among equals) is merged into the bucket nearest its aspect ratio.
    Images that will be skipped get a bucket but count for none.
    """
    grid = bucket_sizes(resolution)
    square = nearest_bucket(1, 1, grid)
    chosen = [nearest_bucket(*s, grid) if s else square for s in sizes]
    usable = Counter(b for b, s in zip(chosen, sizes, strict=True) if s and min(s) >= min_size)
    merged = []
    while len(usable) > 1:
        order = sorted(usable, key=lambda b: (usable[b], b[0] / b[1]))
        small = order[0]
        if usable[small] >= batch:
            break
        target = nearest_bucket(*small, [b for b in grid if b in usable and b != small])
        merged.append((usable[small], small, target))
        usable[target] += usable.pop(small)
        chosen = [target if b == small else b for b in chosen]
    return BucketPlan(chosen, merged)


def describe(buckets: Sequence[Bucket]) -> str:
    """One line of bucket sizes and image counts, most images first: "512x512 x 40, ..."."""
    counts = Counter(buckets)
    order = sorted(counts, key=lambda b: (-counts[b], b[0] / b[1]))
    return ", ".join(f"{w}x{h} x {counts[(w, h)]}" for w, h in order)


def _generator(seed: int, epoch: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7919 + 104_729 * (epoch + 1) + salt) % (2**63))


class BucketSchedule:
    """The examples of each optimizer step with buckets: a pure function of (seed, step), the
    same in every process and in a resumed run.

    Epoch e: each bucket's examples in a permutation drawn from (seed, e, bucket), cut into
    batches of ``batch`` (the last filled from the start of the same permutation, repeating
    as needed); the batches of all buckets are then shuffled with a permutation drawn from
    (seed, e). Every epoch has the same number of steps.
    """

    def __init__(self, seed: int, buckets: Sequence[Bucket], batch: int) -> None:
        self.seed, self.batch = seed, batch
        groups: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(buckets):
            groups.setdefault(bucket, []).append(index)
        self.groups = [torch.tensor(groups[b]) for b in sorted(groups)]
        self.steps_per_epoch = sum(math.ceil(len(g) / batch) for g in self.groups)
        self.epoch, self.batches = -1, torch.empty(0, batch, dtype=torch.long)

    def _epoch(self, epoch: int) -> torch.Tensor:
        batches = []
        for salt, group in enumerate(self.groups):
            order = group[torch.randperm(len(group), generator=_generator(self.seed, epoch, salt))]
            count = math.ceil(len(group) / self.batch)
            filled = order.repeat(math.ceil(count * self.batch / len(group)))
            batches.append(filled[: count * self.batch].view(count, self.batch))
        all_batches = torch.cat(batches)
        shuffle = torch.randperm(len(all_batches), generator=_generator(self.seed, epoch, -1))
        return all_batches[shuffle]

    def __call__(self, step: int) -> list[int]:
        """The ``batch`` example indices of optimizer step ``step`` (0-based), all of one
        bucket."""
        epoch = step // self.steps_per_epoch
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, self._epoch(epoch)
        return self.batches[step % self.steps_per_epoch].tolist()
