"""OMSArgs, the field table and infotext round trips."""

from __future__ import annotations

import pytest

from oms_ext.runtime.args import (
    ENABLED_KEY,
    FIELDS,
    INFOTEXT_FIELDS,
    NOISE_FRESH,
    VERSION_KEY,
    OMSArgs,
    OMSArgsError,
    args_from_infotext,
)
from tests import webui_standins as wi


def test_field_table_covers_every_args_attribute_once():
    assert [f.attr for f in FIELDS] == list(OMSArgs().to_dict())
    labels = [f.label for f in INFOTEXT_FIELDS]
    assert len(set(labels)) == len(labels)
    assert all(label.startswith("OMS") for label in labels)


def test_each_field_has_one_name_in_the_ui_infotext_and_xyz_grid():
    axes = [f.axis_label for f in FIELDS if f.axis is not None]
    assert axes == ["[OMS] Enable", "[OMS] Prompt", "[OMS] CFG", "[OMS] Module", "[OMS] Noise"]
    for field in INFOTEXT_FIELDS[1:]:
        assert field.axis is None or field.axis_label.lower() == "[oms] " + field.label[4:].lower()


def test_the_preview_is_a_view_option_never_written_into_images():
    assert "preview" not in {f.attr for f in INFOTEXT_FIELDS}
    assert OMSArgs(enabled=True, preview=True).infotext() == OMSArgs(enabled=True).infotext()


def test_positional_values_follow_the_ui_order_and_missing_ones_take_defaults():
    args = OMSArgs.from_values([True, "dark", "", 3.0])
    assert args == OMSArgs(enabled=True, prompt="dark", cfg=3.0)


def test_too_many_positional_values_are_rejected():
    with pytest.raises(OMSArgsError, match="at most"):
        OMSArgs.from_values([True, "", "", 2.0, "Auto", "Keep seed noise", False, "extra"])


def test_dict_argument_is_read_by_name():
    assert OMSArgs.from_values([{"enabled": True, "cfg": 2}]) == OMSArgs(enabled=True, cfg=2.0)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"cfgg": 2.0}, "cfgg"),
        ({"cfg": 99.0}, "cfg"),
        ({"cfg": "high"}, "cfg"),
        ({"enabled": "maybe"}, "enabled"),
        ({"noise_mode": "loud"}, "noise_mode"),
        ({"prompt": 3}, "prompt"),
        ({"module": ""}, "module"),
    ],
)
def test_invalid_dict_values_raise_an_error_naming_the_field(data, field):
    with pytest.raises(OMSArgsError, match=field):
        OMSArgs.from_dict(data)


def test_infotext_has_marker_version_and_only_non_defaults():
    info = OMSArgs(enabled=True, cfg=3.5, noise_mode=NOISE_FRESH).infotext()
    assert info.pop(ENABLED_KEY) == "True"
    assert info.pop(VERSION_KEY)
    assert info == {"OMS CFG": 3.5, "OMS noise": NOISE_FRESH}


def test_disabled_args_write_no_infotext():
    assert OMSArgs(cfg=3.0).infotext() == {}


@pytest.mark.parametrize(
    "prompt",
    ["red car", 'a "quoted", (dark:1.2) room: at night', "line one\nline two", "x, y: z\\"],
)
def test_infotext_round_trips_through_the_webuis_quoting_and_parsing(prompt):
    args = OMSArgs(
        enabled=True,
        prompt=prompt,
        negative_prompt="blue, bright",
        cfg=4.0,
        module="oms_b_openclip_xl",
        noise_mode=NOISE_FRESH,
    )
    line = wi.infotext_line({"Steps": 20, **args.infotext(), "Seed": 1})
    assert args_from_infotext(wi.parse_infotext_line(line)) == args


def test_pasting_infotext_without_the_oms_key_turns_oms_off():
    assert args_from_infotext({"Steps": "20", "OMS CFG": "3"}).enabled is False


def test_unreadable_pasted_values_fall_back_to_defaults():
    args = args_from_infotext({ENABLED_KEY: "True", "OMS CFG": "lots"})
    assert args == OMSArgs(enabled=True)
