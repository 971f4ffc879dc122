"""UI, settings and XYZ registration against recording stand-ins of gradio (3.41/4.x share
these constructor keywords) and of A1111 1.10.1's xyz_grid module."""

from __future__ import annotations

from types import SimpleNamespace

from oms_ext.webui.args import FIELDS, OMSArgs
from oms_ext.webui.provider import SETTINGS
from oms_ext.webui.ui import build_ui, register_settings, register_xyz_axes


class Component:
    """Records a gradio component's kind and keyword arguments; usable as a context."""

    def __init__(self, kind, *args, **kwargs):
        self.kind, self.args, self.kwargs = kind, args, kwargs
        self.clicks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def click(self, fn, inputs, outputs):
        self.clicks.append((fn, inputs, outputs))


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


def test_inputs_follow_the_field_order_and_the_accordion_starts_closed():
    gr = FakeGradio()
    built = build_ui(
        gr, lambda value, **kw: Component("InputAccordion", value, **kw), lambda: ["Auto"], "0"
    )
    assert [c.kwargs.get("elem_id") for c in built.inputs] == [f"oms_{f.attr}" for f in FIELDS]
    assert built.inputs[0].kind == "InputAccordion" and built.inputs[0].args == (False,)


def test_without_input_accordion_a_closed_accordion_holds_an_enable_checkbox():
    gr = FakeGradio()
    built = build_ui(gr, None, lambda: ["Auto"], "0")
    accordion = next(c for c in gr.made if c.kind == "Accordion")
    assert accordion.kwargs["open"] is False
    assert built.inputs[0].kind == "Checkbox" and built.inputs[0].kwargs["value"] is False


def test_refresh_button_updates_the_module_choices():
    gr = FakeGradio()
    choices = [["Auto"]]
    built = build_ui(gr, None, lambda: choices[-1], "0")
    choices.append(["Auto", "mine"])
    refresh = next(c for c in gr.made if c.clicks)
    fn, _, outputs = refresh.clicks[0]
    assert outputs == [built.module_dropdown] and fn() == {"choices": ["Auto", "mine"]}


def test_paste_readers_turn_oms_off_when_the_key_is_missing():
    built = build_ui(FakeGradio(), None, lambda: ["Auto"], "0")
    readers = [reader for _, reader in built.infotext_fields]
    assert [r({"Steps": "20"}) for r in readers] == list(OMSArgs().to_dict().values())
    assert readers[3]({"OMS": "True", "OMS CFG": "3.5"}) == 3.5


def test_settings_section_registers_every_setting():
    added = {}
    opts = SimpleNamespace(add_option=lambda key, info: added.setdefault(key, info))
    register_settings(opts, FakeGradio(), lambda *a, **kw: (a, kw))
    assert list(added) == [s.key for s in SETTINGS]


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
    assert labels == [
        "[OMS] Enable",
        "[OMS] prompt",
        "[OMS] CFG",
        "[OMS] module",
        "[OMS] noise mode",
    ]
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
