"""Write a toy training folder for ``python -m oms_ext.train`` from scikit-image's bundled
sample pictures (no download: they ship inside the ``scikit-image`` wheel).

Twelve photos, each with a same-name ``.txt`` caption that names its brightness and colour, the
low-frequency traits an OMS module learns. A toy: twelve images teach a module nothing a
real data set would; the point is to see every part of a run work on a CPU in minutes.

Usage: python tools/toy_training_set.py OUT_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

#: scikit-image data file -> caption.
CAPTIONS = {
    "astronaut.png": "a bright colourful portrait of an astronaut in front of a flag",
    "chelsea.png": "a photo of a ginger cat, warm brown tones",
    "coffee.png": "a cup of coffee on a red table, warm light",
    "rocket.jpg": "a rocket on a launch pad under a blue sky",
    "hubble_deep_field.jpg": "a dark night sky full of distant galaxies",
    "moon.png": "a dark grey photo of the moon's surface",
    "camera.png": "a black and white photo of a man with a camera",
    "retina.jpg": "a dark red photo of a retina",
    "coins.png": "a dark grey photo of old coins",
    "motorcycle_left.png": "a photo of a red motorcycle in a garage",
    "ihc.png": "a bright microscope image with brown and blue stains",
    "horse.png": "a black horse silhouette on a white background",
}


def write_toy_set(out: Path) -> list[Path]:
    """Copy the pictures into ``out`` (as PNG) with their captions; returns the images."""
    import skimage.data
    from PIL import Image

    source = Path(skimage.data.__file__).parent
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, caption in CAPTIONS.items():
        target = out / f"{Path(name).stem}.png"
        with Image.open(source / name) as image:
            image.convert("RGB").save(target)
        target.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    images = write_toy_set(Path(argv[0]))
    print(f"{len(images)} captioned images in {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
