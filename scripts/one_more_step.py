"""One More Step (OMS, arXiv 2311.15744) for AUTOMATIC1111 (v1.6+) and the Forge family.

A thin AlwaysOn script: it gathers the WebUI's objects into an ``oms_ext.webui.glue.Host``
and forwards its callbacks to ``OMSController``; all logic lives in ``oms_ext``.

API: ``/sdapi/v1/txt2img`` with ``"alwayson_scripts": {"one more step": {"args": [...]}}``,
positional args in the UI order ``[enabled, prompt, negative_prompt, cfg, module,
noise_mode, preview]`` (missing trailing ones take the defaults), or a single named dict such as
``{"enabled": true, "cfg": 2.0}``. ``GET /oms/v1/version`` and ``/oms/v1/schema`` describe it.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import gradio as gr
from modules import devices, extra_networks, prompt_parser, script_callbacks, scripts, shared

from oms_ext import __version__
from oms_ext.runtime.args import FIELDS, INFOTEXT_FIELDS, NOISE_MODES, OMSArgs
from oms_ext.runtime.registry import module_choices, module_notes, scan_modules
from oms_ext.webui import a1111, forge
from oms_ext.webui.glue import Host, OMSController
from oms_ext.webui.settings import Settings, models_folders
from oms_ext.webui.ui import (
    TITLE,
    build_ui,
    follow_checkpoint_list,
    is_checkpoint_list,
    register_settings,
    register_xyz_axes,
)

EXTENSION_DIR = Path(__file__).resolve().parents[1]
IS_FORGE = importlib.util.find_spec("modules_forge") is not None


def _models_dir() -> Path:
    from modules import paths

    return Path(paths.models_path)


def _folders() -> list[Path]:
    return models_folders(Settings.from_opts(shared.opts), _models_dir(), EXTENSION_DIR)


def _choices() -> list[str]:
    return module_choices(scan_modules(_folders()))


def _module_notes(choice: str, checkpoint: str | None = None) -> str:
    """The notes under the module list, judged by the checkpoint the next generation uses:
    ``checkpoint`` (a title just picked in the checkpoint list), else Forge's selection."""
    sd_model = _loaded_sd_model()
    if checkpoint:
        selected = _checkpoint_file(checkpoint)
    elif IS_FORGE:
        selected = _forge_selected_checkpoint()
    else:
        selected = None
    family = (forge if IS_FORGE else a1111).notes_family(sd_model, selected)
    return module_notes(choice, _folders(), family)


def _loaded_sd_model() -> Any:
    """The loaded checkpoint's model (None when none is), without loading one: ``shared.sd_model``
    is a property that loads a checkpoint when none is loaded (A1111 modules/shared_items.py
    ``Shared.sd_model`` -> ``sd_models.model_data.get_sd_model()``), which blocked building the
    UI and defeated ``--skip-load-model-at-start``."""
    from modules import sd_models

    data = getattr(sd_models, "model_data", None)
    if data is not None and hasattr(data, "sd_model"):
        return data.sd_model
    return getattr(shared, "sd_model", None)  # forks without model_data.sd_model


def _checkpoint_file(title: str) -> Path | None:
    """The file of a checkpoint list entry (A1111 and Forge ``sd_models``)."""
    from modules import sd_models

    return _file_of(sd_models.get_closet_checkpoint_match(title))


def _forge_selected_checkpoint() -> Path | None:
    """The checkpoint file Forge f2 loads at the next Generate (None on forks without it)."""
    from modules import sd_models

    parameters = getattr(sd_models.model_data, "forge_loading_parameters", None) or {}
    return _file_of(parameters.get("checkpoint_info"))


def _file_of(checkpoint_info: Any) -> Path | None:
    """The file of a ``sd_models.CheckpointInfo`` (None for None or one without a file)."""
    filename = getattr(checkpoint_info, "filename", None)
    return Path(filename) if filename else None


def _input_accordion():
    try:
        from modules.ui_components import InputAccordion
    except ImportError:  # forks without it (A1111 has it since 1.6)
        return None
    return InputAccordion


@functools.cache
def _controller() -> OMSController:
    """The one controller of the extension (every script instance and callback uses it)."""
    return OMSController(_make_host())


