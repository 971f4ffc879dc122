"""The trainer's module folder is a release look-alike: the release encoder's pointers load
through the extension's own lookup, and the hosts' registry lists it as a local module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from oms_ext import load_oms
from oms_ext.loading import training_facts
from oms_ext.runtime.registry import module_status, scan_modules
from oms_ext.text import ENCODER_SOURCE_KEY, SD21_REPO, models_dir_folder
from oms_ext.train import module_config
from oms_ext.train.encoders import choose_encoder
from oms_ext.train.export import export_module
from oms_ext.unet import build_unet
from tests.train_helpers import TINY_MODULE


def _models_with_sd21_encoder(root: Path) -> Path:
    """A models folder holding a (tiny stand-in) SD 2.1 text encoder where the WebUI keeps it."""
    for part in ("text_encoder", "tokenizer"):
        shutil.copytree(TINY_MODULE / part, models_dir_folder(root, SD21_REPO, part))
    return root


def test_release_encoder_module_names_sd21_and_loads_from_the_models_folder(tmp_path) -> None:
    models = _models_with_sd21_encoder(tmp_path / "models")
    choice = choose_encoder("release", None, models, torch.float32)
    config = module_config("tiny", choice.encoder.hidden_size)
    module = export_module(tmp_path / "oms" / "mine", build_unet(config), config, choice,
                           {"family": "sd1"})  # fmt: skip
    pointer = json.loads((module / "oms_text_encoder" / "config.json").read_text())
    assert pointer == {"_class_name": "CLIPTextModel", "_name_or_path": SD21_REPO,
                       "subfolder": "text_encoder"}  # fmt: skip
    assert ENCODER_SOURCE_KEY not in pointer
    model = load_oms(module, models_dir=models)
    x0 = model.predict_x0(torch.randn(1, 4, 8, 8), "a red car", 1.0)
    assert x0.shape == (1, 4, 8, 8)


def test_registry_lists_the_trained_module_as_a_local_folder(tmp_path) -> None:
    choice = choose_encoder(str(TINY_MODULE), None, None, torch.float32)
    config = module_config("tiny", choice.encoder.hidden_size)
    export_module(tmp_path / "mine", build_unet(config), config, choice, {"steps": 1})
    found = scan_modules([tmp_path])
    assert [m.name for m in found] == ["mine"]
    assert module_status("mine", found, tmp_path) == "mine - local module (folder) - on disk"


def test_writing_again_replaces_the_module_whole(tmp_path) -> None:
    choice = choose_encoder(str(TINY_MODULE), None, None, torch.float32)
    config = module_config("tiny", choice.encoder.hidden_size)
    export_module(tmp_path / "mine", build_unet(config), config, choice, {"steps": 1})
    export_module(tmp_path / "mine", build_unet(config), config, choice, {"steps": 2})
    assert training_facts(tmp_path / "mine")["steps"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary or old folder left
