"""OpenCLIP text towers: tokenizer from open_clip's vocabulary, conversion, borrowed towers.

The oracle is open_clip's own ``TextTransformer`` (random weights, exact GELU as in ViT-H):
its token output after ``ln_final`` is what SD 2.x conditions on when the tower is cut to the
blocks in use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from open_clip.transformer import TextTransformer
from transformers import CLIPTokenizer

import oms_ext.text
from oms_ext.openclip_convert import (
    clip_encoder_from_openclip_state_dict,
    clip_text_config_for_tower,
    count_resblocks,
    wrap_openclip_tower,
)
from oms_ext.text import tokenizer_from_openclip_vocab
from tests import webui_standins as wi

DATA = Path(__file__).parent / "data" / "oms-tiny"
CONFIGS = Path(__file__).resolve().parents[1] / "oms_ext" / "configs"
WIDTH, HEADS, BLOCKS = 128, 2, 3

EXTRA_PROMPTS = [
    "hello!!! world!",
    "!!",
    "! ! !",
    "(masterpiece:1.2), [blue hair], {smile}, ((best quality))",
    "a photo of a cat:0.8 AND a dog",
    "Café crème brûlée — naïve façade",
    "日本語のテキストと漢字",
    "a cat 🐱 riding a rocket 🚀✨",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines",
    "a&b <tag> 'single' \"double\" `back` ~tilde~ 50% $5 #tag @user",
    "UPPER lower MiXeD CaSe",
    "co-operate, state-of-the-art; e.g. i.e. etc...",
    "&amp; html &lt;entities&gt;",
]


@pytest.fixture(scope="module")
def vocab_tokenizer():
    return tokenizer_from_openclip_vocab()


@pytest.fixture(scope="module")
def sd21_tokenizer():
    return CLIPTokenizer.from_pretrained(str(DATA / "tokenizer"))


def _ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids as diffusers' SD 2.1 pipeline makes them (the authors' OMS code too)."""
    return tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def test_openclip_vocab_tokenizer_equals_sd21_tokenizer(vocab_tokenizer, sd21_tokenizer) -> None:
    fixture_prompts = json.loads((DATA / "inputs.json").read_text(encoding="utf-8"))["prompts"]
    prompts = fixture_prompts + EXTRA_PROMPTS
    assert torch.equal(_ids(vocab_tokenizer, prompts), _ids(sd21_tokenizer, prompts))


def test_openclip_vocab_tokenizer_pads_with_exclamation_id_zero(vocab_tokenizer) -> None:
    ids = _ids(vocab_tokenizer, ["a photo of a cat!"])
    assert vocab_tokenizer.model_max_length == 77
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 0, 49407]
    assert (ids[0, 8:] == 0).all()


def test_openclip_vocab_tokenizer_reuses_its_cache_dir(tmp_path, monkeypatch) -> None:
    first = tokenizer_from_openclip_vocab(tmp_path)

    def no_open_clip() -> Path:
        raise AssertionError("the cached files should have been reused")

    monkeypatch.setattr(oms_ext.text, "_openclip_bpe_path", no_open_clip)
    second = tokenizer_from_openclip_vocab(tmp_path)
    assert second.get_vocab() == first.get_vocab()
    assert len(second) == 49408


# --- converted state dicts --------------------------------------------------------------


def _random_tower(blocks: int = BLOCKS, seed: int = 0) -> TextTransformer:
    """A small open_clip text tower; every weight, bias and LayerNorm affine term is random."""
    torch.manual_seed(seed)
    tower = TextTransformer(
        width=WIDTH, heads=HEADS, layers=blocks, output_dim=16, output_tokens=True
    )
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if name.endswith("weight") and ("ln_" in name):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.add_(0.05 * torch.randn_like(param))
    return tower.eval()


