"""Gradio UI, settings section and XYZ-grid axes, built from the field table.

The WebUI's ``gradio`` module and helper classes are passed in, so this file imports none of
them. Only APIs that behave the same on gradio 3.41 (A1111) and 4.x (Forge) are used:
components built with ``choices=``/``value=``/``info=``, ``elem_id``/``elem_classes``,
``.click``/``.change`` and ``gr.update(...)`` for refreshing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from oms_ext.runtime.args import (
    CFG_MIN,
    FIELD_BY_ATTR,
    FIELDS,
    INFOTEXT_FIELDS,
    NOISE_MODES,
    XYZ_PREFIX,
    OMSArgs,
    args_from_infotext,
)
from oms_ext.webui.settings import SETTINGS

TITLE = "One More Step"
ELEM_PREFIX = "oms"
#: The settings page (section id, title) and the settings category it is listed under.
SETTINGS_CATEGORY = "one_more_step"
SETTINGS_SECTION = ("one_more_step", TITLE)
CFG_INFO = (
    "How strongly the OMS prompt steers light and colour: 1 = no extra push, 2-4 = clearly "
    "stronger; below 1 fades toward a guess without the prompt (0 ignores it)"
)


@dataclass(frozen=True)
class Built:
    """The input components in :data:`FIELDS` order (= API positional order), the module
    dropdown and the module notes under it (for refresh), and the ``infotext_fields`` pairs
    for "paste parameters"."""

    inputs: list[Any]
    module_dropdown: Any
    module_notes: Any
    infotext_fields: list[tuple[Any, Callable[[dict], Any]]]


#: The slider's top: 1-4 is the useful range (paper Sec. 4.3: w = 2 already alters an image
#: distinctly); the API and the XYZ grid take values up to CFG_MAX.
CFG_SLIDER_MAX = 8.0


def _from_infotext(attr: str) -> Callable[[dict], Any]:
    """Paste reader for one field: missing "OMS" key = off, missing fields = defaults; an OMS
    CFG above the slider's range (an API run's) is pasted as the slider's top, since the
    WebUI's slider refuses values outside its range."""
    if attr == "cfg":
        return lambda params: min(args_from_infotext(params).cfg, CFG_SLIDER_MAX)
    return lambda params: getattr(args_from_infotext(params), attr)


def build_ui(
    gr: Any,
    input_accordion: Any | None,
    module_choices: Callable[[], Sequence[str]],
    version: str,
    module_notes: Callable[[str], str],
) -> Built:
    """Build the accordion (closed by default). ``input_accordion`` is the WebUI's
    ``InputAccordion`` (A1111 >= 1.6, Forge) or None (then an Accordion holding a checkbox).
    ``module_notes(choice)``: the text under the module list (what each module is for, what
    is on disk, a warning when ``choice`` does not fit the chosen checkpoint); it is redrawn
    when the choice changes and on refresh.

    Layout (usable from 800 px wide): prompt, negative prompt, the module list with its
    refresh button and notes, then OMS CFG, the noise choice and the preview switch, each on a
    row of its own, so no slider is squeezed beside another control.
    """
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
                label="Enable One More Step", value=False, elem_id=f"{ELEM_PREFIX}_enabled"
            )
        prompt = gr.Textbox(
            label=FIELD_BY_ATTR["prompt"].label,
            lines=2,
            value=defaults.prompt,
            placeholder="Empty = each image's own prompt. Try: dark, bright white, red",
            elem_id=f"{ELEM_PREFIX}_prompt",
        )
        negative = gr.Textbox(
            label=FIELD_BY_ATTR["negative_prompt"].label,
            lines=1,
            value=defaults.negative_prompt,
            placeholder="Usually empty",
            elem_id=f"{ELEM_PREFIX}_negative_prompt",
        )
        with gr.Row(elem_id=f"{ELEM_PREFIX}_module_row"):
            module = gr.Dropdown(
                choices=list(module_choices()),
                value=defaults.module,
                label=FIELD_BY_ATTR["module"].label,
                elem_id=f"{ELEM_PREFIX}_module",
            )
            refresh = gr.Button(
                value="\U0001f504", elem_id=f"{ELEM_PREFIX}_refresh", elem_classes=["tool"]
            )
        notes = gr.Markdown(module_notes(defaults.module), elem_id=f"{ELEM_PREFIX}_module_notes")
        cfg = gr.Slider(
            minimum=CFG_MIN,
            maximum=CFG_SLIDER_MAX,
            step=0.1,
            value=defaults.cfg,
            label=FIELD_BY_ATTR["cfg"].label,
            info=CFG_INFO,
            elem_id=f"{ELEM_PREFIX}_cfg",
        )
        noise = gr.Radio(
            choices=list(NOISE_MODES),
            value=defaults.noise_mode,
            label=FIELD_BY_ATTR["noise_mode"].label,
            elem_id=f"{ELEM_PREFIX}_noise_mode",
        )
        preview = gr.Checkbox(
            label="Show OMS preview",
            value=defaults.preview,
            elem_id=f"{ELEM_PREFIX}_preview",
        )
    refresh.click(
        fn=lambda choice: (
            gr.update(choices=list(module_choices())),
            gr.update(value=module_notes(choice)),
        ),
        inputs=[module],
        outputs=[module, notes],
    )
    module.change(
        fn=lambda choice: gr.update(value=module_notes(choice)), inputs=[module], outputs=[notes]
    )
    inputs = [enabled, prompt, negative, cfg, module, noise, preview]
    pairs = [
        (component, _from_infotext(f.attr))
        for component, f in zip(inputs, FIELDS, strict=True)
        if f in INFOTEXT_FIELDS
    ]
    return Built(inputs, module, notes, pairs)


