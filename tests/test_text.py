"""Text path: fixture conformance, where encoder files are found, borrowed and SDXL encoders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import LocalEntryNotFoundError, are_progress_bars_disabled
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from oms_ext.loading import load_oms
from oms_ext.text import (
    REASON_POINTER_BROKEN,
    ConcatPromptEncoder,
    TextEncoderError,
    TextEncoderNotFound,
    load_clip_text_model,
    load_prompt_encoder,
    wrap_transformers_clip,
)

DATA = Path(__file__).parent / "data" / "oms-tiny"
SD21 = "stabilityai/stable-diffusion-2-1"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
TOL = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "reference.safetensors"))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return json.loads((DATA / "inputs.json").read_text(encoding="utf-8"))["prompts"]


@pytest.fixture(scope="module")
def fixture_encoder():
    return load_prompt_encoder(DATA)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _module_pointing_at(root: Path, repo: str, *, dual: bool = False) -> Path:
    """An OMS module folder whose pointer files name ``repo`` (like the released ones)."""
    shutil.copy(DATA / "model_index.json", root / "model_index.json")
    encoder_class = "SDXLTextEncoder" if dual else "CLIPTextModel"
    _write_json(
        root / "oms_text_encoder" / "config.json",
        {"_class_name": encoder_class, "_name_or_path": repo, "subfolder": "text_encoder"},
    )
    _write_json(
        root / "oms_tokenizer" / "config.json",
        {"_class_name": "CLIPTokenizer", "_name_or_path": repo, "subfolder": "tokenizer"},
    )
    return root


def _copy_sd21_parts(dest: Path) -> None:
    shutil.copytree(DATA / "text_encoder", dest / "text_encoder")
    shutil.copytree(DATA / "tokenizer", dest / "tokenizer")


def test_fixture_token_ids_match_reference(fixture_encoder, prompts, reference) -> None:
    for i, prompt in enumerate(prompts):
        assert torch.equal(fixture_encoder.tokenizer([prompt]).ids, reference[f"text/ids/{i}"])
    assert torch.equal(fixture_encoder.tokenizer(prompts).ids, reference["text/ids/batch"])


def test_fixture_embedding_of_each_prompt_matches_reference(
    fixture_encoder, prompts, reference
) -> None:
    for i, prompt in enumerate(prompts):
        assert _max_diff(fixture_encoder([prompt]), reference[f"text/emb/{i}"]) <= TOL


def test_fixture_batch_embeddings_match_reference(fixture_encoder, prompts, reference) -> None:
    assert _max_diff(fixture_encoder(prompts), reference["text/emb/batch"]) <= TOL
    nipp2 = [prompts[1], prompts[1], prompts[2], prompts[2]]
    assert _max_diff(fixture_encoder(nipp2), reference["text/emb/batch_nipp2"]) <= TOL


def test_loaded_encoder_reports_width_and_returns_requested_dtype(reference) -> None:
    encoder = load_prompt_encoder(DATA, dtype=torch.bfloat16)
    out = encoder(["a photo of a cat", ""])
    assert encoder.hidden_size == 32
    assert out.shape == (2, 77, 32)
    assert out.dtype == torch.bfloat16 == encoder.dtype
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    assert _max_diff(out[1:].float(), reference["text/emb/0"]) <= 0.1


def test_hub_pointer_resolves_to_module_subfolder(tmp_path, reference) -> None:
    root = _module_pointing_at(tmp_path, SD21)
    _copy_sd21_parts(root)
    encoder = load_prompt_encoder(root)
    assert _max_diff(encoder(["a photo of a cat"]), reference["text/emb/1"]) <= TOL


def test_hub_pointer_resolves_to_models_dir_owner_dash_dash_name(tmp_path, reference) -> None:
    (tmp_path / "module").mkdir()
    root = _module_pointing_at(tmp_path / "module", SD21)
    models = tmp_path / "models"
    _copy_sd21_parts(models / "stabilityai--stable-diffusion-2-1")
    encoder = load_prompt_encoder(root, models_dir=models)
    assert _max_diff(encoder(["a photo of a cat"]), reference["text/emb/1"]) <= TOL


def _fake_hf_cache(cache: Path, repo: str) -> Path:
    """Lay out ``repo``'s SD 2.1 parts the way huggingface_hub stores a snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit, encoding="utf-8")
    snapshot = repo_dir / "snapshots" / commit
    _copy_sd21_parts(snapshot)
    return snapshot