def _openclip_tokens(tower: TextTransformer, blocks: int, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's own forward of ``tower`` cut to its first ``blocks`` blocks: [B, 77, width]."""
    cut = TextTransformer(
        width=WIDTH, heads=HEADS, layers=blocks, output_dim=16, output_tokens=True
    )
    state = {
        key: value
        for key, value in tower.state_dict().items()
        if not key.startswith("transformer.resblocks.") or int(key.split(".")[2]) < blocks
    }
    cut.load_state_dict(state)
    with torch.no_grad():
        return cut.eval()(ids)[1]


@pytest.fixture(scope="module")
def tower() -> TextTransformer:
    return _random_tower()


@pytest.fixture(scope="module")
def prompt_ids(vocab_tokenizer) -> torch.Tensor:
    return _ids(vocab_tokenizer, ["a photo of a cat", "vivid blue & yellow!!", ""])


def test_converted_tower_defaults_to_penultimate_block_then_ln_final(tower, prompt_ids) -> None:
    encoder = clip_encoder_from_openclip_state_dict(tower.state_dict())
    assert encoder.model.config.num_hidden_layers == BLOCKS - 1
    expected = _openclip_tokens(tower, BLOCKS - 1, prompt_ids)
    assert (encoder.encode_ids(prompt_ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("layers", [1, BLOCKS])
def test_converted_tower_matches_openclip_forward_at_any_depth(tower, prompt_ids, layers) -> None:
    encoder = clip_encoder_from_openclip_state_dict(tower.state_dict(), num_layers=layers)
    expected = _openclip_tokens(tower, layers, prompt_ids)
    assert (encoder.encode_ids(prompt_ids) - expected).abs().max() <= 1e-5


def test_sd2_checkpoint_keys_convert_like_the_bare_tower(tower, prompt_ids) -> None:
    checkpoint = {f"cond_stage_model.model.{k}": v for k, v in tower.state_dict().items()}
    checkpoint["model.diffusion_model.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    checkpoint["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    bare = clip_encoder_from_openclip_state_dict(tower.state_dict())
    from_checkpoint = clip_encoder_from_openclip_state_dict(checkpoint)
    assert torch.equal(from_checkpoint.encode_ids(prompt_ids), bare.encode_ids(prompt_ids))


def test_converted_encoder_uses_given_device_dtype_and_sd21_tokenizer(tower) -> None:
    encoder = clip_encoder_from_openclip_state_dict(tower.state_dict(), dtype=torch.bfloat16)
    out = encoder(["a photo of a cat!!"])
    assert out.shape == (1, 77, WIDTH) and out.dtype == torch.bfloat16
    assert encoder.tokenizer(["cat!!"]).ids[0, :5].tolist() == [49406, 2368, 0, 0, 49407]


def test_state_dict_without_a_text_tower_is_rejected() -> None:
    with pytest.raises(ValueError, match="cond_stage_model.model."):
        clip_encoder_from_openclip_state_dict(
            {"model.diffusion_model.conv_in.weight": torch.zeros(1)}
        )


def test_tower_with_layer_scale_is_rejected(tower) -> None:
    state = dict(tower.state_dict())
    state["transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)
    with pytest.raises(ValueError, match="ls_1.gamma"):
        clip_encoder_from_openclip_state_dict(state)


def test_vit_h_tower_shapes_give_sd21_text_encoder_config() -> None:
    meta = {"device": "meta"}
    vit_h = {
        "token_embedding.weight": torch.empty(49408, 1024, **meta),
        "positional_embedding": torch.empty(77, 1024, **meta),
        **{
            f"transformer.resblocks.{i}.mlp.c_fc.weight": torch.empty(4096, 1024, **meta)
            for i in range(24)
        },
    }
    assert count_resblocks(vit_h) == 24
    ours = clip_text_config_for_tower(vit_h, 23).to_dict()
    sd21 = json.loads((CONFIGS / "sd21_text_encoder.config.json").read_text(encoding="utf-8"))
    fields = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
    ]
    assert {f: ours[f] for f in fields} == {f: sd21[f] for f in fields}


# --- borrowed open_clip towers ----------------------------------------------------------


@pytest.mark.parametrize("layers", [BLOCKS - 1, BLOCKS])
def test_wrapped_tower_matches_openclip_forward(tower, prompt_ids, vocab_tokenizer, layers) -> None:
    encoder = wrap_openclip_tower(tower, vocab_tokenizer, num_layers=layers)
    expected = _openclip_tokens(tower, layers, prompt_ids)
    assert (encoder.encode_ids(prompt_ids) - expected).abs().max() <= 1e-5


def test_wrapped_tower_agrees_with_converted_tower_on_prompts(tower) -> None:
    prompts = ["a photo of a cat", "vivid blue & yellow!!"]
    converted = clip_encoder_from_openclip_state_dict(tower.state_dict(), num_layers=2)
    wrapped = wrap_openclip_tower(tower, num_layers=2)
    assert (wrapped(prompts) - converted(prompts)).abs().max() <= 1e-5


def test_wrapped_tower_neither_copies_nor_moves_weights(tower, vocab_tokenizer) -> None:
    pointers = [p.data_ptr() for p in tower.parameters()]
    encoder = wrap_openclip_tower(tower, vocab_tokenizer, num_layers=2, dtype=torch.float64)
    out = encoder(["a cat", "a dog"])
    assert out.shape == (2, 77, WIDTH) and out.dtype == torch.float64
    assert encoder.to(dtype=torch.float16)(["a cat"]).dtype == torch.float16
    assert [p.data_ptr() for p in tower.parameters()] == pointers
    assert all(p.dtype == torch.float32 for p in tower.parameters())
    assert not out.requires_grad


def test_wrapped_tower_needs_a_transformers_tokenizer(tower) -> None:
    from open_clip import tokenize  # pads differently from SD 2.1's tokenizer on "!"

    with pytest.raises(TypeError, match="transformers tokenizer"):
        wrap_openclip_tower(tower, tokenize, num_layers=2)


class EmbeddingsWithFixes(torch.nn.Module):
    """A1111 1.10.1 ``modules/sd_hijack.EmbeddingsWithFixes``: stands in for the tower's
    ``token_embedding`` while a model is hijacked; the original is ``wrapped``, it has no
    ``weight``, and each call consumes the textual-inversion fixes queued for a prompt."""

    def __init__(self, wrapped: torch.nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.wrapped(input_ids) + 1.0


def test_wrapped_tower_embeds_plain_tokens_under_a1111_embedding_hijack(
    tower, prompt_ids, vocab_tokenizer
) -> None:
    import copy

    hijacked = copy.deepcopy(tower)
    hijacked.token_embedding = EmbeddingsWithFixes(hijacked.token_embedding)
    encoder = wrap_openclip_tower(hijacked, vocab_tokenizer, num_layers=2)
    expected = wrap_openclip_tower(tower, vocab_tokenizer, num_layers=2).encode_ids(prompt_ids)
    assert torch.equal(encoder.encode_ids(prompt_ids), expected)
    assert hijacked.token_embedding.calls == 0


class FrozenOpenCLIPEmbedder(torch.nn.Module):
    """The SD2 cond stage model A1111 builds (``ldm.modules.encoders.modules``): ``.model``
    is the open_clip tower."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.model = tower


def _lowvram_sd2(tower) -> tuple[FrozenOpenCLIPEmbedder, wi.A1111LowVram]:
    import copy

    cond = FrozenOpenCLIPEmbedder(copy.deepcopy(tower))
    lowvram = wi.A1111LowVram("meta")
    lowvram.setup_sd2(cond)  # hooks first, then the hijack wraps the embedding (load_model)
    cond.model.token_embedding = EmbeddingsWithFixes(cond.model.token_embedding)
    return cond, lowvram


def test_borrowed_tower_under_a1111_lowvram_hooks_runs_on_the_webuis_device(
    tower, vocab_tokenizer
) -> None:
    cond, lowvram = _lowvram_sd2(tower)  # a re-rolled, cached prompt: the tower is on the CPU
    encoder = wrap_openclip_tower(
        cond.model,
        vocab_tokenizer,
        num_layers=2,
        device=lowvram.device,  # where OMS runs: the WebUI's device
        compute_device=lambda: lowvram.device,
    )
    out = encoder(["a cat", "dark night"])
    assert out.shape == (2, 77, WIDTH) and out.device.type == "meta"
    assert lowvram.module_in_gpu is cond


def test_borrowed_tower_sending_ids_where_its_weights_were_fails_under_lowvram(
    tower, vocab_tokenizer
) -> None:
    cond, _ = _lowvram_sd2(tower)
    with pytest.raises(RuntimeError, match="same device"):
        wrap_openclip_tower(cond.model, vocab_tokenizer, num_layers=2)(["a cat"])


def test_wrapped_tower_rejects_more_layers_than_it_has(tower, vocab_tokenizer) -> None:
    with pytest.raises(ValueError, match=r"num_layers must be in 1\.\.3"):
        wrap_openclip_tower(tower, vocab_tokenizer, num_layers=23)
