"""Forge's memory manager owns the GPU: One More Step hands it the module on the CPU, lets it
make room and move it, never touches VRAM when set to the CPU, leaves nothing there when Forge
unloads it, and follows the clip clone Forge makes for each LoRA set.

The meta device plays Forge's GPU here (placement only: the stand-in keeps where tensors are,
not their values, when a model leaves it), distinct from the CPU and from the offload device;
Forge's rules are the stand-in's (tests/webui_standins.py, ``ForgeMemoryManagement``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from oms_ext.runtime import provider
from oms_ext.runtime.args import OMSArgs
from oms_ext.runtime.cache import ModelCache
from oms_ext.webui import forge
from oms_ext.webui.glue import Host, OMSController
from oms_ext.webui.settings import GPU_KEEP, Settings
from tests import webui_standins as wi

CPU, GPU = torch.device("cpu"), torch.device("meta")
ARGS = OMSArgs(enabled=True, module="oms_tiny")


def _controller(
    models_dir: Path, gpu: torch.device, offload: torch.device, **opts
) -> OMSController:
    host = Host(
        kind="forge",
        opts=SimpleNamespace(sgm_noise_multiplier=False, **opts),
        cmd_opts=SimpleNamespace(),
        device=gpu,
        models_dir=models_dir,
        extension_dir=models_dir / "ext",
        before_every_sampling=True,
        log=lambda _: None,
        cache=ModelCache(offload_device=offload),
        forge_memory=forge.ForgeMemory(offload_device=offload),
    )
    return OMSController(host)


def _generate(controller: OMSController) -> wi.Txt2Img:
    p = wi.Txt2Img(version="forge", sampler_factory=lambda: wi.KDiffusionSampler(opts=None))
    p.scripts = wi.ScriptRunner(controller, "forge", [True, "", "", 2.0, "oms_tiny"])
    wi.process_images(p)
    return p


@pytest.fixture
def forge_gpu(forge_backend):
    forge_backend.device = GPU
    return forge_backend


def test_oms_set_to_run_on_the_cpu_never_touches_forges_gpu(models_dir, forge_gpu):
    controller = _controller(models_dir, GPU, CPU, oms_device="cpu")
    p = _generate(controller)
    assert "OMS alpha_bar0" in p.infotexts[0]
    assert not forge_gpu.current_loaded_models and not forge_gpu.load_calls
    assert sum(controller.host.cache.held_bytes(GPU).values()) == 0


def test_forge_is_handed_the_module_on_the_cpu_and_moves_it_itself(models_dir, forge_gpu):
    controller = _controller(models_dir, GPU, CPU, oms_dtype="fp32")
    model = controller.provide(ARGS, "sd1", Settings(dtype="fp32"), None)
    assert forge_gpu.load_calls == [[{CPU}]]  # Forge could make room before anything moved
    assert model.devices() == {GPU} and forge_gpu.holds(controller.host.forge_memory._patcher.model)


def test_a_full_gpu_makes_forge_unload_its_own_unet_to_make_room_for_oms(models_dir, forge_gpu):
    unet = wi.ForgeModelPatcher(torch.nn.Linear(64, 64), GPU, CPU)  # Forge's model, referenced
    forge_gpu.load_models_gpu([unet])
    oms_bytes = 2 * 5_000  # far less than the tiny module in fp32
    forge_gpu.capacity = wi.module_bytes(unet.model, GPU) + oms_bytes
    controller = _controller(models_dir, GPU, CPU)
    model = controller.provide(ARGS, "sd1", Settings(dtype="fp32"), None)
    assert unet.model.weight.device == CPU  # unloaded to its offload device
    assert model.devices() == {GPU}


def test_another_module_precision_unloads_the_old_model_before_the_new_one_loads(
    models_dir, forge_gpu, monkeypatch
):
    controller = _controller(models_dir, GPU, CPU)
    first = controller.provide(ARGS, "sd1", Settings(dtype="fp32"), None)
    seen: list[set[torch.device]] = []
    real_load = provider.load_oms

    def load_and_look(*args, **kwargs):
        seen.append(first.devices())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(provider, "load_oms", load_and_look)
    second = controller.provide(ARGS, "sd1", Settings(dtype="fp16"), None)
    assert seen == [{CPU}]  # the fp32 model had left the GPU when the fp16 one was read
    (held,) = forge_gpu.current_loaded_models
    assert held.model.model.unet is second.unet and second.dtype == torch.float16


def test_forge_unloading_oms_takes_its_cached_text_states_off_the_gpu(models_dir, forge_backend):
    # here the CPU plays the GPU and meta the offload device, so the step really runs
    controller = _controller(models_dir, CPU, GPU, oms_dtype="fp32", oms_gpu_memory=GPU_KEEP)
    _generate(controller)
    assert controller.host.cache.held_bytes(CPU)["text_states"] > 0
    forge_backend.unload_all_models()  # Forge needs the room for its own models
    assert controller.host.cache.held_bytes(CPU) == {
        "module": 0,
        "text_encoder": 0,
        "text_states": 0,
    }


def _forge_sd2_with_clip() -> tuple[wi.SDModel, wi.ForgeCLIP]:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=24,
        num_attention_heads=4,
        max_position_embeddings=77,
    )
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.transformer = CLIPTextModel(config).eval()
    encoders = torch.nn.ModuleDict({"clip_h": holder})  # backend.patcher.clip.JointTextEncoder
    tokenizer = CLIPTokenizer.from_pretrained(str(wi.TINY_MODULE / "tokenizer"))
    clip = wi.ForgeCLIP(
        encoders, SimpleNamespace(clip_h=tokenizer), wi.ForgeModelPatcher(encoders, CPU, CPU)
    )
    sd_model = wi.forge_sd_model(wi.Prediction(), is_sd1=False, is_sd2=True)
    sd_model.forge_objects.clip = clip
    return sd_model, clip


def test_the_borrowed_sd2_encoder_follows_the_clip_clone_of_the_current_loras(forge_backend):
    sd_model, original = _forge_sd2_with_clip()
    encoder = forge.sd2_text_encoder(sd_model)
    without_lora = encoder(["a dark room"])
    lora = original.with_lora("clip_h.transformer.text_model.final_layer_norm.bias", 0.5)
    sd_model.forge_objects.clip = lora  # sd_forge_lora: a new clone for the new LoRA set
    forge_backend.load_models_gpu([lora.patcher])  # Forge encodes its own prompt with it
    with_lora = encoder(["a dark room"])
    torch.testing.assert_close(with_lora, without_lora + 0.5)
    (held,) = forge_backend.current_loaded_models
    assert held.model is lora.patcher  # not re-patched with the first clone's (no) LoRAs
