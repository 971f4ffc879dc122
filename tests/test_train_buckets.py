"""Aspect-ratio buckets (--buckets): the bucket grid, which bucket each image goes to and the
size it is encoded at, merging of buckets smaller than a step's batch, a step schedule that
draws each batch from one bucket (a pure function of seed and step, so resume is exact), and
a bucketed run that trains."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from oms_ext.loading import training_facts
from oms_ext.train import LatentExample, TrainError, TrainSettings, module_config, train
from oms_ext.train.buckets import BucketSchedule, bucket_sizes, nearest_bucket, plan_buckets
from oms_ext.train.cli import main
from oms_ext.train.data import cover_size, load_image
from oms_ext.unet import build_unet
from tests.train_helpers import (  # noqa: F401
    TINY_ENCODER,
    one_thread,
    tiny_encoder,
    tiny_vae_folder,
    write_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")
WIDE, SQUARE, TALL = (256, 128), (192, 192), (128, 256)  # the buckets of 192 px


def test_buckets_of_512_are_64_px_sizes_of_about_its_area_within_1_2_and_2_1() -> None:
    buckets = bucket_sizes(512)
    assert buckets == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    for w, h in bucket_sizes(1024):
        assert w % 64 == 0 and h % 64 == 0
        assert 0.9 * 1024**2 <= w * h <= 1024**2 and max(w / h, h / w) <= 2
        assert (h, w) in bucket_sizes(1024)


@pytest.mark.parametrize(
    ("image", "bucket"),
    [((1000, 500), (640, 384)), ((500, 1000), (384, 640)), ((800, 600), (576, 448)),
     ((1000, 1000), (512, 512)), ((3000, 500), (640, 384))],
)  # fmt: skip
def test_an_image_goes_to_the_bucket_nearest_its_aspect_ratio(image, bucket) -> None:
    assert nearest_bucket(*image, bucket_sizes(512)) == bucket


def test_an_image_is_resized_to_cover_its_bucket_on_the_8_px_grid(tmp_path: Path) -> None:
    assert cover_size(1000, 500, (640, 384)) == (768, 384)  # the width is cropped
    assert cover_size(800, 600, (576, 448)) == (600, 448)
    assert cover_size(500, 1000, (384, 640)) == (384, 768)
    write_images(tmp_path, {"x": None}, size=(96, 64))
    assert load_image(tmp_path / "x.png", 64, min_size=16, bucket=(128, 64)).shape == (3, 88, 128)


def test_buckets_with_fewer_images_than_a_step_merge_into_the_nearest_bucket() -> None:
    sizes = [(200, 200)] * 5 + [(300, 150)] * 2 + [(150, 300)]
    plan = plan_buckets(sizes, 192, batch=4, min_size=96)
    assert plan.merged == [(1, TALL, SQUARE), (2, WIDE, SQUARE)]
    assert plan.buckets == [SQUARE] * 8
    kept = plan_buckets(sizes, 192, batch=2, min_size=96)
    assert kept.merged == [(1, TALL, SQUARE)] and kept.buckets[5:] == [WIDE, WIDE, SQUARE]


def test_images_that_will_be_skipped_count_for_no_bucket() -> None:
    sizes = [(200, 200)] * 2 + [(300, 150), (120, 60), None]  # too small, unreadable
    plan = plan_buckets(sizes, 192, batch=2, min_size=96)
    assert plan.merged == [(1, WIDE, SQUARE)]  # one usable wide image only


def _steps(schedule: BucketSchedule, first: int, count: int) -> list[list[int]]:
    return [schedule(s) for s in range(first, first + count)]


def test_every_step_takes_its_batch_from_one_bucket_and_an_epoch_sees_every_image() -> None:
    buckets = [SQUARE] * 5 + [WIDE] * 3
    schedule = BucketSchedule(seed=3, buckets=buckets, batch=2)
    assert schedule.steps_per_epoch == 3 + 2
    for epoch in range(3):
        steps = _steps(schedule, epoch * 5, 5)
        assert all(len({buckets[i] for i in step}) == 1 for step in steps)
        seen = Counter(i for step in steps for i in step)
        assert set(seen) == set(range(8))
        # each bucket's last batch is filled from the same bucket: one square and one wide
        # image are seen twice
        assert sorted(seen.values()) == [1] * 6 + [2] * 2
    assert _steps(schedule, 0, 5) != _steps(schedule, 5, 5)  # a new order each epoch


def test_a_bucket_smaller_than_a_batch_repeats_its_own_images() -> None:
    buckets = [SQUARE] * 4 + [TALL]
    steps = _steps(BucketSchedule(seed=0, buckets=buckets, batch=4), 0, 2)
    assert sorted(map(sorted, steps)) == [[0, 1, 2, 3], [4, 4, 4, 4]]


def test_the_schedule_is_a_pure_function_of_seed_and_step() -> None:
    buckets = [SQUARE] * 5 + [WIDE] * 3 + [TALL] * 2
    walked = _steps(BucketSchedule(seed=7, buckets=buckets, batch=2), 0, 20)
    for step in (13, 4, 19):  # a fresh schedule (a resumed run, another process) at any step
        assert BucketSchedule(seed=7, buckets=buckets, batch=2)(step) == walked[step]
    assert _steps(BucketSchedule(seed=8, buckets=buckets, batch=2), 0, 20) != walked


def test_buckets_need_a_resolution_on_their_64_px_grid(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="multiple of 64"):
        TrainSettings(output_dir=tmp_path, resolution=72, buckets=True).check()


def test_the_fingerprint_without_buckets_is_that_of_earlier_runs(tmp_path: Path) -> None:
    plain = TrainSettings(output_dir=tmp_path).fingerprint({}, "d")
    assert set(plain) == {"model", "batch_size", "seed", "resolution", "caption_dropout", "data"}
    assert TrainSettings(output_dir=tmp_path, buckets=True).fingerprint({}, "d")["buckets"]


# The trainer itself takes any bucket sizes: small ones keep these runs fast.
SMALL = {(64, 64): 4, (128, 64): 3, (64, 128): 2}  # bucket: images
MEANS = {"a dark night": -1.0, "a bright beach": 1.0}


def _bucketed_examples(seed: int = 0) -> list[LatentExample]:
    """Latents a little larger than their bucket (random crops), the caption setting the
    mean."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for (w, h), count in SMALL.items():
        for i in range(count):
            caption = list(MEANS)[i % 2]
            latent = MEANS[caption] + 0.2 * torch.randn((4, h // 8 + 2, w // 8), generator=g)
            out.append(LatentExample(latent, latent.flip(-1), caption, (w, h)))
    return out


def _settings(out: Path, **kw) -> TrainSettings:
    defaults = dict(
        output_dir=out, steps=6, batch_size=4, grad_accum=2, resolution=64, buckets=True,
        learning_rate=1e-3, save_every=3, cpu=True, progress=False,
    )  # fmt: skip
    return TrainSettings(**{**defaults, **kw})


@pytest.fixture(scope="module")
def parts():
    return tiny_encoder(), _bucketed_examples(), module_config("tiny", 32)


def test_six_bucketed_steps_equal_three_then_resume_then_three(parts, tmp_path, capsys) -> None:
    encoder, examples, config = parts
    full = train(_settings(tmp_path / "full"), examples, encoder, config, family="sd1")
    assert "buckets: 64x64 x 4, 128x64 x 3, 64x128 x 2 (3 steps an epoch" in capsys.readouterr().out
    checkpoint = tmp_path / "full" / "checkpoints" / "step-000003.safetensors"
    resumed = train(_settings(tmp_path / "part"), examples, encoder, config, family="sd1",
                    resume=checkpoint)  # fmt: skip
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert resumed.step == 6 and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainError, match="another run .*buckets"):
        train(_settings(tmp_path / "square", buckets=False), examples, encoder, config,
              family="sd1", resume=checkpoint)  # fmt: skip


@torch.no_grad()
def _loss(model, encoder, examples) -> float:
    """Mean L2 between psi(x_S, C) and v = -x0 over every example's bucket-sized latent."""
    g = torch.Generator().manual_seed(99)
    losses = []
    for e in examples:
        h, w = e.crop_cells(8)
        x0 = e.latent[None, :, :h, :w]
        noise = torch.randn(x0.shape, generator=g)
        losses.append(float(F.mse_loss(model(noise, encoder([e.caption])), -x0)))
    return sum(losses) / len(losses)


def test_a_bucketed_run_lowers_the_loss(parts, tmp_path) -> None:
    encoder, examples, config = parts
    trained = train(_settings(tmp_path, steps=40, grad_accum=1, save_every=0), examples,
                    encoder, config, family="sd1").model  # fmt: skip
    torch.manual_seed(0)  # the run's seed: the weights it started from
    untrained = build_unet(config).eval()
    before, after = _loss(untrained, encoder, examples), _loss(trained, encoder, examples)
    assert math.isfinite(after) and after < 0.3 * before, (before, after)


def test_cli_caches_each_image_at_its_bucket_and_says_so(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    write_images(data, {"sq1": "a dark room", "sq2": "a red car"}, size=(200, 200))
    write_images(data / "wide", {"w1": "a bright beach", "w2": "a blue sky"}, size=(300, 150))
    write_images(data / "tall", {"t1": "a tall tower"}, size=(150, 300))
    vae = tiny_vae_folder(tmp_path / "vae")
    args = [
        "--data", str(data), "--checkpoint", str(vae), "--encoder", str(TINY_ENCODER),
        "--size", "tiny", "--output-dir", str(tmp_path / "out"), "--name", "mine",
        "--cache-dir", str(tmp_path / "cache"), "--resolution", "192", "--steps", "2",
        "--batch-size", "2", "--preview-every", "0", "--save-every", "0", "--cpu",
    ]  # fmt: skip
    assert main([*args, "--buckets"]) == 0
    out = capsys.readouterr().out
    assert "buckets: 1 image(s) of 128x256 trained in 192x192 (fewer than the 2 of a step)" in out
    assert "buckets: 192x192 x 3, 256x128 x 2 (3 steps an epoch" in out
    assert "Latents: 5 encoded, 0 from the cache" in out
    shapes = sorted(tuple(load_file(str(p))["latent"].shape[1:]) for p in
                    (tmp_path / "cache").rglob("*.safetensors"))  # fmt: skip
    assert shapes == [(16, 32), (16, 32), (24, 24), (24, 24), (48, 24)]  # tall: covers 192x192
    assert training_facts(tmp_path / "out" / "mine")["buckets"] is True
    assert main([*args, "--buckets"]) == 0
    assert "Latents: 0 encoded, 5 from the cache" in capsys.readouterr().out
    assert main(args) == 0  # square crops: other cache entries
    out = capsys.readouterr().out
    assert "Latents: 5 encoded, 0 from the cache" in out and "buckets" not in out


def test_buckets_are_off_unless_asked_for_by_flag_or_config_file(tmp_path: Path) -> None:
    from oms_ext.train.cli import resolve_options

    base = ["--data", "imgs", "--output-dir", "out"]
    assert resolve_options(base)["buckets"] is False
    assert resolve_options([*base, "--buckets"])["buckets"] is True
    config = tmp_path / "train.toml"
    config.write_text("buckets = true\n")
    assert resolve_options([*base, "--config", str(config)])["buckets"] is True
