"""The thin script, imported against stand-ins of the WebUI modules it uses (A1111 1.10.1
names: modules.scripts/shared/devices/paths/script_callbacks/prompt_parser/extra_networks,
gradio), and run end to end
through the stand-in txt2img loop."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from oms_ext.runtime.args import ALPHA_BAR_KEY, FIELDS, INFOTEXT_FIELDS
from tests import webui_standins as wi
from tests.test_webui_ui import FakeGradio

ROOT = Path(__file__).resolve().parents[1]


class _Script:
    """modules.scripts.Script (A1111 1.10.1): the base the script subclasses."""

    def __init__(self):
        self.infotext_fields = None
        self.paste_field_names = None


class _ScriptRunner:
    def process_before_every_sampling(self, p, **kwargs):
        """Present from A1111 1.10 on."""


@pytest.fixture
def script_module(monkeypatch, tmp_path):
    callbacks: dict[str, list] = {}
    modules = ModuleType("modules")
    fakes = {
        "scripts": SimpleNamespace(
            Script=_Script, ScriptRunner=_ScriptRunner, AlwaysVisible=object(), scripts_data=[]
        ),
        "shared": SimpleNamespace(
            opts=SimpleNamespace(sgm_noise_multiplier=False),
            cmd_opts=SimpleNamespace(),
            OptionInfo=dict,
        ),
        "devices": SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32),
        "prompt_parser": wi.prompt_parser_module(),
        # modules.sd_models.unload_model_weights: "Unload SD checkpoint to RAM"
        "sd_models": SimpleNamespace(unload_model_weights=lambda sd_model=None, info=None: None),
        "extra_networks": wi.extra_networks_module(),
        "paths": SimpleNamespace(models_path=str(tmp_path)),
        "script_callbacks": SimpleNamespace(
            **{
                name: (lambda fn, name=name: callbacks.setdefault(name, []).append(fn))
                for name in (
                    "on_ui_settings",
                    "on_before_ui",
                    "on_app_started",
                    "on_model_loaded",
                    "on_script_unloaded",
                    "on_after_component",
                )
            }
        ),
    }
    monkeypatch.setitem(sys.modules, "modules", modules)
    for name, fake in fakes.items():
        setattr(modules, name, fake)
        monkeypatch.setitem(sys.modules, f"modules.{name}", fake)
    monkeypatch.setitem(sys.modules, "gradio", FakeGradio())
    spec = importlib.util.spec_from_file_location(
        "one_more_step_script", ROOT / "scripts" / "one_more_step.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.callbacks = callbacks
    wi.install_tiny_module(tmp_path / "oms")
    return module


def test_script_registers_its_callbacks_once_at_import_however_often_ui_is_called(
    script_module,
):
    for is_img2img in (False, True, False, True):  # the WebUI calls ui() more than once a tab
        script_module.OneMoreStepScript().ui(is_img2img)
    assert {k: len(v) for k, v in script_module.callbacks.items()} == {
        "on_ui_settings": 1,
        "on_before_ui": 1,
        "on_app_started": 1,
        "on_model_loaded": 1,
        "on_script_unloaded": 1,
        "on_after_component": 1,
    }


def test_the_checkpoint_list_is_followed_once_by_the_last_txt2img_ui(script_module, tmp_path):
    _checkpoints(tmp_path, loaded_key="sd15")
    script_module.OneMoreStepScript().ui(False)  # e.g. the API's call, before the page's
    checkpoint_list = _build_page(script_module, elem_id="setting_sd_model_checkpoint")
    assert len(checkpoint_list.changes) == 1


def test_script_has_no_controls_in_img2img_and_returns_inputs_in_field_order(script_module):
    script = script_module.OneMoreStepScript()
    assert script.show(True) is script.show(False) is sys.modules["modules.scripts"].AlwaysVisible
    assert script.ui(True) == []
    inputs = script.ui(False)
    assert len(inputs) == len(FIELDS)
    assert script.paste_field_names == [f.label for f in INFOTEXT_FIELDS]
    assert "oms_tiny" in inputs[4].kwargs["choices"]


def test_script_applies_oms_through_process_before_every_sampling(script_module):
    script = script_module.OneMoreStepScript()
    p = wi.Txt2Img(
        version="1.10", sampler_factory=lambda: wi.KDiffusionSampler(opts=SimpleNamespace())
    )
    p.scripts = wi.ScriptRunner(script, "1.10", [True, "", "", 2.0, "oms_tiny"])
    # the WebUI's ScriptRunner splats the script's slice of p.script_args
    p.scripts.controller = SimpleNamespace(
        process=lambda p_, args: script.process(p_, *args),
        process_batch=script.process_batch,
        before_every_sampling=lambda p_, x: script.process_before_every_sampling(p_, x=x, noise=x),
        postprocess_batch=script.postprocess_batch,
        postprocess=lambda p_, processed: script.postprocess(p_, processed, *p.scripts.script_args),
    )
    wi.process_images(p)
    assert ALPHA_BAR_KEY in p.infotexts[0]


def test_api_schema_documents_the_positional_order(script_module):
    routes = {}

    class App:
        def get(self, path):
            return lambda fn: routes.setdefault(path, fn)

    script_module.callbacks["on_app_started"][0](None, App())
    schema = routes["/oms/v1/schema"]()
    assert schema["args_order"] == [
        "enabled",
        "prompt",
        "negative_prompt",
        "cfg",
        "module",
        "noise_mode",
        "preview",
    ]
    assert routes["/oms/v1/version"]()["version"]


@pytest.fixture
def released(script_module, monkeypatch):
    calls = []
    controller = script_module._controller()
    monkeypatch.setattr(controller, "release_gpu", lambda why: calls.append("release"))
    return calls


def test_unloading_the_checkpoint_to_ram_also_takes_oms_off_the_gpu(script_module, released):
    sys.modules["modules.sd_models"].unload_model_weights()
    assert released == ["release"]
    script_module.callbacks["on_script_unloaded"][0]()  # the undo restores the WebUI's function
    sys.modules["modules.sd_models"].unload_model_weights()
    assert released == ["release"]


def test_an_img2img_generation_takes_oms_off_the_gpu_and_never_runs_it(
    script_module, released
):
    script = script_module.OneMoreStepScript()
    script.is_img2img = True  # modules.scripts.ScriptRunner sets it on each script instance
    p = SimpleNamespace()
    script.process(p)  # img2img has no OMS controls: no args
    assert released == ["release"] and not p.oms_args.enabled


def test_loading_another_checkpoint_takes_oms_off_the_gpu(script_module, released):
    script_module.callbacks["on_model_loaded"][0](wi.SDModel())
    assert released == ["release"]


def test_module_notes_on_forge_warn_before_the_checkpoint_is_loaded(script_module, tmp_path):
    """Forge f2 before the first Generate: shared.sd_model is a placeholder and
    sd_models.model_data.forge_loading_parameters names the selected checkpoint."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.x": torch.zeros(1)}, checkpoint)
    script_module.IS_FORGE = True
    sys.modules["modules.shared"].sd_model = SimpleNamespace(cond_stage_model=None)
    sys.modules["modules.sd_models"].model_data = SimpleNamespace(
        forge_loading_parameters={"checkpoint_info": SimpleNamespace(filename=str(checkpoint))}
    )
    assert "OMS will be skipped" in script_module._module_notes("oms_b_openclip_xl")
    assert "OMS will be skipped" not in script_module._module_notes("Auto")
    sys.modules["modules.sd_models"].model_data = SimpleNamespace()  # forks without it
    assert "OMS will be skipped" not in script_module._module_notes("oms_b_openclip_xl")


