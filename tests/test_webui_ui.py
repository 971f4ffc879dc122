"""UI, settings and XYZ registration against recording stand-ins of gradio (3.41/4.x share
these constructor keywords) and of A1111 1.10.1's xyz_grid module."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from oms_ext.runtime.args import FIELDS, INFOTEXT_FIELDS, OMSArgs
from oms_ext.webui.settings import SETTINGS
from oms_ext.webui.ui import build_ui, register_settings, register_xyz_axes


class Component:
    """Records a gradio component's kind and keyword arguments; usable as a context."""

    def __init__(self, kind, *args, **kwargs):
        self.kind, self.args, self.kwargs = kind, args, kwargs
        self.clicks = []
        self.changes = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def click(self, fn, inputs, outputs):
        self.clicks.append((fn, inputs, outputs))

    def change(self, fn, inputs, outputs, **options):
        self.changes.append((fn, inputs, outputs))


class FakeGradio:
    def __init__(self):
        self.made = []

    def __getattr__(self, kind):
        def make(*args, **kwargs):
            component = Component(kind, *args, **kwargs)
            self.made.append(component)
            return component

        return make

    @staticmethod
    def update(**kwargs):
        return kwargs


def _notes(choice):
    return f"notes for {choice}"


def _build(gr, accordion=None, choices=lambda: ["Auto"]):
    return build_ui(gr, accordion, choices, "0", _notes)


def test_inputs_follow_the_field_order_and_the_accordion_starts_closed():
    gr = FakeGradio()
    built = _build(gr, lambda value, **kw: Component("InputAccordion", value, **kw))
    assert [c.kwargs.get("elem_id") for c in built.inputs] == [f"oms_{f.attr}" for f in FIELDS]
    assert built.inputs[0].kind == "InputAccordion" and built.inputs[0].args == (False,)


def test_without_input_accordion_a_closed_accordion_holds_an_enable_checkbox():
    gr = FakeGradio()
    built = _build(gr)
    accordion = next(c for c in gr.made if c.kind == "Accordion")
    assert accordion.kwargs["open"] is False
    assert built.inputs[0].kind == "Checkbox" and built.inputs[0].kwargs["value"] is False


def test_labels_are_the_field_names_and_say_what_the_user_will_see():
    built = _build(FakeGradio())
    labels = [c.kwargs.get("label") for c in built.inputs[1:]]
    assert labels == [f.label for f in FIELDS[1:6]] + ["Show OMS preview"]
    cfg = built.inputs[3].kwargs
    assert "below 1" in cfg["info"] and "s =" not in cfg["info"]


def test_refresh_button_updates_the_module_choices_and_notes():
    gr = FakeGradio()
    choices = [["Auto"]]
    built = _build(gr, choices=lambda: choices[-1])
    choices.append(["Auto", "mine"])
    refresh = next(c for c in gr.made if c.clicks)
    fn, inputs, outputs = refresh.clicks[0]
    assert inputs == [built.module_dropdown]
    assert outputs == [built.module_dropdown, built.module_notes]
    assert fn("mine") == ({"choices": ["Auto", "mine"]}, {"value": "notes for mine"})


def test_choosing_a_module_redraws_its_notes():
    built = _build(FakeGradio())
    assert built.module_notes.args == ("notes for Auto",)
    fn, _, outputs = built.module_dropdown.changes[0]
    assert outputs == [built.module_notes] and fn("oms_b_openclip_xl") == {
        "value": "notes for oms_b_openclip_xl"
    }


def test_paste_readers_turn_oms_off_when_the_key_is_missing():
    built = _build(FakeGradio())
    readers = [reader for _, reader in built.infotext_fields]
    defaults = OMSArgs().to_dict()
    assert [r({"Steps": "20"}) for r in readers] == [defaults[f.attr] for f in INFOTEXT_FIELDS]
    assert readers[3]({"OMS": "True", "OMS CFG": "3.5"}) == 3.5


def test_the_cfg_slider_spans_the_useful_range_and_pastes_larger_values_as_its_top():
    built = _build(FakeGradio())
    slider = built.inputs[3]
    assert (slider.kwargs["minimum"], slider.kwargs["maximum"]) == (0.0, 8.0)
    read_cfg = built.infotext_fields[3][1]
    assert read_cfg({"OMS": "True", "OMS CFG": "12"}) == 8.0  # an API run's value


