"""Forge-family and A1111 adapter details: flow-model detection, SD2 text-encoder reuse, Forge's
memory manager (stand-in of Forge f2.0.1 backend.memory_management / backend.patcher.base)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from oms_ext import load_oms
from oms_ext.runtime.cache import ModelCache
from oms_ext.text import wrap_transformers_clip
from oms_ext.webui import a1111, forge
from oms_ext.webui.glue import Host, OMSController
from oms_ext.webui.settings import Settings
from tests import webui_standins as wi


def test_forge_flow_models_are_recognised_from_the_predictor():
    assert forge.is_flow(wi.PredictionFlux())
    assert not forge.is_flow(wi.Prediction("v_prediction")) and not forge.is_flow(None)


def test_ldm_patched_model_sampling_is_read_as_the_predictor():
    const = type("ModelSamplingDiscreteFlow", (type("CONST", (), {}),), {})()
    sd_model = SimpleNamespace(
        forge_objects=SimpleNamespace(
            unet=SimpleNamespace(model=SimpleNamespace(model_sampling=const))
        )
    )
    assert forge.predictor(sd_model) is const and forge.is_flow(const)


def _forge_sd2(layers: int = 24):
    """Forge f2 SD2 engine: forge_objects.clip.{cond_stage_model.clip_h (IntegratedCLIP with
    .transformer), tokenizer.clip_h, patcher}."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
    )
    torch.manual_seed(0)
    transformer = CLIPTextModel(config).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(wi.TINY_MODULE / "tokenizer"))
    clip = SimpleNamespace(
        cond_stage_model=SimpleNamespace(clip_h=SimpleNamespace(transformer=transformer)),
        tokenizer=SimpleNamespace(clip_h=tokenizer),
        patcher=None,
    )
    sd_model = wi.forge_sd_model(wi.Prediction(), is_sd1=False, is_sd2=True)
    sd_model.forge_objects.clip = clip
    sd_model.sd_checkpoint_info = SimpleNamespace(hash="abc123", filename="sd21.safetensors")
    return sd_model


def test_forge_sd2_encoder_uses_23_of_24_layers_plus_final_norm(forge_backend):
    sd_model = _forge_sd2()
    encoder = forge.sd2_text_encoder(sd_model)
    transformer = sd_model.forge_objects.clip.cond_stage_model.clip_h.transformer
    ids = encoder.tokenizer(["a cat"]).ids
    hidden = transformer(input_ids=ids, output_hidden_states=True).hidden_states[23]
    expected = transformer.text_model.final_layer_norm(hidden)
    torch.testing.assert_close(encoder(["a cat"]), expected)


class SD2ClipHTokenizer:
    """reForge ``ldm_patched/modules/text_encoders/sd2_clip.SD2ClipHTokenizer``: a ComfyUI
    tokenizer object (not a transformers tokenizer) holding one as ``.tokenizer``."""

    def __init__(self, inner) -> None:
        self.tokenizer = inner


class EmbeddingsWithFixes(torch.nn.Module):
    """A1111's textual-inversion wrapper, which reForge puts around the SD2 encoder's
    ``text_model.embeddings.token_embedding`` (``forge_loader.py``); with no fixes queued it
    returns the wrapped embedding's output."""

    def __init__(self, wrapped: torch.nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wrapped(input_ids)


def _reforge_sd2():
    """reForge main (2026-03) SD2: a transformers CLIPTextModel at clip_h.transformer with
    A1111's embedding wrapper, a ComfyUI tokenizer at tokenizer.clip_h, and the model flagged
    ``is_sd1`` (reForge's ``is_sd2`` test looks for a ``model`` attribute its CLIP_SD_21_H
    wrapper does not have)."""
    sd_model = _forge_sd2()
    sd_model.is_sd1, sd_model.is_sd2 = True, False
    clip = sd_model.forge_objects.clip
    hf = clip.cond_stage_model.clip_h.transformer
    tokenizer = clip.tokenizer.clip_h
    clip.tokenizer.clip_h = SD2ClipHTokenizer(tokenizer)
    return sd_model, hf, tokenizer


def test_reforge_sd2_encoder_gives_the_23_layer_state_with_sd21_tokens(forge_backend):
    sd_model, hf, tokenizer = _reforge_sd2()
    prompts = ["a cat", "dark night!"]
    expected = wrap_transformers_clip(hf, tokenizer, num_layers=23)(prompts)
    embeddings = hf.text_model.embeddings
    embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding)
    torch.testing.assert_close(forge.sd2_text_encoder(sd_model)(prompts), expected)