def _make_host() -> Host:
    return Host(
        kind="forge" if IS_FORGE else "a1111",
        opts=shared.opts,
        cmd_opts=shared.cmd_opts,
        device=devices.device,
        models_dir=_models_dir(),
        extension_dir=EXTENSION_DIR,
        before_every_sampling=IS_FORGE or a1111.has_before_every_sampling(scripts.ScriptRunner),
        forge_memory=forge.ForgeMemory() if IS_FORGE else None,
        webui_dtype=forge.model_dtype
        if IS_FORGE
        else (lambda _device: a1111.model_dtype(devices, shared.cmd_opts)),
        prompt_syntax=a1111.WebUIPromptSyntax(prompt_parser, extra_networks, shared.opts),
        precision_scope=functools.partial(a1111.own_precision, devices),
    )


class OneMoreStepScript(scripts.Script):
    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool):
        # img2img too, with no controls: OMS acts on txt2img only, but lets go of the GPU there
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool):
        if is_img2img:
            return []
        built = build_ui(gr, _input_accordion(), _choices, __version__, _module_notes)
        _TXT2IMG_UI[:] = [built]
        self.infotext_fields = built.infotext_fields
        self.paste_field_names = [f.label for f in INFOTEXT_FIELDS]
        return built.inputs

    def process(self, p, *args) -> None:
        if getattr(self, "is_img2img", False):  # set by the WebUI's ScriptRunner
            _controller().process_without_oms(p, "img2img generation")
            return
        _controller().process(p, args)

    def process_batch(self, p, *args, **kwargs) -> None:
        _controller().process_batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs) -> None:
        x = kwargs.get("x")
        if x is not None:
            _controller().before_every_sampling(p, x)

    def postprocess_batch(self, p, *args, **kwargs) -> None:
        _controller().postprocess_batch(p)

    def postprocess(self, p, processed, *args) -> None:
        _controller().postprocess(p, processed)


#: The txt2img UI built last: the page's, since the WebUI builds the checkpoint list after it.
_TXT2IMG_UI: list[Any] = []


def _on_after_component(component: Any, **kwargs: Any) -> None:
    """Redraw the module notes when another checkpoint is picked in the WebUI's list."""
    if _TXT2IMG_UI and is_checkpoint_list(kwargs):
        follow_checkpoint_list(gr, component, _TXT2IMG_UI[0], _module_notes)


def _on_ui_settings() -> None:
    try:
        from modules.options import categories  # A1111 1.7+ and Forge
    except ImportError:
        categories = None
    register_settings(shared.opts, gr, shared.OptionInfo, categories)


def _on_before_ui() -> None:
    register_xyz_axes(scripts.scripts_data, _choices)


def _on_app_started(_demo, app) -> None:
    @app.get("/oms/v1/version")
    def version() -> dict:
        return {"version": __version__}

    @app.get("/oms/v1/schema")
    def schema() -> dict:
        defaults = OMSArgs().to_dict()
        return {
            "title": TITLE,
            "args_order": [f.attr for f in FIELDS],
            "defaults": defaults,
            "noise_modes": list(NOISE_MODES),
            "modules": _choices(),
            "infotext_keys": {f.attr: f.label for f in INFOTEXT_FIELDS},
        }


def _on_model_loaded(sd_model) -> None:
    _controller().on_model_loaded(sd_model)


def _on_checkpoint_unloaded() -> None:
    _controller().release_gpu("checkpoint unloaded to RAM")


script_callbacks.on_ui_settings(_on_ui_settings)
script_callbacks.on_before_ui(_on_before_ui)
script_callbacks.on_app_started(_on_app_started)
script_callbacks.on_model_loaded(_on_model_loaded)
# once per load of this file (the WebUI clears callbacks and reloads scripts together), not
# per ui() call: the WebUI calls ui() more than once per tab
script_callbacks.on_after_component(_on_after_component)
if not IS_FORGE:  # Forge unloads OMS itself: its memory manager holds it
    from modules import sd_models

    script_callbacks.on_script_unloaded(
        a1111.run_after(sd_models, "unload_model_weights", _on_checkpoint_unloaded)
    )