class OptionInfo:
    """A1111 1.10.1 / Forge ``modules.options.OptionInfo`` (what the settings page shows)."""

    def __init__(self, default, label, component, component_args, section, category_id=None):
        self.default, self.label, self.section = default, label, section
        self.category_id = category_id
        self.comment_after = ""

    def info(self, text):
        self.comment_after += f"<span class='info'>({text})</span>"
        return self


class Categories:
    """``modules.options.categories`` (A1111 1.7+, Forge)."""

    def __init__(self):
        self.mapping = {}

    def register_category(self, category_id, label):
        self.mapping.setdefault(category_id, label)


def _settings(categories=None):
    added = {}
    opts = SimpleNamespace(add_option=lambda key, info: added.setdefault(key, info))
    register_settings(opts, FakeGradio(), OptionInfo, categories)
    return added


def test_settings_page_registers_every_setting_in_a_category_of_its_own():
    categories = Categories()
    added = _settings(categories)
    assert list(added) == [s.key for s in SETTINGS]
    assert categories.mapping == {"one_more_step": "One More Step"}
    assert {info.category_id for info in added.values()} == {"one_more_step"}


@pytest.mark.parametrize("query", ["oms", "one more step"])
def test_the_settings_search_finds_every_setting(query):
    """A1111's search shows a setting whose text (label and help line) holds the query."""
    for info in _settings().values():
        assert query in (info.label + " " + info.comment_after).lower()


def test_settings_register_on_webuis_without_categories():
    added = _settings(categories=None)  # A1111 1.6
    assert all(info.category_id is None for info in added.values())


class AxisOption:
    """A1111 1.10.1 scripts/xyz_grid.py AxisOption signature."""

    def __init__(
        self,
        label,
        type,
        apply,
        format_value=None,
        confirm=None,
        cost=0.0,
        choices=None,
        prepare=None,
    ):
        self.label, self.type, self.apply, self.choices = label, type, apply, choices
        self.is_img2img = None


class AxisOptionTxt2Img(AxisOption):
    """A1111 1.10.1 / Forge: an axis the XYZ script lists in txt2img only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = False


def _xyz_scripts_data():
    xyz = SimpleNamespace(
        AxisOption=AxisOption,
        AxisOptionTxt2Img=AxisOptionTxt2Img,
        axis_options=[AxisOption("Nothing", str, None)],
    )
    script_class = type("Script", (), {"__module__": "xyz_grid.py"})
    return xyz, [SimpleNamespace(script_class=script_class, module=xyz)]


def test_xyz_axes_are_registered_once_and_set_fields_on_p():
    xyz, data = _xyz_scripts_data()
    assert register_xyz_axes(data, lambda: ["Auto"]) is True
    assert register_xyz_axes(data, lambda: ["Auto"]) is False
    labels = [o.label for o in xyz.axis_options[1:]]
    assert labels == ["[OMS] Enable", "[OMS] Prompt", "[OMS] CFG", "[OMS] Module", "[OMS] Noise"]
    p = SimpleNamespace()
    xyz.axis_options[3].apply(p, 3.0, None)
    assert p.oms_cfg == 3.0


def test_xyz_axes_are_offered_in_txt2img_only():
    xyz, data = _xyz_scripts_data()
    register_xyz_axes(data, lambda: ["Auto"])
    assert all(o.is_img2img is False for o in xyz.axis_options[1:])


def test_xyz_axes_fall_back_to_plain_axis_option_without_txt2img_class():
    xyz, data = _xyz_scripts_data()
    del xyz.AxisOptionTxt2Img
    assert register_xyz_axes(data, lambda: ["Auto"]) is True
    assert all(type(o) is AxisOption for o in xyz.axis_options)


def test_style_sheet_styles_only_the_extensions_own_elements():
    """Both WebUIs load style.css from the extension's root into every page: it must not
    restyle anything of the WebUI's own."""
    css = (Path(__file__).resolve().parents[1] / "style.css").read_text(encoding="utf-8")
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    selectors = [s.strip() for block in re.findall(r"([^{}]+)\{", css) for s in block.split(",")]
    assert selectors and all(s.startswith("#oms_") for s in selectors), selectors


def test_the_download_setting_gives_each_release_its_own_download_size():
    help_text = next(s.help for s in SETTINGS if s.key == "oms_allow_download")
    assert "oms_b_mixclip_xl: 3455 MB + 1635 MB text encoder" in help_text
    assert "oms_b_openclip_15_21, oms_b_openclip_xl: 308 MB + 681 MB text encoder" in help_text