def test_reforge_sd2_checkpoint_flagged_sd1_is_recognised_as_sd2():
    sd_model, _, _ = _reforge_sd2()
    assert forge.model_family(sd_model) == "sd2"


def test_sd1_checkpoint_with_a_clip_l_stays_sd1():
    sd_model = wi.forge_sd_model(wi.Prediction())
    sd_model.forge_objects.clip = SimpleNamespace(
        cond_stage_model=SimpleNamespace(clip_l=object())
    )
    assert forge.model_family(sd_model) == "sd1"


def test_non_sd2_checkpoints_lend_no_text_encoder():
    assert forge.sd2_text_encoder(wi.forge_sd_model(wi.Prediction())) is None
    assert a1111.sd2_text_tower(wi.SDModel()) is None


def test_sd2_checkpoint_encoder_is_reused_instead_of_the_modules(tmp_path, forge_backend):
    wi.install_tiny_module(tmp_path / "oms")
    sd_model = _forge_sd2()
    host = Host(
        "forge",
        SimpleNamespace(),
        SimpleNamespace(),
        "cpu",
        tmp_path,
        tmp_path,
        True,
        lambda _: None,
        ModelCache(),
    )
    p = wi.Txt2Img(
        version="forge",
        sd_model=sd_model,
        sampler_factory=lambda: wi.KDiffusionSampler(opts=SimpleNamespace()),
    )
    p.scripts = wi.ScriptRunner(OMSController(host), "forge", [True, "", "", 2.0, "oms_tiny"])
    wi.process_images(p)
    assert "OMS alpha_bar0" in p.infotexts[0]
    model = host.cache.get(host.cache.key, lambda: pytest.fail("the cached model was reloaded"))
    assert host.cache.key.text_encoder == "checkpoint:abc123"
    assert not model.owns_text_encoder


def test_forge_memory_reuses_one_patcher_per_model(forge_backend):
    model = load_oms(wi.TINY_MODULE)
    memory = forge.ForgeMemory()
    memory.load(model)
    memory.load(model)
    (loaded,) = forge_backend.current_loaded_models
    assert loaded.model.model.unet is model.unet


def test_a1111_sd2_encoder_is_run_on_the_webuis_device_under_lowvram():
    """The checkpoint's tower sits on the CPU (cond cache hit, --medvram); A1111's hooks move
    it to devices.device when the embedding is called: the ids must already be there."""
    from tests.test_openclip_convert import FrozenOpenCLIPEmbedder, _lowvram_sd2, _random_tower

    cond, lowvram = _lowvram_sd2(_random_tower(blocks=24))
    sd_model = wi.SDModel(is_sd1=False, is_sd2=True)
    # A1111's FrozenOpenCLIPEmbedderWithCustomWords holds the cond stage model as .wrapped
    sd_model.cond_stage_model = SimpleNamespace(wrapped=cond)
    sd_model.sd_checkpoint_info = SimpleNamespace(hash="abc123")
    assert isinstance(cond, FrozenOpenCLIPEmbedder)
    host = Host("a1111", SimpleNamespace(), SimpleNamespace(), "meta", Path(), Path(), True)
    factory, checkpoint = OMSController(host)._borrowed_encoder(Settings(), "sd2", sd_model)
    encoder = factory()
    encoder.to(device="meta")
    assert checkpoint == "abc123"
    assert encoder(["a dark room"]).device.type == "meta" and lowvram.module_in_gpu is cond