def test_hub_pointer_resolves_from_huggingface_cache(tmp_path, reference) -> None:
    (tmp_path / "module").mkdir()
    root = _module_pointing_at(tmp_path / "module", SD21)
    _fake_hf_cache(tmp_path / "hub", SD21)
    encoder = load_prompt_encoder(root, hf_cache_dir=tmp_path / "hub")
    assert _max_diff(encoder(["a photo of a cat"]), reference["text/emb/1"]) <= TOL


def test_missing_encoder_error_says_what_to_download_and_where(tmp_path) -> None:
    (tmp_path / "module").mkdir()
    root = _module_pointing_at(tmp_path / "module", SD21)
    models = tmp_path / "models"
    with pytest.raises(TextEncoderNotFound) as info:
        load_prompt_encoder(root, models_dir=models, hf_cache_dir=tmp_path / "hub")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "downloading is not allowed" in message
    assert f"https://huggingface.co/{SD21}/tree/main/text_encoder" in message
    assert "config.json + one of model.safetensors / model.fp16.safetensors" in message
    assert str(models / "stabilityai--stable-diffusion-2-1" / "text_encoder") in message
    assert str(root / "text_encoder") in message
    command = f"huggingface-cli download {SD21} text_encoder/config.json text_encoder/model.fp16"
    assert command in message


