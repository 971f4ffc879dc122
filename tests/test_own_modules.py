"""A module of the user's own (``python -m oms_ext.train``) in the WebUIs: named "your own" in
the notes, refused for a checkpoint family it was not trained for, used by "Auto" where the
family's release is not on disk, and lent the loaded checkpoint's own text encoder (A1111's
and Forge's), so it needs no download."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from oms_ext import load_oms, oms_start
from oms_ext.runtime.args import AUTO_MODULE
from oms_ext.runtime.cache import ModelCache
from oms_ext.runtime.registry import auto_choice, fit_warning, module_notes, resolve_module
from oms_ext.spaces import UnsupportedModelError
from oms_ext.text import ClipPromptEncoder
from oms_ext.webui import a1111, forge
from oms_ext.webui.glue import Host, OMSController
from tests import webui_standins as wi

TINY = wi.TINY_MODULE


def test_the_notes_call_it_your_own_and_say_it_needs_no_download(tmp_path):
    wi.install_own_module(tmp_path)
    notes = module_notes("mine", [tmp_path], "sd1")
    assert (
        "- mine - your own, for SD1.x, reads the checkpoint's own text encoder (no download) "
        "- on disk"
    ) in notes
    assert "OMS will be skipped" not in notes


def test_it_is_refused_for_a_family_it_was_not_trained_for(tmp_path):
    path = wi.install_own_module(tmp_path)
    warning = fit_warning("mine", "sdxl", path)
    assert warning == (
        "mine is your own module for SD1.x checkpoints, the chosen checkpoint is SDXL: choose "
        "Auto or a matching module"
    )
    assert f"OMS will be skipped: {warning}" in module_notes("mine", [tmp_path], "sdxl")
    with pytest.raises(UnsupportedModelError, match="your own module for SD1.x"):
        resolve_module("mine", "sdxl", [tmp_path])


def test_one_with_its_own_encoder_serves_sd1_and_sd2_alike(tmp_path):
    path = wi.install_own_module(tmp_path, borrows=False)
    assert fit_warning("mine", "sd2", path) is None
    assert "your own, for SD1.x/SD2.x - on disk" in module_notes("mine", [tmp_path], "sd2")


def test_auto_uses_it_only_for_its_family_and_only_while_the_release_is_not_on_disk(tmp_path):
    wi.install_own_module(tmp_path)
    assert auto_choice("sd1", [tmp_path]) == "mine"
    assert auto_choice("sd2", [tmp_path]) == "oms_b_openclip_15_21"  # reads SD1.x's CLIP-L
    assert auto_choice("sdxl", [tmp_path]) == "oms_b_openclip_xl"
    notes = module_notes(AUTO_MODULE, [tmp_path], "sd1")
    assert "for the chosen SD1.x checkpoint it uses mine (your own, for SD1.x" in notes
    wi.install_tiny_module(tmp_path, "oms_b_openclip_15_21")
    assert auto_choice("sd1", [tmp_path]) == "oms_b_openclip_15_21"


def _clip_l():
    """The SD1.x checkpoint's CLIP-L (the tiny module's own 32-wide encoder plays it)."""
    model = CLIPTextModel.from_pretrained(str(TINY / "text_encoder")).eval()
    return model, CLIPTokenizer.from_pretrained(str(TINY / "tokenizer"))


def _host(kind: str, models_dir: Path) -> Host:
    opts = SimpleNamespace(sgm_noise_multiplier=False, oms_dtype="fp32", oms_allow_download=False)
    return Host(
        kind,
        opts,
        SimpleNamespace(),
        "cpu",
        models_dir,
        models_dir / "ext",
        True,
        log=lambda _: None,
        cache=ModelCache(),
        forge_memory=forge.ForgeMemory() if kind == "forge" else None,
    )


def _sd1_model(kind: str, transformer, tokenizer) -> wi.SDModel:
    if kind == "a1111":  # FrozenCLIPEmbedderWithCustomWords(.wrapped = FrozenCLIPEmbedder)
        model = wi.SDModel()
        inner = SimpleNamespace(transformer=transformer, tokenizer=tokenizer)
        model.cond_stage_model = SimpleNamespace(wrapped=inner)
    else:  # Forge f2: forge_objects.clip.{cond_stage_model.clip_l.transformer, tokenizer.clip_l}
        model = wi.forge_sd_model(wi.Prediction(), is_sd1=True)
        holder = torch.nn.Module()
        holder.transformer = transformer
        encoders = torch.nn.ModuleDict({"clip_l": holder})
        model.forge_objects.clip = wi.ForgeCLIP(
            encoders,
            SimpleNamespace(clip_l=tokenizer),
            wi.ForgeModelPatcher(encoders, "cpu", "cpu"),
        )
    model.sd_checkpoint_info = SimpleNamespace(hash="sd15hash")
    return model


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_auto_runs_it_with_the_checkpoints_own_clip_l_and_downloads_nothing(
    tmp_path, forge_backend, kind
):
    wi.install_own_module(tmp_path / "oms")
    transformer, tokenizer = _clip_l()
    sd_model = _sd1_model(kind, transformer, tokenizer)
    version = "forge" if kind == "forge" else "1.10"
    p = wi.Txt2Img(
        version=version,
        sd_model=sd_model,
        sampler_factory=lambda: wi.KDiffusionSampler(opts=SimpleNamespace()),
    )
    controller = OMSController(_host(kind, tmp_path))
    p.scripts = wi.ScriptRunner(controller, version, [True, "", "", 2.0, AUTO_MODULE])
    wi.process_images(p)
    info = p.infotexts[0]
    assert "OMS alpha_bar0" in info and info["OMS module"] == "mine"
    own = ClipPromptEncoder(transformer, tokenizer, owns_model=False)
    model = load_oms(tmp_path / "oms" / "mine", text_encoder=own)
    x_S = wi.ImageRNG((4, p.height // 8, p.width // 8), p.all_seeds[:2]).first()
    x0 = model.predict_x0(x_S, p.all_prompts[:2], 2.0)
    expected = oms_start(x0, x_S, wi.start_alpha_bar_of(p.samplers[0], p.steps))
    got = wi.vp_start_of(p.samplers[0], p.steps)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert controller.host.cache.key.text_encoder == "checkpoint:sd15hash"


def test_a_checkpoint_without_the_encoder_it_reads_skips_oms_with_a_reason(tmp_path):
    wi.install_own_module(tmp_path / "oms")
    sd_model = wi.SDModel()  # no cond_stage_model to lend
    p = wi.Txt2Img(sd_model=sd_model, sampler_factory=lambda: wi.KDiffusionSampler(opts=None))
    controller = OMSController(_host("a1111", tmp_path))
    p.scripts = wi.ScriptRunner(controller, "1.10", [True, "", "", 2.0, "mine"])
    wi.process_images(p)
    assert p.infotexts[0]["OMS skipped"].startswith(
        "module mine reads the checkpoint's own text encoder"
    )


def test_a1111s_sdxl_pair_is_read_at_the_penultimate_layer_of_each_and_concatenated():
    from tests.test_openclip_convert import _random_tower

    transformer, tokenizer = _clip_l()
    big_g = _random_tower(blocks=3)
    sd_model = wi.SDModel(is_sd1=False, is_sdxl=True)
    sd_model.conditioner = SimpleNamespace(
        embedders=[
            SimpleNamespace(wrapped=SimpleNamespace(transformer=transformer, tokenizer=tokenizer)),
            SimpleNamespace(wrapped=SimpleNamespace(model=big_g)),
        ]
    )
    encoder = a1111.checkpoint_text_encoder(sd_model, "sdxl", "cpu")
    states = encoder(["a dark room"])
    ids = encoder.encoders[0].tokenizer(["a dark room"]).ids
    penultimate = transformer(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    width = transformer.config.hidden_size
    torch.testing.assert_close(states[..., :width], penultimate)
    assert states.shape[-1] == width + big_g.ln_final.weight.shape[0]
    assert encoder.encoders[1].num_layers == 2 and not encoder.encoders[1].final_norm


def test_forges_sdxl_pair_is_read_at_the_penultimate_layer_through_the_clip_patcher(
    forge_backend,
):
    transformer, tokenizer = _clip_l()
    encoders = torch.nn.ModuleDict()
    for name in ("clip_l", "clip_g"):
        holder = torch.nn.Module()
        holder.transformer = transformer if name == "clip_l" else _clip_l()[0]
        encoders[name] = holder
    patcher = wi.ForgeModelPatcher(encoders, "cpu", "cpu")
    sd_model = wi.forge_sd_model(wi.Prediction(), is_sd1=False, is_sdxl=True)
    sd_model.forge_objects.clip = wi.ForgeCLIP(
        encoders, SimpleNamespace(clip_l=tokenizer, clip_g=tokenizer), patcher
    )
    encoder = forge.checkpoint_text_encoder(sd_model, "sdxl")
    states = encoder(["a dark room"])
    ids = encoder.inner.encoders[0].tokenizer(["a dark room"]).ids
    penultimate = transformer(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(states[..., :32], penultimate)
    assert states.shape[-1] == 64 and forge_backend.holds(encoders)