def _checkpoints(tmp_path, loaded_key):
    """An SD1.5 and an SDXL checkpoint file, the list A1111 1.10.1's ``sd_models``
    ``get_closet_checkpoint_match(title)`` looks titles up in (exact titles here), and a loaded
    model of ``loaded_key``'s file."""
    from safetensors.torch import save_file

    files = {}
    for name, key in (
        ("sd15", "cond_stage_model.transformer.text_model.x"),
        ("xl", "conditioner.embedders.0.transformer.x"),
    ):
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({key: torch.zeros(1)}, files[name])
    infos = {
        f"{name}.safetensors [0123456789]": SimpleNamespace(filename=str(file))
        for name, file in files.items()
    }
    sd_models = sys.modules["modules.sd_models"]
    sd_models.get_closet_checkpoint_match = infos.get
    loaded = files[loaded_key]
    # Forge f2: the selection it loads at the next Generate
    sd_models.model_data = SimpleNamespace(
        forge_loading_parameters={"checkpoint_info": SimpleNamespace(filename=str(loaded))}
    )
    sys.modules["modules.shared"].sd_model = SimpleNamespace(
        is_sd1=True, sd_checkpoint_info=SimpleNamespace(filename=str(loaded))
    )


def _build_page(script_module, **checkpoint_list_kwargs):
    """Build the script's UI, then the checkpoint list as the WebUI does after the txt2img
    tab, through the after-component callbacks (``modules.gradio_extensons``)."""
    from tests.test_webui_ui import Component

    script_module.OneMoreStepScript().ui(False)
    checkpoint_list = Component("Dropdown", **checkpoint_list_kwargs)
    for callback in script_module.callbacks["on_after_component"]:
        callback(checkpoint_list, **checkpoint_list_kwargs)
    return checkpoint_list


