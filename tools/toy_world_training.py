"""The paper's core claim end to end, in a toy world where everything is trained here.

Data: latents [4, 8, 8] whose brightness (every channel and pixel) is set by the caption, -1.5
("a dark image"), 0 ("a grey image") or +1.5 ("a bright image"), plus a per-image offset (std
``SPREAD``) and per-pixel variation (std 0.1). A small diffusion model (an MLP with timestep and
caption inputs, predicting x0) is trained on them under Stable Diffusion's scaled_linear
schedule, whose last step keeps sqrt(alpha_bar_999) = 0.068 of the image. Sampled with DDIM
(20 steps from t = 999) from pure noise, as the WebUIs do, its images lose that leaked
brightness: dark and bright images come out nearer grey. An OMS module trained on the same
latents by ``oms_ext.train`` (the tiny preset, the test text encoder) gives the start
x_T = sqrt(abar) x0_hat + sqrt(1 - abar) x_S (Eq. 20) instead, and the same sampler makes
images with the data's brightness per caption.

Run ``python tools/toy_world_training.py`` to print the table (and, with ``--plot FILE``, draw
the brightness histograms); ``tests/test_train_toy_world.py`` asserts on a smaller run.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oms_ext.schedules import sd_alphas_cumprod  # noqa: E402
from oms_ext.step import oms_start  # noqa: E402

CAPTIONS = {"a dark image": -1.5, "a grey image": 0.0, "a bright image": 1.5}
SPREAD = 1.0
PIXEL_STD = 0.1
SHAPE = (4, 8, 8)
SAMPLER_STEPS = 20
BATCH = 128  # base-model training batch


@dataclass(frozen=True)
class Budget:
    """How long each part trains: images per caption, base-model steps, OMS steps."""

    images: int = 64
    base_steps: int = 3000
    oms_steps: int = 600
    samples: int = 128  # generated images per caption


def make_data(images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [N, 4, 8, 8] and caption ids [N] (``images`` per caption)."""
    g = torch.Generator().manual_seed(seed)
    latents, ids = [], []
    for i, level in enumerate(CAPTIONS.values()):
        offset = SPREAD * torch.randn((images, 1, 1, 1), generator=g)
        pixels = PIXEL_STD * torch.randn((images, *SHAPE), generator=g)
        latents.append(level + offset + pixels)
        ids.append(torch.full((images,), i))
    return torch.cat(latents), torch.cat(ids)


class BaseModel(nn.Module):
    """x0-prediction diffusion model: MLP over the flattened latent, its channel means (a
    global-pooling path, as a UNet's deepest level has), a sinusoidal timestep embedding and
    a caption embedding."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        dim = math.prod(SHAPE)
        self.caption = nn.Embedding(len(CAPTIONS), 64)
        self.net = nn.Sequential(
            nn.Linear(dim + SHAPE[0] + 64 + 64, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.arange(32) * (-math.log(1000.0) / 32))
        angles = t[:, None].float() * freqs[None]
        time = torch.cat([angles.sin(), angles.cos()], dim=1)
        pooled = x.mean(dim=(2, 3)) * math.sqrt(SHAPE[1] * SHAPE[2])  # unit variance in noise
        h = torch.cat([x.flatten(1), pooled, time, self.caption(caption)], dim=1)
        return self.net(h).view(-1, *SHAPE)


def train_base(latents: torch.Tensor, ids: torch.Tensor, steps: int, seed: int = 0) -> BaseModel:
    """Train on SD's schedule: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t uniform."""
    torch.manual_seed(seed)
    abar = sd_alphas_cumprod().float()
    model = BaseModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        pick = torch.randint(0, len(latents), (BATCH,), generator=g)
        x0, caption = latents[pick], ids[pick]
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        a = abar[t][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(model(x_t, t, caption), x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == int(steps * 0.8):
            for group in optimizer.param_groups:
                group["lr"] = 1e-4
    return model.eval().requires_grad_(False)


@torch.no_grad()
def ddim(model: BaseModel, x_t: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0), SAMPLER_STEPS steps from t = 999 to 0."""
    abar = sd_alphas_cumprod().float()
    times = torch.linspace(999, 0, SAMPLER_STEPS).round().long()
    x = x_t
    for i, t in enumerate(times):
        a = abar[t]
        x0 = model(x, t.repeat(len(x)), caption)
        if i == len(times) - 1:
            return x0
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        a_next = abar[times[i + 1]]
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def train_oms(latents: torch.Tensor, ids: torch.Tensor, steps: int, out: Path):
    """An OMS module trained by oms_ext.train on the latents and their captions."""
    from oms_ext.text import load_prompt_encoder
    from oms_ext.train import LatentExample, TrainSettings, module_config, train

    encoder = load_prompt_encoder(ROOT / "tests" / "data" / "oms-tiny")
    names = list(CAPTIONS)
    pairs = zip(latents, ids, strict=True)
    examples = [LatentExample(x, x.flip(-1), names[int(i)]) for x, i in pairs]
    settings = TrainSettings(
        output_dir=out, steps=steps, batch_size=16, resolution=8 * SHAPE[1],
        learning_rate=1e-3, save_every=0, cpu=True, progress=False,
    )  # fmt: skip
    config = module_config("tiny", encoder.hidden_size)
    return train(settings, examples, encoder, config, family="sd1").model, encoder


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Per-image brightness: the mean over channels and pixels."""
    return x.mean(dim=(1, 2, 3))


def run(budget: Budget, out: Path, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Per caption, the brightness of the data, of images from pure noise and from OMS."""
    latents, ids = make_data(budget.images, seed)
    base = train_base(latents, ids, budget.base_steps, seed)
    module, encoder = train_oms(latents, ids, budget.oms_steps, out)
    abar_t = float(sd_alphas_cumprod()[999])
    g = torch.Generator().manual_seed(seed + 2)
    result = {}
    for i, name in enumerate(CAPTIONS):
        caption = torch.full((budget.samples,), i)
        x_s = torch.randn((budget.samples, *SHAPE), generator=g)
        with torch.no_grad():
            x0_hat = -module(x_s, encoder([name] * budget.samples))
        x_t = oms_start(x0_hat, x_s, abar_t)
        result[name] = {
            "data": brightness(latents[ids == i]),
            "pure noise": brightness(ddim(base, x_s, caption)),
            "OMS": brightness(ddim(base, x_t, caption)),
        }
    return result


def table(result: dict[str, dict[str, torch.Tensor]]) -> str:
    """Markdown table: mean (std) brightness per caption and start."""
    lines = ["| caption | data | from pure noise | from the OMS start |", "|---|---|---|---|"]
    for name, parts in result.items():
        cells = [f"{float(v.mean()):+.2f} ({float(v.std()):.2f})" for v in parts.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9, 2.6), sharey=True)
    bins = torch.linspace(-4, 4, 41).tolist()
    colors = {"data": "0.4", "pure noise": "tab:red", "OMS": "tab:blue"}
    for ax, (label, color) in zip(axes, colors.items(), strict=True):
        for parts in result.values():
            ax.hist(parts[label].tolist(), bins=bins, alpha=0.55, color=color, density=True)
            ax.axvline(float(parts[label].mean()), color="k", lw=0.8)
        ax.set_title({"data": "training data", "pure noise": "sampled from pure noise",
                      "OMS": "sampled from the OMS start"}[label], fontsize=9)  # fmt: skip
        ax.set_xlabel("image brightness (latent mean)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, help="PNG of the brightness histograms")
    parser.add_argument("--out", type=Path, default=Path("toy_world_run"), help="OMS run folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run(Budget(), args.out)
    print(table(result))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
