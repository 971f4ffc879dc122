"""Gradio UI, settings section and XYZ-grid axes, built from the field table.

The WebUI's ``gradio`` module and helper classes are passed in, so this file imports none of
them. Only APIs that behave the same on gradio 3.41 (A1111) and 4.x (Forge) are used:
components built with ``choices=``/``value=``, ``elem_id``/``elem_classes``, ``.click`` and
``gr.update(...)`` for refreshing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from oms_ext.webui.args import CFG_MAX, CFG_MIN, FIELDS, NOISE_MODES, OMSArgs, args_from_infotext
from oms_ext.webui.provider import SETTINGS

TITLE = "One More Step"
ELEM_PREFIX = "oms"
XYZ_PREFIX = "[OMS]"
SETTINGS_SECTION = ("one_more_step", TITLE)


@dataclass(frozen=True)
class Built:
    """The input components in :data:`FIELDS` order (= API positional order), the module
    dropdown (for refresh) and the ``infotext_fields`` pairs for "paste parameters"."""

    inputs: list[Any]
    module_dropdown: Any
    infotext_fields: list[tuple[Any, Callable[[dict], Any]]]


def _from_infotext(attr: str) -> Callable[[dict], Any]:
    """Paste reader for one field: missing "OMS" key = off, missing fields = defaults."""
    return lambda params: getattr(args_from_infotext(params), attr)


def build_ui(
    gr: Any,
    input_accordion: Any | None,
    module_choices: Callable[[], Sequence[str]],
    version: str,
) -> Built:
    """Build the accordion (closed by default). ``input_accordion`` is the WebUI's
    ``InputAccordion`` (A1111 >= 1.6, Forge) or None (then an Accordion holding a checkbox)."""
    defaults = OMSArgs()
    title = f"{TITLE} v{version}"
    if input_accordion is not None:
        accordion = input_accordion(False, label=title, elem_id=f"{ELEM_PREFIX}_enabled")
        enabled = accordion
    else:
        accordion = gr.Accordion(title, open=False, elem_id=f"{ELEM_PREFIX}_accordion")
    with accordion:
        if input_accordion is None:
            enabled = gr.Checkbox(
                label=FIELDS[0].ui_label, value=False, elem_id=f"{ELEM_PREFIX}_enabled"
            )
        prompt = gr.Textbox(
            label=FIELDS[1].ui_label,
            lines=2,
            value=defaults.prompt,
            placeholder="Empty = each image's prompt (weights and <lora:...> tags removed)",
            elem_id=f"{ELEM_PREFIX}_prompt",
        )
        negative = gr.Textbox(
            label=FIELDS[2].ui_label, lines=1, value="", elem_id=f"{ELEM_PREFIX}_negative_prompt"
        )
        with gr.Row():
            cfg = gr.Slider(
                minimum=CFG_MIN,
                maximum=CFG_MAX,
                step=0.1,
                value=defaults.cfg,
                label=FIELDS[3].ui_label,
                elem_id=f"{ELEM_PREFIX}_cfg",
            )
            module = gr.Dropdown(
                choices=list(module_choices()),
                value=defaults.module,
                label=FIELDS[4].ui_label,
                elem_id=f"{ELEM_PREFIX}_module",
            )
            refresh = gr.Button(
                value="\U0001f504", elem_id=f"{ELEM_PREFIX}_refresh", elem_classes=["tool"]
            )
        noise = gr.Radio(
            choices=list(NOISE_MODES),
            value=defaults.noise_mode,
            label=FIELDS[5].ui_label,
            elem_id=f"{ELEM_PREFIX}_noise_mode",
        )
    refresh.click(fn=lambda: gr.update(choices=list(module_choices())), inputs=[], outputs=[module])
    inputs = [enabled, prompt, negative, cfg, module, noise]
    pairs = [
        (component, _from_infotext(f.attr)) for component, f in zip(inputs, FIELDS, strict=True)
    ]
    return Built(inputs, module, pairs)


def register_settings(opts: Any, gr: Any, option_info: Any) -> None:
    """Add the "One More Step" section to the WebUI settings (``shared.opts``)."""
    for spec in SETTINGS:
        if isinstance(spec.default, bool):
            component, component_args = gr.Checkbox, None
        elif spec.choices is not None:
            component, component_args = gr.Radio, {"choices": list(spec.choices)}
        else:
            component, component_args = gr.Textbox, None
        info = option_info(
            spec.default, spec.label, component, component_args, section=SETTINGS_SECTION
        )
        opts.add_option(spec.key, info)


def _set_field(attr: str) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, value: Any, _values: Any) -> None:
        setattr(p, f"oms_{attr}", value)

    return apply


def axis_label(attr: str) -> str:
    field = next(f for f in FIELDS if f.attr == attr)
    return f"{XYZ_PREFIX} Enable" if attr == "enabled" else f"{XYZ_PREFIX} {field.label[4:]}"


def register_xyz_axes(
    scripts_data: Sequence[Any], module_choices: Callable[[], Sequence[str]]
) -> bool:
    """Add the "[OMS] ..." axes to the XYZ-grid script once, listed for txt2img only (OMS
    leaves img2img alone). Each axis stores its value on ``p`` as ``p.oms_<field>``, which
    the controller reads over the UI values. Returns
    whether axes were added (False: no XYZ script, or already registered)."""
    xyz = next(
        (
            d.module
            for d in scripts_data
            if d.script_class.__module__ in ("xyz_grid.py", "xyz_grid")
        ),
        None,
    )
    if xyz is None or any(str(o.label).startswith(XYZ_PREFIX) for o in xyz.axis_options):
        return False
    axis_option = getattr(xyz, "AxisOptionTxt2Img", xyz.AxisOption)
    kinds = {
        "bool": {"type": str, "choices": lambda: ["True", "False"]},
        "str": {"type": str},
        "float": {"type": float},
        "module": {"type": str, "choices": lambda: list(module_choices())},
        "noise_mode": {"type": str, "choices": lambda: list(NOISE_MODES)},
    }
    for field in FIELDS:
        if field.axis is None:
            continue
        spec = kinds[field.axis]
        xyz.axis_options.append(
            axis_option(
                axis_label(field.attr),
                spec["type"],
                _set_field(field.attr),
                choices=spec.get("choices"),
            )
        )
    return True
