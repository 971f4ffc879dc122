"""Bad training input: one clear line on stderr, exit status 2, no traceback, nothing
half-written (no module folder, no checkpoint, no cache entry)."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from oms_ext.train.cli import main
from tests.train_helpers import (  # noqa: F401
    RESOLUTION,
    TINY_ENCODER,
    one_thread,
    tiny_vae_folder,
    write_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = {"dark": "a dark room", "bright": "a bright beach"}


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    return tiny_vae_folder(tmp_path_factory.mktemp("vae"))


def _run(tmp_path: Path, data: Path, checkpoint: Path, *extra: str) -> int:
    return main([
        "--data", str(data), "--checkpoint", str(checkpoint), "--encoder", str(TINY_ENCODER),
        "--size", "tiny", "--output-dir", str(tmp_path / "out"), "--cache-dir",
        str(tmp_path / "cache"), "--resolution", str(RESOLUTION), "--steps", "1",
        "--batch-size", "1", "--cpu", "--preview-every", "0", *extra,
    ])  # fmt: skip


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("oms_ext.train: error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    err = lines[0]
    for word in words:
        assert word in err, err
    return err


def _nothing_written(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert not out.exists() or not any(out.rglob("*.safetensors"))
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


def test_empty_folder(tmp_path: Path, vae: Path, capsys) -> None:
    (tmp_path / "data").mkdir()
    assert _run(tmp_path, tmp_path / "data", vae) == 2
    _one_line_error(capsys, "no images")
    _nothing_written(tmp_path)


def test_images_without_captions_are_counted_and_trained_with_the_empty_caption(
    tmp_path: Path, vae: Path, capsys
) -> None:
    data = write_images(tmp_path / "data", {**CAPTIONS, "plain": None})
    assert _run(tmp_path, data, vae) == 0
    assert '1 without a caption (trained with "")' in capsys.readouterr().out


def test_images_without_captions_are_refused_on_request(tmp_path: Path, vae: Path, capsys) -> None:
    data = write_images(tmp_path / "data", {**CAPTIONS, "plain": None})
    assert _run(tmp_path, data, vae, "--require-captions") == 2
    _one_line_error(capsys, "1 of 3 images have no caption", "plain.png")
    _nothing_written(tmp_path)


def test_unreadable_and_tiny_images_are_skipped_with_a_count(
    tmp_path: Path, vae: Path, capsys
) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    (data / "broken.png").write_bytes(b"not a png at all")
    write_images(data, {"tiny": "a tiny one"}, size=(8, 8))
    assert _run(tmp_path, data, vae) == 0
    assert "skipped 1 unreadable and 1 too small image(s)" in capsys.readouterr().out


def test_no_usable_image_left(tmp_path: Path, vae: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"\x89PNG broken")
    assert _run(tmp_path, data, vae) == 2
    _one_line_error(capsys, "no usable training images")
    _nothing_written(tmp_path)


def _header_file(path: Path, keys: list[str]) -> Path:
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        (["double_blocks.0.img_attn.qkv.weight", "vae.encoder.conv_in.weight"], "Flux"),
        (["model.diffusion_model.joint_blocks.0.x"], "SD3"),
        (["some.other.model.weight"], "not an SD1.x, SD2.x or SDXL checkpoint"),
        (["cond_stage_model.transformer.text_model.x", "model.diffusion_model.x"], "holds no VAE"),
    ],
    ids=["flux", "sd3", "unknown", "sd1-without-vae"],
)
def test_checkpoint_that_is_not_sd(tmp_path: Path, capsys, keys, words) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    checkpoint = _header_file(tmp_path / "model.safetensors", keys)
    assert _run(tmp_path, data, checkpoint) == 2
    _one_line_error(capsys, words)
    _nothing_written(tmp_path)


def test_vae_only_file_needs_the_family(tmp_path: Path, capsys) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    vae_file = _header_file(tmp_path / "vae.safetensors", ["encoder.x", "decoder.x"])
    assert _run(tmp_path, data, vae_file) == 2
    _one_line_error(capsys, "--family")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoint_is_refused_unopened(tmp_path: Path, capsys, suffix: str) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    pickle = tmp_path / f"vae{suffix}"
    pickle.write_bytes(b"\x80\x04 would run code")
    assert _run(tmp_path, data, pickle) == 2
    _one_line_error(capsys, "pickle", "refused")


def test_diffusers_vae_folder_with_only_pickle_weights_is_refused(
    tmp_path: Path, vae: Path, capsys
) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_bytes((vae / "config.json").read_bytes())
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 would run code")
    assert _run(tmp_path, data, folder) == 2
    _one_line_error(capsys, "no .safetensors VAE weights", "pickle")


def _small_disk_at(folder: Path, monkeypatch) -> None:
    """shutil.disk_usage reports 1000 bytes free in ``folder`` (created), the truth elsewhere."""
    import shutil

    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    folder.mkdir(parents=True, exist_ok=True)

    def fake(path):
        return usage(10**9, 10**9 - 1000, 1000) if Path(path) == folder else real(path)

    monkeypatch.setattr("shutil.disk_usage", fake)


def test_not_enough_disk_for_the_cache(tmp_path: Path, vae: Path, capsys, monkeypatch) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    _small_disk_at(tmp_path / "cache", monkeypatch)
    assert _run(tmp_path, data, vae) == 2
    _one_line_error(capsys, "not enough disk for the latent cache", "MB free")
    _nothing_written(tmp_path)


def test_not_enough_disk_for_the_module(tmp_path: Path, vae: Path, capsys, monkeypatch) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    _small_disk_at(tmp_path / "out", monkeypatch)
    assert _run(tmp_path, data, vae) == 2
    _one_line_error(capsys, "not enough disk for the module and its checkpoints")
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert not (tmp_path / "out" / "oms_own").exists()
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())


def test_batch_that_does_not_split_over_accumulation(tmp_path: Path, vae: Path, capsys) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    assert _run(tmp_path, data, vae, "--batch-size", "3", "--grad-accum", "2") == 2
    _one_line_error(capsys, "multiple of --grad-accum")
    _nothing_written(tmp_path)  # refused before any latent is encoded


def test_release_encoder_not_on_this_computer(tmp_path: Path, vae: Path, capsys) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    args = ["--encoder", "release", "--models-dir", str(tmp_path / "models")]
    assert _run(tmp_path, data, vae, *args) == 2
    _one_line_error(capsys, "stabilityai/stable-diffusion-2-1", "huggingface-cli download")
    _nothing_written(tmp_path)


def test_not_enough_memory_for_the_latents(tmp_path: Path, vae: Path, capsys, monkeypatch) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    monkeypatch.setattr("oms_ext.train.latents.available_memory", lambda: 1000)
    assert _run(tmp_path, data, vae) == 2
    _one_line_error(capsys, "not enough memory for the latents of 2 images", "MB available")
    _nothing_written(tmp_path)


def test_fp16_mixed_precision_on_the_cpu_is_refused_before_any_work(
    tmp_path: Path, vae: Path, capsys
) -> None:
    """accelerate would quietly train in fp32 there."""
    data = write_images(tmp_path / "data", CAPTIONS)
    assert _run(tmp_path, data, vae, "--mixed-precision", "fp16") == 2
    _one_line_error(capsys, "--mixed-precision fp16 needs a GPU", "bf16")
    _nothing_written(tmp_path)
