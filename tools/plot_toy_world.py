"""Plot the toy-world figures: where each WebUI sampler lands with and without OMS.

Runs the real samplers of :mod:`toy_world` (k-diffusion's functions and the WebUI DDIM loop)
from four starts and writes ``docs/toy-world.png``: the generated channel mean as a fraction
of the target mean the prompt asks for (1.0 = reached). Usage: ``python tools/plot_toy_world.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_world

OUT = Path(__file__).resolve().parents[1] / "docs" / "toy-world.png"
STARTS = (
    ("plain", "plain noise (no OMS)", "#9e9e9e"),
    ("oms", "OMS start via oms_ext.spaces", "#1565c0"),
    ("comfyui", "OMS x_T fed unconverted", "#e53935"),
    ("oms_at_999", "OMS with abar at t=999, not the real start", "#fb8c00"),
)


def main() -> None:
    labels, reached = [], {key: [] for key, _, _ in STARTS}
    for sampler in toy_world.SAMPLERS:
        labels.append(sampler.label.replace(" + ", "\n+ "))
        row = toy_world.figures(sampler, sgm=False)
        for key, _, _ in STARTS:
            # Relative error e of the mean (worst prompt/channel); fraction reached = 1 - e.
            reached[key].append(1.0 - row[key] if key in row else np.nan)

    x = np.arange(len(labels))
    width = 0.2
    fig, ax = plt.subplots(figsize=(12, 4.6), dpi=110)
    for i, (key, name, colour) in enumerate(STARTS):
        ax.bar(x + (i - 1.5) * width, reached[key], width, label=name, color=colour)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.text(len(labels) - 0.5, 1.02, "target mean", ha="right", va="bottom", fontsize=9)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("generated mean / target mean\n(worst prompt and channel)")
    ax.set_title(
        f"Gaussian toy world, SD scaled_linear schedule, exact denoiser, {toy_world.STEPS} steps"
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    OUT.parent.mkdir(exist_ok=True)
    fig.savefig(OUT)
    print(f"wrote {OUT.relative_to(OUT.parents[1])}")


if __name__ == "__main__":
    main()
