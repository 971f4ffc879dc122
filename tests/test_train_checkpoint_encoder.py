"""A module trained on an SD1.x single-file checkpoint's own VAE and CLIP-L: the latents come
from the file's VAE, the text states are the file's encoder's, and the module says it borrows
the checkpoint's encoder instead of naming a download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from oms_ext import load_oms
from oms_ext.errors import OMSUserError
from oms_ext.loading import training_facts
from oms_ext.text import ENCODER_SOURCE_KEY
from oms_ext.train.checkpoint import SCALING_FACTORS, encode_images, load_vae, open_checkpoint
from oms_ext.train.cli import main
from oms_ext.train.encoders import choose_encoder, clip_l_tokenizer
from tests.train_helpers import (  # noqa: F401
    RESOLUTION,
    one_thread,
    sd1_single_file,
    tiny_clip,
    tiny_vae_folder,
    write_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    vae = tiny_vae_folder(root / "vae")
    clip = tiny_clip()
    return sd1_single_file(root / "sd1-tiny.safetensors", vae, clip), vae, clip


def test_single_file_vae_encodes_as_the_diffusers_vae(files) -> None:
    checkpoint_file, vae_folder, _ = files
    checkpoint = open_checkpoint(checkpoint_file)
    assert checkpoint.family == "sd1" and checkpoint.single_file
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    from_file = encode_images(
        load_vae(checkpoint, torch.device("cpu"), torch.float32), images, 0.18215
    )
    folder = open_checkpoint(vae_folder)
    want = encode_images(load_vae(folder, torch.device("cpu"), torch.float32), images, 0.18215)
    assert SCALING_FACTORS[checkpoint.family] == 0.18215
    torch.testing.assert_close(from_file, want)


def test_checkpoint_encoder_is_the_files_clip_last_hidden_state(files) -> None:
    checkpoint_file, _, clip = files
    choice = choose_encoder("checkpoint", open_checkpoint(checkpoint_file), None, torch.float32)
    prompts = ["a dark room", ""]
    ids = clip_l_tokenizer()(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids  # fmt: skip
    assert int(ids[1, -1]) == 49407  # CLIP-L pads with end-of-text, as SD1.x does
    with torch.no_grad():
        want = clip(input_ids=ids).last_hidden_state
    torch.testing.assert_close(choice.encoder(prompts), want)
    encoder_pointer, tokenizer_pointer = choice.pointers
    assert encoder_pointer[ENCODER_SOURCE_KEY] == "checkpoint"
    assert tokenizer_pointer[ENCODER_SOURCE_KEY] == "checkpoint"
    assert encoder_pointer["_name_or_path"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_module_trained_on_the_checkpoints_encoder_borrows_it(files, tmp_path: Path) -> None:
    checkpoint_file, _, _ = files
    data = write_images(tmp_path / "data", {"a": "a dark room", "b": "a bright beach"})
    assert main([
        "--data", str(data), "--checkpoint", str(checkpoint_file), "--encoder", "checkpoint",
        "--size", "tiny", "--output-dir", str(tmp_path / "out"), "--name", "own",
        "--cache-dir", str(tmp_path / "cache"), "--resolution", str(RESOLUTION), "--steps", "2",
        "--batch-size", "2", "--cpu", "--preview-every", "0",
    ]) == 0  # fmt: skip
    module = tmp_path / "out" / "own"
    pointer = json.loads((module / "oms_text_encoder" / "config.json").read_text())
    assert pointer[ENCODER_SOURCE_KEY] == "checkpoint"
    assert not (module / "text_encoder").exists()  # nothing to download or copy
    facts = training_facts(module)
    assert facts["encoder_source"] == "checkpoint" and facts["family"] == "sd1"
    encoder = choose_encoder("checkpoint", open_checkpoint(checkpoint_file), None, torch.float32)
    model = load_oms(module, text_encoder=encoder.encoder)  # the host hands its encoder over
    assert model.cross_attention_dim == 64
    assert model.predict_x0(torch.randn(1, 4, 8, 8), "a dark room", 2.0).shape == (1, 4, 8, 8)
    with pytest.raises(OMSUserError, match="stable-diffusion-v1-5"):
        load_oms(module)  # on its own it looks for SD1.5's encoder files, offline: not there


def test_sdxl_checkpoints_pair_is_read_as_mixclip_reads_it(tmp_path: Path) -> None:
    from oms_ext.text import read_pointer, tokenizer_from_openclip_vocab
    from tests.train_helpers import sdxl_single_file

    clip_l, clip_g = tiny_clip(seed=1), tiny_clip(layers=3, act="gelu", seed=2)
    vae = tiny_vae_folder(tmp_path / "vae", scaling_factor=0.13025)
    checkpoint = open_checkpoint(sdxl_single_file(tmp_path / "xl.safetensors", vae, clip_l, clip_g))
    assert checkpoint.family == "sdxl" and SCALING_FACTORS["sdxl"] == 0.13025
    choice = choose_encoder("checkpoint", checkpoint, None, torch.float32)
    prompts = ["a red car", ""]
    want = []
    for clip, tokenizer in (
        (clip_l, clip_l_tokenizer()),
        (clip_g, tokenizer_from_openclip_vocab()),
    ):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            want.append(clip(input_ids=ids, output_hidden_states=True).hidden_states[-2])
    torch.testing.assert_close(choice.encoder(prompts), torch.cat(want, dim=-1))
    from oms_ext.train import module_config
    from oms_ext.train.export import export_module
    from oms_ext.unet import build_unet

    config = module_config("tiny", choice.encoder.hidden_size)
    module = export_module(tmp_path / "xl_own", build_unet(config), config, choice, {})
    assert "SDXL" in read_pointer(module, "oms_text_encoder").class_name  # the dual layout
    assert not (module / "oms_tokenizer").exists()
    model = load_oms(module, text_encoder=choice.encoder)
    assert model.cross_attention_dim == 128


def test_sd2_checkpoints_own_encoder_is_the_release_encoder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from oms_ext.text import tokenizer_from_openclip_vocab
    from oms_ext.train.encoders import release_pointers
    from tests.train_helpers import openclip_layout

    clip = tiny_clip(layers=3, act="gelu", seed=3)  # an OpenCLIP tower: 3 blocks, SD2 reads 2
    state = {f"cond_stage_model.model.{k}": v for k, v in openclip_layout(clip).items()}
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "sd2.safetensors"))
    checkpoint = open_checkpoint(tmp_path / "sd2.safetensors")
    assert checkpoint.family == "sd2"
    choice = choose_encoder("checkpoint", checkpoint, None, torch.float32)
    tokenizer = tokenizer_from_openclip_vocab()
    ids = tokenizer(
        ["a red car"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = clip(input_ids=ids, output_hidden_states=True).hidden_states[2]
        want = clip.text_model.final_layer_norm(hidden)  # penultimate block + ln_final
    torch.testing.assert_close(choice.encoder(["a red car"]), want)
    release = release_pointers()
    plain = [{k: v for k, v in p.items() if k != ENCODER_SOURCE_KEY} for p in choice.pointers]
    assert plain == list(release)
    assert choice.pointers[0][ENCODER_SOURCE_KEY] == "checkpoint"


def test_the_trained_module_runs_in_the_webui_on_the_checkpoints_own_clip_l(
    files, tmp_path: Path
) -> None:
    """End to end: trained here, dropped into the WebUI's models/oms, chosen by "Auto" on the
    SD1.x checkpoint it was trained on (its CLIP-L lent by A1111's stand-in): OMS applies,
    nothing is downloaded, and the start is the module's x_T with the checkpoint's encoder."""
    from types import SimpleNamespace

    from oms_ext import oms_start
    from oms_ext.runtime.cache import ModelCache
    from oms_ext.webui.glue import Host, OMSController
    from tests import webui_standins as wi

    checkpoint_file, _, clip = files
    data = write_images(tmp_path / "data", {"a": "a dark room", "b": "a bright beach"})
    assert main([
        "--data", str(data), "--checkpoint", str(checkpoint_file), "--encoder", "checkpoint",
        "--size", "tiny", "--output-dir", str(tmp_path / "models" / "oms"), "--name", "own",
        "--cache-dir", str(tmp_path / "cache"), "--resolution", str(RESOLUTION), "--steps", "2",
        "--batch-size", "2", "--cpu", "--preview-every", "0",
    ]) == 0  # fmt: skip
    sd_model = wi.SDModel()
    lent = SimpleNamespace(transformer=clip, tokenizer=clip_l_tokenizer())  # FrozenCLIPEmbedder
    sd_model.cond_stage_model = SimpleNamespace(wrapped=lent)
    opts = SimpleNamespace(sgm_noise_multiplier=False, oms_dtype="fp32", oms_allow_download=False)
    host = Host("a1111", opts, SimpleNamespace(), "cpu", tmp_path / "models", tmp_path, True,
                log=lambda _: None, cache=ModelCache())  # fmt: skip
    p = wi.Txt2Img(sd_model=sd_model, sampler_factory=lambda: wi.KDiffusionSampler(opts=opts))
    p.scripts = wi.ScriptRunner(OMSController(host), "1.10", [True, "", "", 2.0, "Auto"])
    wi.process_images(p)
    assert p.infotexts[0]["OMS module"] == "own" and "OMS alpha_bar0" in p.infotexts[0]
    encoder = choose_encoder("checkpoint", open_checkpoint(checkpoint_file), None, torch.float32)
    model = load_oms(tmp_path / "models" / "oms" / "own", text_encoder=encoder.encoder)
    x_S = wi.ImageRNG((4, p.height // 8, p.width // 8), p.all_seeds[:2]).first()
    x0 = model.predict_x0(x_S, p.all_prompts[:2], 2.0)
    want = oms_start(x0, x_S, wi.start_alpha_bar_of(p.samplers[0], p.steps))
    torch.testing.assert_close(wi.vp_start_of(p.samplers[0], p.steps), want, atol=2e-5, rtol=1e-4)
