"""Checkpoints: a resumed run continues exactly as the uninterrupted one (CPU, bit for bit),
Ctrl-C leaves a checkpoint to resume from, and a checkpoint of another run is refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from oms_ext.train import TrainError, TrainSettings, module_config, train
from oms_ext.train.trainer import latest_checkpoint
from tests.train_helpers import channel_mean_latents, one_thread, tiny_encoder  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
MEANS = {"a dark night": [-1.0] * 4, "a bright beach": [1.0] * 4}


@pytest.fixture(scope="module")
def parts():
    encoder = tiny_encoder()
    return encoder, channel_mean_latents(MEANS, per_caption=3), module_config("tiny", 32)


def _settings(out: Path, **kw) -> TrainSettings:
    defaults = dict(
        output_dir=out, steps=6, batch_size=4, grad_accum=2, resolution=64,
        learning_rate=1e-3, save_every=3, cpu=True, progress=False,
    )  # fmt: skip
    return TrainSettings(**{**defaults, **kw})


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(parts, tmp_path_factory):
    encoder, examples, config = parts
    out = tmp_path_factory.mktemp("full")
    result = train(_settings(out), examples, encoder, config, family="sd1")
    return _weights(result.model), out


def test_six_steps_equal_three_then_resume_then_three(parts, uninterrupted, tmp_path) -> None:
    encoder, examples, config = parts
    full, out = uninterrupted
    checkpoint = out / "checkpoints" / "step-000003.safetensors"
    resumed = train(_settings(tmp_path), examples, encoder, config, family="sd1",
                    resume=checkpoint)  # fmt: skip
    assert resumed.step == 6
    _assert_identical(full, _weights(resumed.model))


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(parts, uninterrupted, tmp_path) -> None:
    encoder, examples, config = parts
    full, _ = uninterrupted

    def interrupt(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_settings(tmp_path, save_every=0), examples, encoder, config, family="sd1",
              after_step=interrupt)  # fmt: skip
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step-000002.safetensors"
    resumed = train(_settings(tmp_path, save_every=0), examples, encoder, config, family="sd1",
                    resume=checkpoint)  # fmt: skip
    _assert_identical(full, _weights(resumed.model))


def test_checkpoint_of_another_run_is_refused(parts, uninterrupted, tmp_path) -> None:
    encoder, examples, config = parts
    _, out = uninterrupted
    checkpoint = out / "checkpoints" / "step-000003.safetensors"
    with pytest.raises(TrainError, match="another run .*seed"):
        train(_settings(tmp_path, seed=1), examples, encoder, config, family="sd1",
              resume=checkpoint)  # fmt: skip


def test_only_the_newest_checkpoints_are_kept(parts, tmp_path) -> None:
    encoder, examples, config = parts
    train(_settings(tmp_path, save_every=1, keep_checkpoints=2), examples, encoder, config,
          family="sd1")  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000005.safetensors", "step-000006.safetensors"]


def test_bf16_mixed_precision_trains_fp32_weights(parts, tmp_path) -> None:
    encoder, examples, config = parts
    runs = {
        precision: train(_settings(tmp_path / precision, steps=2, save_every=0,
                                   mixed_precision=precision), examples, encoder, config,
                         family="sd1")
        for precision in ("no", "bf16")
    }  # fmt: skip
    bf16 = runs["bf16"].model
    assert {p.dtype for p in bf16.parameters()} == {torch.float32}
    assert math.isfinite(runs["bf16"].loss)
    fp32 = dict(runs["no"].model.named_parameters())
    assert any(not torch.equal(p, fp32[n]) for n, p in bf16.named_parameters())  # autocast ran