def test_offline_download_attempt_raises_not_found(tmp_path) -> None:
    (tmp_path / "module").mkdir()
    root = _module_pointing_at(tmp_path / "module", SD21)
    with pytest.raises(TextEncoderNotFound, match="downloading failed"):
        load_prompt_encoder(root, allow_download=True, hf_cache_dir=tmp_path / "hub")


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download: empty cache, downloads from the fixture."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.downloaded: list[str] = []
        self.bars_disabled: list[bool] = []

    def __call__(self, repo_id, filename, *, subfolder=None, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError(f"{repo_id}/{subfolder}/{filename} not cached")
        self.downloaded.append(f"{subfolder}/{filename}")
        self.bars_disabled.append(are_progress_bars_disabled())
        source = DATA / subfolder / filename.replace(".fp16", "")
        target = self.store / subfolder / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return str(target)


TOKENIZER_DOWNLOADS = {
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
}


def test_download_fetches_only_config_safetensors_and_tokenizer_files(
    tmp_path, monkeypatch, reference
) -> None:
    (tmp_path / "module").mkdir()
    root = _module_pointing_at(tmp_path / "module", SD21)
    hub = FakeHub(tmp_path / "downloads")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    encoder = load_prompt_encoder(root, allow_download=True)
    assert set(hub.downloaded) == {
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        *TOKENIZER_DOWNLOADS,
    }
    assert _max_diff(encoder(["a photo of a cat"]), reference["text/emb/1"]) <= TOL


def test_download_for_half_precision_takes_the_fp16_weights(tmp_path, monkeypatch) -> None:
    (tmp_path / "module").mkdir()
    root = _module_pointing_at(tmp_path / "module", SD21)
    hub = FakeHub(tmp_path / "downloads")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    encoder = load_prompt_encoder(root, allow_download=True, dtype=torch.bfloat16)
    assert "text_encoder/model.fp16.safetensors" in hub.downloaded
    assert "text_encoder/model.safetensors" not in hub.downloaded
    assert encoder(["a cat"]).dtype == torch.bfloat16


def test_download_without_progress_hides_bars_only_meanwhile(tmp_path, monkeypatch) -> None:
    (tmp_path / "module").mkdir()
    root = _module_pointing_at(tmp_path / "module", SD21)
    hub = FakeHub(tmp_path / "downloads")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    assert not are_progress_bars_disabled()
    load_prompt_encoder(root, allow_download=True, progress=False)
    assert hub.bars_disabled and all(hub.bars_disabled)
    assert not are_progress_bars_disabled()


def test_missing_tokenizer_files_fall_back_to_openclip_vocabulary(tmp_path, reference) -> None:
    (tmp_path / "module").mkdir()
    root = _module_pointing_at(tmp_path / "module", SD21)
    shutil.copytree(DATA / "text_encoder", root / "text_encoder")
    encoder = load_prompt_encoder(root, hf_cache_dir=tmp_path / "hub")
    assert torch.equal(
        encoder.tokenizer(["vivid blue & yellow!!"]).ids, _fixture_ids("vivid blue & yellow!!")
    )
    assert _max_diff(encoder(["a photo of a cat"]), reference["text/emb/1"]) <= TOL


def _fixture_ids(prompt: str) -> torch.Tensor:
    tok = CLIPTokenizer.from_pretrained(str(DATA / "tokenizer"))
    return tok(
        [prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def test_local_pointer_to_missing_folder_names_the_folder(tmp_path) -> None:
    shutil.copytree(DATA, tmp_path / "module")
    root = tmp_path / "module"
    shutil.rmtree(root / "text_encoder")
    with pytest.raises(TextEncoderNotFound, match=str(root / "text_encoder")):
        load_prompt_encoder(root)


def test_tokenizer_folder_without_special_tokens_map_still_loads(tmp_path, reference) -> None:
    root = shutil.copytree(DATA, tmp_path / "module")
    (root / "tokenizer" / "special_tokens_map.json").unlink()
    encoder = load_prompt_encoder(root)
    assert torch.equal(encoder.tokenizer([_PROMPT_2]).ids, reference["text/ids/2"])


_PROMPT_2 = "A Starry Night -- oil painting by Van Gogh; vivid blue & yellow!!"


def test_missing_pointer_file_is_named(tmp_path) -> None:
    shutil.copy(DATA / "model_index.json", tmp_path / "model_index.json")
    with pytest.raises(TextEncoderNotFound, match="oms_text_encoder"):
        load_prompt_encoder(tmp_path)


def test_weights_without_text_model_prefix_load_too(tmp_path, reference) -> None:
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    shutil.copy(DATA / "text_encoder" / "config.json", folder / "config.json")
    weights = load_file(str(DATA / "text_encoder" / "model.safetensors"))
    bare = {k.removeprefix("text_model."): v for k, v in weights.items()}
    save_file(bare, str(folder / "model.safetensors"))
    model = load_clip_text_model(folder)
    encoder = wrap_transformers_clip(model, CLIPTokenizer.from_pretrained(str(DATA / "tokenizer")))
    assert _max_diff(encoder(["a photo of a cat"]), reference["text/emb/1"]) <= TOL


def test_loaded_model_holds_the_file_weights_in_the_asked_dtype_and_real_position_ids() -> None:
    """Built on the meta device and filled with converted copies of the file's tensors."""
    weights = load_file(str(DATA / "text_encoder" / "model.safetensors"))
    model = load_clip_text_model(DATA / "text_encoder", dtype=torch.bfloat16)
    state = model.state_dict()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert all(state[k].dtype == torch.bfloat16 for k in weights)
    assert all(torch.equal(state[k], v.bfloat16()) for k, v in weights.items())
    positions = model.text_model.embeddings.position_ids
    assert positions.dtype == torch.int64 and torch.equal(positions, torch.arange(77)[None])


# --- borrowed transformers encoders ---------------------------------------------------------


def _random_clip(layers: int, hidden: int = 32, seed: int = 0, cls=CLIPTextModel):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    model = cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def sd21_tokenizer():
    return CLIPTokenizer.from_pretrained(str(DATA / "tokenizer"))


@pytest.mark.parametrize(
    "prompt",
    [
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines   many    spaces",
        'Punctuation!!! ?? ... ,,, (brackets) [square] {curly} <angle> "quotes"',
        "a (red:1.3) car, [blue] sky",  # a plain string: brackets are text, not emphasis
        "unicode: café naïve 東京タワー 🐱🚀✨, curly “quotes” — ﬁ ＡＢＣ",
        "text with <|endoftext|> inside",
        "!",
        " ".join(["word"] * 76),
        "x" * 300,
    ],
)
def test_a_plain_prompt_gives_the_tokenizers_own_ids_padded_to_77(
    fixture_encoder, sd21_tokenizer, prompt: str
) -> None:
    expected = sd21_tokenizer(
        [prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(fixture_encoder.tokenizer([prompt]).ids, expected)


def test_wrapped_model_with_default_layers_gives_last_hidden_state(
    sd21_tokenizer, reference
) -> None:
    model = load_clip_text_model(DATA / "text_encoder")
    encoder = wrap_transformers_clip(model, sd21_tokenizer)
    assert _max_diff(encoder(["a photo of a cat"]), reference["text/emb/1"]) <= TOL


def test_wrapped_model_num_layers_runs_first_layers_then_final_norm(sd21_tokenizer) -> None:
    deep = _random_clip(layers=3)
    shallow = CLIPTextModel(CLIPTextConfig(**{**deep.config.to_dict(), "num_hidden_layers": 2}))
    missing, unexpected = shallow.load_state_dict(deep.state_dict(), strict=False)
    assert not missing and all(".layers.2." in key for key in unexpected)
    ids = sd21_tokenizer(["a red car!"], padding="max_length", max_length=77, return_tensors="pt")
    expected = shallow.eval()(input_ids=ids.input_ids).last_hidden_state
    encoder = wrap_transformers_clip(deep, sd21_tokenizer, num_layers=2)
    assert _max_diff(encoder(["a red car!"]), expected) <= 1e-5


def test_wrapping_neither_copies_nor_moves_weights(sd21_tokenizer) -> None:
    model = _random_clip(layers=2)
    pointers = [p.data_ptr() for p in model.parameters()]
    encoder = wrap_transformers_clip(model, sd21_tokenizer, dtype=torch.float64)
    out = encoder.to(dtype=torch.float16)(["a cat", "a dog"])
    assert out.dtype == torch.float16 and out.shape == (2, 77, 32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert not out.requires_grad


def test_num_layers_outside_the_model_is_rejected(sd21_tokenizer) -> None:
    model = _random_clip(layers=2)
    with pytest.raises(ValueError, match=r"num_layers must be in 1\.\.2"):
        wrap_transformers_clip(model, sd21_tokenizer, num_layers=3)


# --- SDXL mixclip: two encoders, penultimate states concatenated ----------------------------


@pytest.fixture(scope="module")
def sdxl_models_dir(tmp_path_factory) -> Path:
    """A tiny SDXL-like repo folder: CLIPTextModel (24-d) + ...WithProjection (40-d)."""
    models = tmp_path_factory.mktemp("models")
    repo = models / SDXL.replace("/", "--")
    _random_clip(layers=3, hidden=24, seed=1).save_pretrained(
        repo / "text_encoder", safe_serialization=True
    )
    with_projection = _random_clip(layers=2, hidden=40, seed=2, cls=CLIPTextModelWithProjection)
    with_projection.save_pretrained(repo / "text_encoder_2", safe_serialization=True)
    # Like SDXL: tokenizer_2 is SD 2.1's (pad "!"), tokenizer pads with end-of-text.
    shutil.copytree(DATA / "tokenizer", repo / "tokenizer_2")
    shutil.copytree(DATA / "tokenizer", repo / "tokenizer")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = repo / "tokenizer" / name
        data = json.loads(path.read_text(encoding="utf-8"))
        data["pad_token"] = "<|endoftext|>"
        data.get("added_tokens_decoder", {}).pop("0", None)
        path.write_text(json.dumps(data), encoding="utf-8")
    return models


def test_mixclip_concatenates_each_encoders_penultimate_state(tmp_path, sdxl_models_dir) -> None:
    root = _module_pointing_at(tmp_path, SDXL, dual=True)
    encoder = load_prompt_encoder(root, models_dir=sdxl_models_dir)
    repo = sdxl_models_dir / SDXL.replace("/", "--")
    prompts = ["a photo of a cat", "vivid!!"]
    out = encoder(prompts)
    assert isinstance(encoder, ConcatPromptEncoder)
    assert encoder.hidden_size == 64 and out.shape == (2, 77, 64)
    halves = (out[..., :24], out[..., 24:])
    parts = (("text_encoder", "tokenizer", False), ("text_encoder_2", "tokenizer_2", True))
    for half, (model_dir, tok_dir, projection) in zip(halves, parts, strict=True):
        model = load_clip_text_model(repo / model_dir, with_projection=projection)
        tok = CLIPTokenizer.from_pretrained(str(repo / tok_dir))
        ids = tok(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        expected = model(input_ids=ids.input_ids, output_hidden_states=True).hidden_states[-2]
        assert _max_diff(half, expected) <= 1e-5


def test_mixclip_tokenizers_keep_their_own_padding(tmp_path, sdxl_models_dir) -> None:
    root = _module_pointing_at(tmp_path, SDXL, dual=True)
    encoder = load_prompt_encoder(root, models_dir=sdxl_models_dir)
    first, second = (part.tokenizer(["a cat"]).ids[0, -1].item() for part in encoder.encoders)
    assert (first, second) == (49407, 0)


@pytest.mark.parametrize("repo_id", ["stabilityai--x/y", "owner/a..b", "owner/name-"])
def test_a_pointer_naming_an_invalid_repo_id_is_a_broken_pointer(tmp_path, repo_id):
    module = tmp_path / "module"
    shutil.copytree(DATA, module)
    pointer = module / "oms_text_encoder" / "config.json"
    pointer.write_text(json.dumps({"_class_name": "CLIPTextModel", "_name_or_path": repo_id}))
    with pytest.raises(TextEncoderError, match="valid Hugging Face repo id") as err:
        load_oms(module)
    assert err.value.reason == REASON_POINTER_BROKEN