@pytest.mark.parametrize(
    ("webui", "list_kwargs"),
    [
        # A1111 1.10.1 modules.ui_settings.create_setting_component (quick setting)
        ("a1111", {"elem_id": "setting_sd_model_checkpoint", "label": "SD checkpoint"}),
        # Forge f2 modules_forge.main_entry.make_checkpoint_manager_ui
        ("forge", {"label": "Checkpoint", "elem_classes": ["model_selection"]}),
    ],
)
def test_picking_another_checkpoint_redraws_the_module_notes(
    script_module, tmp_path, webui, list_kwargs
):
    _checkpoints(tmp_path, loaded_key="sd15")
    script_module.IS_FORGE = webui == "forge"
    if webui == "forge":
        sys.modules["modules.shared"].sd_model.forge_objects = SimpleNamespace()
    checkpoint_list = _build_page(script_module, **list_kwargs)
    (redraw, inputs, outputs), = checkpoint_list.changes
    assert inputs[0] is checkpoint_list and outputs[0].kwargs["elem_id"] == "oms_module_notes"
    # the SD1.x module while SDXL is picked (still loading, or loaded at Generate)
    notes = redraw("xl.safetensors [0123456789]", "oms_b_openclip_15_21")["value"]
    assert "OMS will be skipped" in notes
    notes = redraw("sd15.safetensors [0123456789]", "oms_b_openclip_15_21")["value"]
    assert "OMS will be skipped" not in notes


def test_gradios_unrendered_copy_of_the_checkpoint_list_is_not_followed(script_module, tmp_path):
    """gradio 4 rebuilds the list with render=False outside any Blocks on each choices update
    (Forge refreshes them at page load); attaching an event there raised in the console."""
    _checkpoints(tmp_path, loaded_key="sd15")
    script_module.IS_FORGE = True
    copy = _build_page(
        script_module, label="Checkpoint", elem_classes=["model_selection"], render=False
    )
    assert copy.changes == []


def test_other_lists_do_not_redraw_the_module_notes(script_module, tmp_path):
    _checkpoints(tmp_path, loaded_key="sd15")
    vae_list = _build_page(script_module, elem_id="setting_sd_vae", label="SD VAE")
    assert vae_list.changes == []


def test_building_the_ui_and_its_notes_never_loads_a_checkpoint(script_module, monkeypatch):
    """A1111 modules/shared_items.py ``Shared.sd_model`` is a property that loads a checkpoint when
    none is (``sd_models.model_data.get_sd_model()``); with --skip-load-model-at-start, or no
    checkpoint installed, none is loaded while the UI is built."""
    loads = []

    class Shared(SimpleNamespace):
        @property
        def sd_model(self):
            loads.append("load")
            raise FileNotFoundError("No checkpoints found")

    shared = Shared(**vars(sys.modules["modules.shared"]))
    monkeypatch.setattr(script_module, "shared", shared)
    sys.modules["modules.sd_models"].model_data = SimpleNamespace(sd_model=None)
    script_module.OneMoreStepScript().ui(False)
    assert "OMS will be skipped" not in script_module._module_notes("oms_b_openclip_xl")
    assert loads == []
