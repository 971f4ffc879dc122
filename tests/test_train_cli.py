"""python -m oms_ext.train end to end: a folder of captioned images to a module folder in the
released layout that load_oms loads as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from oms_ext import load_oms
from oms_ext.loading import training_facts
from oms_ext.train.cli import main, resolve_options
from tests.train_helpers import (  # noqa: F401
    RESOLUTION,
    TINY_ENCODER,
    one_thread,
    tiny_vae_folder,
    write_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = {"dark": "a dark room", "bright": "a bright beach", "red": "a red car", "plain": None}


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    return tiny_vae_folder(tmp_path_factory.mktemp("vae"))


def _args(data: Path, vae: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--checkpoint", str(vae), "--encoder", str(TINY_ENCODER),
        "--size", "tiny", "--output-dir", str(out), "--name", "mine", "--cache-dir", str(cache),
        "--resolution", str(RESOLUTION), "--steps", "4", "--batch-size", "2", "--cpu",
        "--learning-rate", "1e-3", "--preview-every", "2", "--save-every", "2", *extra,
    ]  # fmt: skip


def test_trained_module_loads_as_released_and_predicts(tmp_path: Path, vae: Path, capsys) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    assert main(_args(data, vae, tmp_path / "out", tmp_path / "cache")) == 0
    module = tmp_path / "out" / "mine"
    assert sorted(p.relative_to(module).as_posix() for p in module.rglob("*.json")) == [
        "model_index.json", "oms_module/config.json", "oms_text_encoder/config.json",
        "oms_tokenizer/config.json", "text_encoder/config.json",
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
    ]  # fmt: skip
    model = load_oms(module)
    x0 = model.predict_x0(torch.randn(2, 4, 8, 8), ["a dark room", "a red car"], cfg_scale=2.0)
    assert x0.shape == (2, 4, 8, 8) and torch.isfinite(x0).all()
    assert "uncaptioned" not in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # no leftovers


def test_module_metadata_records_the_run_without_local_paths(tmp_path: Path, vae: Path) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    main(_args(data, vae, tmp_path / "out", tmp_path / "cache"))
    facts = training_facts(tmp_path / "out" / "mine")
    assert facts["family"] == "sd1" and facts["steps"] == 4 and facts["images"] == 4
    assert facts["encoder_source"] == "module" and facts["size"] == "tiny"
    text = json.dumps(facts)
    assert str(tmp_path) not in text and "/" not in text.replace("oms_ext", "")


def test_previews_and_checkpoints_are_written_every_n_steps(tmp_path: Path, vae: Path) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    main(_args(data, vae, tmp_path / "out", tmp_path / "cache"))
    previews = sorted(p.name for p in (tmp_path / "out" / "previews").iterdir())
    assert previews == ["step-000002.png", "step-000004.png"]
    from PIL import Image

    with Image.open(tmp_path / "out" / "previews" / previews[0]) as image:
        assert image.size == (3 * RESOLUTION, RESOLUTION)  # one tile per preview prompt
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert checkpoints == ["step-000002.safetensors", "step-000004.safetensors"]


def test_latents_are_cached_once_and_reencoded_when_an_image_changes(
    tmp_path: Path, vae: Path, capsys
) -> None:
    data = write_images(tmp_path / "data", CAPTIONS)
    args = _args(data, vae, tmp_path / "out", tmp_path / "cache", "--steps", "1")
    main(args)
    assert "Latents: 4 encoded, 0 from the cache" in capsys.readouterr().out
    main(args)
    assert "Latents: 0 encoded, 4 from the cache" in capsys.readouterr().out
    write_images(data, {"red": "a red car"}, size=(80, 64))
    main(args)
    assert "Latents: 1 encoded, 3 from the cache" in capsys.readouterr().out
    main([*args, "--resolution", "72"])
    assert "Latents: 4 encoded, 0 from the cache" in capsys.readouterr().out
    other_vae = tiny_vae_folder(tmp_path / "other_vae", seed=1)
    main([*args, "--checkpoint", str(other_vae)])
    assert "Latents: 4 encoded, 0 from the cache" in capsys.readouterr().out


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text('data = "imgs"\noutput-dir = "out"\nsteps = 50\nlearning_rate = 1e-4\n')
    options = resolve_options(["--config", str(config), "--steps", "7"])
    assert options["steps"] == 7 and options["learning_rate"] == 1e-4
    assert options["data"] == tmp_path / "imgs"  # relative to the config file
    assert options["caption_dropout"] == 0.1  # default


def test_json_config_files_work_too(tmp_path: Path) -> None:
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"data": "imgs", "output_dir": "out", "size": "oms-b"}))
    assert resolve_options(["--config", str(config)])["size"] == "oms-b"


def test_readme_toy_set_trains_without_skipping_an_image(tmp_path: Path, vae: Path, capsys) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "toy_training_set", Path(__file__).resolve().parents[1] / "tools" / "toy_training_set.py"
    )
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    toy.write_toy_set(tmp_path / "toy")
    args = _args(tmp_path / "toy", vae, tmp_path / "out", tmp_path / "cache", "--steps", "1")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "OMS training data: 12 images" in out and "Latents: 12 encoded" in out
    assert "skipped" not in out and "without a caption" not in out


def test_resume_latest_continues_a_run_to_the_weights_of_an_uninterrupted_one(
    tmp_path: Path, vae: Path
) -> None:
    from safetensors.torch import load_file

    data = write_images(tmp_path / "data", CAPTIONS)
    weights = Path("mine") / "oms_module" / "diffusion_pytorch_model.safetensors"
    full = _args(data, vae, tmp_path / "full", tmp_path / "cache", "--steps", "6")
    assert main(full) == 0
    part = _args(data, vae, tmp_path / "part", tmp_path / "cache", "--steps", "4")
    assert main(part) == 0
    assert main([*part, "--steps", "6", "--resume", "latest"]) == 0
    assert training_facts(tmp_path / "part" / "mine")["steps"] == 6
    a, b = load_file(str(tmp_path / "full" / weights)), load_file(str(tmp_path / "part" / weights))
    assert all(torch.equal(a[k], b[k]) for k in a)
