"""Module sizes of the paper's Table 3 (OMS-S, OMS-B, OMS-L) and a tiny one for tests.

All share the released OMS-B layout (2 ResNets per block, 1 transformer layer, 32 GroupNorm
groups); the text width ``cross_attention_dim`` is set by the chosen text encoder. With the
widths 768 / 1024 / 4096 the parameter counts are Table 3's: 3.4 M / 3.7 M / 8.1 M (OMS-S),
151 M / 154 M / 187 M (OMS-B), 832 M / 838 M / 915 M (OMS-L). OMS-B is the released
``oms_b_openclip_15_21`` config itself. Table 3 gives OMS-B "8" heads; the released config has
[5, 10, 20] (head size 32), which is what is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from oms_ext.train.errors import TrainError
from oms_ext.unet import DOWN_ATTN, DOWN_PLAIN, UP_ATTN, UP_PLAIN, UNetConfig, packaged_config

#: Fields of the released config that describe its origin, not its architecture.
_ORIGIN_FIELDS = ("_name_or_path", "_diffusers_version")


def _oms_b() -> dict[str, Any]:
    config = packaged_config("oms_b_openclip_15_21")
    for key in _ORIGIN_FIELDS:
        config.pop(key, None)
    return config


def _variant(channels: list[int], heads: list[int], down: list[str], up: list[str]) -> dict:
    return {
        **_oms_b(),
        "block_out_channels": channels,
        "attention_head_dim": heads,
        "down_block_types": down,
        "up_block_types": up,
    }


def preset_configs() -> dict[str, dict[str, Any]]:
    """Preset name -> module config (``cross_attention_dim`` still the OMS-B default)."""
    three_down = [DOWN_PLAIN, DOWN_ATTN, DOWN_ATTN]
    three_up = [UP_ATTN, UP_ATTN, UP_PLAIN]
    return {
        "oms-s": _variant([32, 64, 64], [2, 4, 4], three_down, three_up),
        "oms-b": _oms_b(),
        "oms-l": _variant(
            [320, 640, 1280, 1280],
            [5, 10, 20, 20],
            [DOWN_ATTN, DOWN_ATTN, DOWN_ATTN, DOWN_PLAIN],
            [UP_PLAIN, UP_ATTN, UP_ATTN, UP_ATTN],
        ),
        # For tests and toy runs: 16/32 channels, 8 GroupNorm groups, one ResNet per block.
        "tiny": {
            **_variant([16, 32], [2, 4], [DOWN_PLAIN, DOWN_ATTN], [UP_ATTN, UP_PLAIN]),
            "layers_per_block": 1,
            "norm_num_groups": 8,
        },
    }


PRESETS = tuple(preset_configs())


def module_config(size: str, cross_attention_dim: int) -> dict[str, Any]:
    """The config of preset ``size`` (OMS-S/OMS-B/OMS-L/tiny, any case) or of a config JSON
    file, with the text width of the chosen encoder. Raises :class:`TrainError`."""
    presets = preset_configs()
    key = size.lower()
    if key in presets:
        config = presets[key]
    else:
        path = Path(size)
        if not path.is_file():
            raise TrainError(
                f"--size {size!r}: neither a preset ({', '.join(PRESETS)}) nor a config file"
            )
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TrainError(f"--size {path}: cannot read the module config ({e})") from e
        if not isinstance(config, dict):
            raise TrainError(f"--size {path}: a module config must be a JSON object")
        for field in _ORIGIN_FIELDS:
            config.pop(field, None)
    config = {**config, "cross_attention_dim": int(cross_attention_dim)}
    try:
        UNetConfig.from_dict(config)
    except ValueError as e:
        raise TrainError(f"--size {size}: not a module OMS can build: {e}") from e
    return config