#: How the checkpoint list is made: A1111 1.6-1.10, reForge and Forge Classic build it as the
#: quick setting ``sd_model_checkpoint`` (``modules.ui_settings`` ``create_setting_component``:
#: ``elem_id=f"setting_{key}"``); Forge f2 as ``modules_forge.main_entry`` ``ui_checkpoint``,
#: a Dropdown labelled "Checkpoint" of class "model_selection" without an elem_id.
CHECKPOINT_ELEM_ID = "setting_sd_model_checkpoint"
FORGE_CHECKPOINT = ("Checkpoint", "model_selection")


def is_checkpoint_list(component_kwargs: dict[str, Any]) -> bool:
    """Whether a component built with ``component_kwargs`` (as the WebUI's after-component
    callback passes them) is the WebUI's checkpoint list. Not the copy gradio 4 builds with
    ``render=False`` outside any Blocks for each property update of the list (``blocks.py``
    ``postprocess_data``, e.g. Forge's refresh of its choices at every page load): Forge's
    after-component hook fires for it too, and an event cannot be attached there."""
    if component_kwargs.get("render") is False:
        return False
    if component_kwargs.get("elem_id") == CHECKPOINT_ELEM_ID:
        return True
    label, css_class = FORGE_CHECKPOINT
    classes = component_kwargs.get("elem_classes") or []
    classes = [classes] if isinstance(classes, str) else classes
    return component_kwargs.get("label") == label and css_class in classes


def follow_checkpoint_list(
    gr: Any, checkpoint_list: Any, built: Built, module_notes: Callable[[str, str], str]
) -> None:
    """Redraw the module notes when another checkpoint is picked, so a module that does not
    fit it is flagged before Generate. ``module_notes(choice, checkpoint)`` judges the module
    choice by the picked checkpoint (the list's value, a checkpoint title), not by the model
    still loaded: the WebUI loads the new one meanwhile (A1111) or at Generate (Forge f2)."""
    checkpoint_list.change(
        fn=lambda checkpoint, choice: gr.update(value=module_notes(choice, checkpoint)),
        inputs=[checkpoint_list, built.module_dropdown],
        outputs=[built.module_notes],
        show_progress=False,
    )


def register_settings(
    opts: Any, gr: Any, option_info: Any, categories: Any | None = None
) -> None:
    """Add the "One More Step" settings page (``shared.opts``), listed under a category of
    its own where the WebUI has categories (``modules.options.categories``, A1111 1.7+ and
    Forge), each setting with its help line."""
    category = {}
    if categories is not None:
        categories.register_category(SETTINGS_CATEGORY, TITLE)
        category = {"category_id": SETTINGS_CATEGORY}
    for spec in SETTINGS:
        if isinstance(spec.default, bool):
            component, component_args = gr.Checkbox, None
        elif spec.choices is not None:
            component, component_args = gr.Radio, {"choices": list(spec.choices)}
        else:
            component, component_args = gr.Textbox, None
        info = option_info(
            spec.default,
            spec.label,
            component,
            component_args,
            section=SETTINGS_SECTION,
            **category,
        )
        opts.add_option(spec.key, info.info(spec.help) if spec.help else info)


def _set_field(attr: str) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, value: Any, _values: Any) -> None:
        setattr(p, f"oms_{attr}", value)

    return apply


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
                field.axis_label,
                spec["type"],
                _set_field(field.attr),
                choices=spec.get("choices"),
            )
        )
    return True
