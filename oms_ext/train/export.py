"""Writing a trained module in the released folder layout, atomically.

The folder gets ``model_index.json``, ``oms_module/config.json`` and
``oms_module/diffusion_pytorch_model.safetensors`` (fp32; or the ``.fp16`` variant the
releases ship), and the text-encoder pointers of the encoder it was trained with
(:mod:`oms_ext.train.encoders`). The weights file's metadata holds the module config
(``oms_module_config``, so a copy of the file alone loads) and ``oms_training``: the facts of
the run (family, encoder, steps, images, ...), never a local path. Everything is written into
a hidden temporary folder beside the target and renamed into place: a module folder is either
complete or not there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from oms_ext import __version__
from oms_ext.loading import (
    METADATA_CONFIG_KEY,
    MODULE_FOLDER,
    TRAINING_METADATA_KEY,
    WEIGHT_FILE_NAMES,
)
from oms_ext.runtime.registry import is_module_folder
from oms_ext.train.encoders import DUAL_CLASS, EncoderChoice, write_pointers
from oms_ext.train.errors import TrainError
from oms_ext.train.latents import atomic_save, check_disk

MODULE_CLASS = "UNet2DConditionWoCTModel"


def model_index(dual: bool) -> dict[str, Any]:
    """The released modules' ``model_index.json`` (the authors' pipeline components)."""
    return {
        "_class_name": "OMSPipeline",
        "_diffusers_version": "0.23.1",
        "oms_module": ["diffusers_patch.models.unet_2d_condition_woct", MODULE_CLASS],
        "oms_text_encoder": ["transformers", DUAL_CLASS if dual else "CLIPTextModel"],
        "oms_tokenizer": ["transformers", "CLIPTokenizer"],
    }


def export_module(
    target: Path,
    model: torch.nn.Module,
    config: dict[str, Any],
    choice: EncoderChoice,
    facts: dict[str, Any],
    *,
    fp16: bool = False,
) -> Path:
    """Write the module folder ``target`` (replacing an earlier module there); returns it."""
    if target.exists() and not is_module_folder(target):
        raise TrainError(
            f"{target} exists and is not an OMS module folder; choose another --name or "
            f"--output-dir"
        )
    dtype = torch.float16 if fp16 else torch.float32
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in state.values())
    target.parent.mkdir(parents=True, exist_ok=True)
    check_disk(target.parent, size, f"the module {target.name}")
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / MODULE_FOLDER).mkdir(parents=True)
        dual = choice.pointers[1] is None
        _write_json(tmp / "model_index.json", model_index(dual))
        module_config = {
            "_class_name": MODULE_CLASS,
            "_diffusers_version": "0.23.1",
            "_name_or_path": ".",
            "subfolder": MODULE_FOLDER,
            **config,
        }
        _write_json(tmp / MODULE_FOLDER / "config.json", module_config)
        metadata = {
            METADATA_CONFIG_KEY: json.dumps(config, sort_keys=True),
            TRAINING_METADATA_KEY: json.dumps({**facts, "trainer": f"oms_ext {__version__}"}),
        }
        name = WEIGHT_FILE_NAMES[1] if fp16 else WEIGHT_FILE_NAMES[0]
        atomic_save(state, tmp / MODULE_FOLDER / name, metadata)
        write_pointers(tmp, choice)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except OSError as e:
        if old.exists() and not target.exists():
            old.rename(target)  # the earlier module stays as it was
        raise TrainError(f"cannot write the module {target} ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

