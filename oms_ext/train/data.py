"""Training images and their captions, and the paper's image preprocessing (App. D.3).

A data folder is read the way the community's trainers read one:

* ``metadata.jsonl`` or ``metadata.csv`` at its top (Hugging Face ``imagefolder``): one row per
  image with ``file_name`` (relative to the folder) and the caption column (``text``);
* otherwise every image in the folder and its subfolders (hidden ones skipped), captioned by
  the ``.txt`` file of the same stem beside it (kohya-ss sd-scripts, OneTrainer).

Images are resized so that the short side equals the training resolution (the long side keeps
the aspect ratio, rounded to a multiple of 8 pixels), or with ``--buckets`` so that they cover
their aspect-ratio bucket (:mod:`oms_ext.train.buckets`); the random crop (square, or the
bucket's size) and the random flip happen per step on the cached latents
(:mod:`oms_ext.train.latents`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from oms_ext.train.errors import TrainError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
#: Pixels per latent cell of the Stable Diffusion VAEs.
VAE_STRIDE = 8


@dataclass(frozen=True)
class Example:
    """One training image and its caption ("" when it has none)."""

    path: Path
    caption: str


@dataclass(frozen=True)
class Scan:
    """What a data folder holds: the examples and how many images had no caption."""

    examples: list[Example]
    uncaptioned: int


def scan_folder(folder: Path, *, caption_column: str = "text", require_captions: bool) -> Scan:
    """The captioned images of ``folder`` (see the module docstring), sorted by path.

    Images without a caption get "" (they teach the unconditional prediction CFG needs) unless
    ``require_captions``, which refuses the folder naming the first few. Raises
    :class:`TrainError` for a missing or empty folder and a malformed metadata file.
    """
    if not folder.is_dir():
        raise TrainError(f"training data: {folder} is not a folder")
    metadata = next((folder / n for n in METADATA_FILES if (folder / n).is_file()), None)
    if metadata is not None:
        pairs = _read_metadata(metadata, caption_column)
        examples = [Example(folder / name, text) for name, text in pairs]
        missing = [e for e in examples if not e.path.is_file()]
        if missing:
            raise TrainError(
                f"{metadata.name}: {len(missing)} listed image(s) are not in {folder}, e.g. "
                f"{missing[0].path.name}"
            )
    else:
        examples = [Example(p, _caption_beside(p)) for p in _images_in(folder)]
    if not examples:
        raise TrainError(
            f"training data: no images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}"
            f" files, or a {' / '.join(METADATA_FILES)})"
        )
    uncaptioned = [e for e in examples if not e.caption]
    if uncaptioned and require_captions:
        names = ", ".join(e.path.name for e in uncaptioned[:3])
        raise TrainError(
            f"training data: {len(uncaptioned)} of {len(examples)} images have no caption "
            f"(e.g. {names}); add same-name .txt files, or drop --require-captions to train "
            f"them with the empty caption"
        )
    return Scan(sorted(examples, key=lambda e: str(e.path)), len(uncaptioned))


def _images_in(folder: Path) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if not hidden and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
    return found


def _caption_beside(image: Path) -> str:
    text = image.with_suffix(".txt")
    if not text.is_file():
        return ""
    try:
        return text.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"caption {text}: cannot read it as UTF-8 text ({e})") from e


def _read_metadata(path: Path, column: str) -> list[tuple[str, str]]:
    """(file_name, caption) rows of a metadata.jsonl / metadata.csv."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"{path}: cannot read it as UTF-8 text ({e})") from e
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{path.name} line {number}: not JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise TrainError(f"{path.name} line {number}: expected a JSON object")
            rows.append(row)
    else:
        rows = list(csv.DictReader(text.splitlines()))
    pairs = []
    for number, row in enumerate(rows, 1):
        if "file_name" not in row:
            raise TrainError(f"{path.name} row {number}: no 'file_name' column")
        caption = row.get(column)
        pairs.append((str(row["file_name"]), "" if caption is None else str(caption).strip()))
    return pairs


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the short side = ``resolution`` px and the long side scaled alike,
    rounded to a multiple of :data:`VAE_STRIDE`."""
    scale = resolution / min(width, height)

    def side(n: int) -> int:
        return max(resolution, round(n * scale / VAE_STRIDE) * VAE_STRIDE)

    return (resolution, side(height)) if width <= height else (side(width), resolution)


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """(width, height) px to resize a width x height image to: the smallest scale that covers
    ``bucket``, each side rounded to a multiple of 8 px and never below the bucket's."""
    scale = max(bucket[0] / width, bucket[1] / height)

    def side(n: int, least: int) -> int:
        return max(least, round(n * scale / VAE_STRIDE) * VAE_STRIDE)

    return side(width, bucket[0]), side(height, bucket[1])


def load_image(
    path: Path, resolution: int, min_size: int, bucket: tuple[int, int] | None = None
) -> torch.Tensor | None:
    """The image as float32 [3, H, W] in [-1, 1], resized (bicubic, antialiased) so its short
    side is ``resolution``, or with a ``bucket`` (width, height) px so that it covers the
    bucket (:func:`cover_size`); None when it cannot be decoded or its short side is under
    ``min_size`` pixels (the caller counts those)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    if min(image.size) < min_size:
        return None
    if bucket is None:
        width, height = resized_size(*image.size, resolution)
    else:
        width, height = cover_size(*image.size, bucket)
    image = image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=None)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(height, width, 3).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0