@pytest.mark.parametrize("low_vram", [False, True])
def test_forge_sd2_encoder_sends_ids_where_forge_runs_text_encoders(forge_backend, low_vram):
    forge_backend.low_vram = low_vram
    encoder = forge.sd2_text_encoder(_forge_sd2())
    assert encoder.compute_device() == forge_backend.text_encoder_device()


@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("conditioner.embedders.1.model.ln_final.weight", "sdxl"),
        ("cond_stage_model.model.ln_final.weight", "sd2"),
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1"),
        ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "sd3"),
        ("double_blocks.0.img_attn.qkv.weight", "flow"),
        ("model.diffusion_model.input_blocks.0.0.weight", None),  # a UNet-only file
    ],
)
def test_a_checkpoint_files_family_is_told_by_its_tensor_names(key, family):
    keys = ["model.diffusion_model.out.2.weight", key]
    assert a1111.checkpoint_family_from_keys(keys) == family


def _checkpoint_file(path: Path, key: str) -> Path:
    from safetensors.torch import save_file

    save_file({key: torch.zeros(1), "model.diffusion_model.out.2.bias": torch.zeros(1)}, path)
    return path


def test_notes_judge_by_the_selected_checkpoint_until_forge_has_loaded_it(tmp_path):
    """Forge f2 loads the checkpoint at the first Generate; its placeholder model
    (FakeInitialModel) has no forge_objects, so the selected file tells the family."""
    sd15 = _checkpoint_file(
        tmp_path / "sd15.safetensors", "cond_stage_model.transformer.text_model.x"
    )
    sdxl = _checkpoint_file(tmp_path / "xl.safetensors", "conditioner.embedders.0.transformer.x")
    placeholder = SimpleNamespace(cond_stage_model=None, chunk_length=75)
    assert forge.notes_family(placeholder, sd15) == "sd1"
    assert forge.notes_family(placeholder, None) is None
    loaded_sd15 = SimpleNamespace(
        forge_objects=SimpleNamespace(),
        is_sd1=True,
        sd_checkpoint_info=SimpleNamespace(filename=str(sd15)),
    )
    assert forge.notes_family(loaded_sd15, sd15) == "sd1"
    assert forge.notes_family(loaded_sd15, None) == "sd1"
    # another checkpoint chosen in the list, loaded at the next Generate
    assert forge.notes_family(loaded_sd15, sdxl) == "sdxl"


def test_a1111_notes_judge_by_the_checkpoint_just_picked(tmp_path):
    """A1111 loads a picked checkpoint at once, but the notes are redrawn meanwhile: the
    picked file tells the family until the model loaded is that file."""
    sd15 = _checkpoint_file(
        tmp_path / "sd15.safetensors", "cond_stage_model.transformer.text_model.x"
    )
    sdxl = _checkpoint_file(tmp_path / "xl.safetensors", "conditioner.embedders.0.transformer.x")
    info = SimpleNamespace(filename=str(sd15))
    loaded_sd15 = SimpleNamespace(is_sd1=True, sd_checkpoint_info=info)
    assert a1111.notes_family(loaded_sd15, None) == "sd1"
    assert a1111.notes_family(loaded_sd15, sd15) == "sd1"
    assert a1111.notes_family(loaded_sd15, sdxl) == "sdxl"
    assert a1111.notes_family(None, None) is None


def test_a_file_that_does_not_tell_its_family_gives_none(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 4)
    assert a1111.checkpoint_file_family(broken) is None
    assert a1111.checkpoint_file_family(tmp_path / "missing.safetensors") is None
    assert a1111.checkpoint_file_family(tmp_path / "old.ckpt") is None
