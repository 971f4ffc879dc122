"""Loading OMS modules (folder and single file, safetensors only) and running OMSModel."""

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oms_ext.loading import (
    METADATA_CONFIG_KEY,
    OMSLoadError,
    OMSModel,
    load_module,
    load_oms,
)
from oms_ext.prompt_syntax import WeightedPrompt
from oms_ext.unet import build_unet, count_parameters, packaged_config

FIXTURE = Path(__file__).parent / "data" / "oms-tiny"
WEIGHTS = "diffusion_pytorch_model.safetensors"
TINY_HEADS = {"attention_head_dim": [2, 4, 4]}


@pytest.fixture(scope="module")
def model() -> OMSModel:
    return load_oms(FIXTURE)


@pytest.fixture
def tiny_state() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "oms_module" / WEIGHTS))


def _latent(seed: int, shape: Sequence[int] = (1, 4, 16, 16)) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def _module_folder(root: Path, state: dict[str, torch.Tensor] | None = None, **config) -> Path:
    """A released-layout module folder (module part only) holding ``state`` and the config."""
    (root / "oms_module").mkdir(parents=True)
    cfg = json.loads((FIXTURE / "oms_module" / "config.json").read_text())
    (root / "oms_module" / "config.json").write_text(json.dumps({**cfg, **config}))
    if state is not None:
        save_file(state, str(root / "oms_module" / WEIGHTS))
    return root


class _FixedWidthEncoder:
    """A stand-in text encoder of a given width (zeros), for width checks."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), 77, self.hidden_size)

    def to(self, device=None, dtype=None) -> "_FixedWidthEncoder":
        return self


# ------------------------------------------------------------------------- what a model offers


def test_folder_load_exposes_config_source_and_text_width(model: OMSModel) -> None:
    assert model.source == FIXTURE
    assert model.config["block_out_channels"] == [32, 64, 64]
    assert model.cross_attention_dim == 32
    assert model.device == torch.device("cpu")
    assert model.dtype == torch.float32


def test_encode_returns_77_text_states_per_prompt(model: OMSModel) -> None:
    assert model.encode(["a", "b", "a"]).shape == (3, 77, 32)


def test_raw_module_call_tracks_no_gradients(model: OMSModel) -> None:
    assert not model.unet(_latent(0), model.encode(["a"])).requires_grad


def test_batch_rows_equal_single_prompt_results_with_per_row_negatives(model: OMSModel) -> None:
    x = _latent(1, (3, 4, 16, 16))
    prompts, negatives = ["a red car", "a dark forest", "a cat"], ["blurry", "", "dog"]
    batch = model.predict_x0(x, prompts, 2.0, negatives)
    for i in range(3):
        single = model.predict_x0(x[i : i + 1], [prompts[i]], 2.0, [negatives[i]])
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-5, rtol=0)


def test_a_single_prompt_is_used_for_every_row(model: OMSModel) -> None:
    x = _latent(2, (2, 4, 16, 16))
    torch.testing.assert_close(
        model.predict_x0(x, ["a cat"], 3.0, ["dog"]),
        model.predict_x0(x, ["a cat", "a cat"], 3.0, ["dog", "dog"]),
    )


def test_negative_prompts_default_to_the_empty_prompt(model: OMSModel) -> None:
    x = _latent(3)
    torch.testing.assert_close(
        model.predict_x0(x, ["a"], 2.0), model.predict_x0(x, ["a"], 2.0, [""])
    )


def test_negative_prompt_changes_the_guided_prediction(model: OMSModel) -> None:
    x = _latent(3)
    diff = model.predict_x0(x, ["a"], 2.0) - model.predict_x0(x, ["a"], 2.0, ["stormy night"])
    assert diff.abs().max() > 1e-3


@pytest.mark.parametrize("w", [0.0, 7.5])
def test_guided_prediction_is_eq21_from_separate_module_calls(model: OMSModel, w: float) -> None:
    # w = 0 is the negative prompt's prediction alone; w = 7.5 extrapolates past the prompt.
    x = _latent(6, (2, 4, 9, 13))
    prompts, negatives = ["a red car", "a lighthouse at dusk"], ["blurry", ""]
    v_uncond = model.unet(x, model.encode(negatives))
    v_cond = model.unet(x, model.encode(prompts))
    expected = -(v_uncond + w * (v_cond - v_uncond))
    got = model.predict_x0(x, prompts, w, negatives)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["prompts", "negative_prompts"])
def test_prompt_count_must_match_the_batch(model: OMSModel, name: str) -> None:
    kwargs = {"prompts": ["a"], "negative_prompts": None, name: ["a", "b"]}
    with pytest.raises(ValueError, match=f"{name}: got 2 strings for a batch of 3"):
        model.predict_x0(_latent(4, (3, 4, 8, 8)), cfg_scale=2.0, **kwargs)


@pytest.mark.parametrize(("w", "rows"), [(1.0, 2), (2.0, 4)])
def test_one_module_pass_per_prediction_cond_only_at_w1(
    model: OMSModel, w: float, rows: int
) -> None:
    seen: list[tuple[int, int]] = []
    handle = model.unet.register_forward_hook(
        lambda _m, args, _o: seen.append((args[0].shape[0], args[1].shape[0]))
    )
    try:
        model.predict_x0(_latent(5, (2, 4, 8, 8)), ["a", "b"], w)
    finally:
        handle.remove()
    assert seen == [(2, rows)]


def test_prediction_comes_back_in_the_dtype_of_x_S(model: OMSModel) -> None:
    x = _latent(6).to(torch.float16)
    out = model.predict_x0(x, ["a"], 2.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(
        out.float(), model.predict_x0(x.float(), ["a"], 2.0), atol=2e-3, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load_is_close_to_float32(model: OMSModel, dtype: torch.dtype) -> None:
    half = load_oms(FIXTURE, dtype=dtype)
    assert half.dtype == dtype
    assert half.unet.conv_out.weight.dtype == dtype
    x = _latent(7, (1, 4, 17, 23))
    got = half.predict_x0(x, ["a lighthouse"], 2.0)
    assert got.dtype == torch.float32
    expected = model.predict_x0(x, ["a lighthouse"], 2.0)
    tolerance = 0.02 if dtype == torch.float16 else 0.1
    assert (got - expected).abs().max() < tolerance * expected.abs().max()


def test_to_changes_module_dtype_and_keeps_results_close(model: OMSModel) -> None:
    copy = load_oms(FIXTURE).to(dtype=torch.bfloat16)
    assert copy.dtype == torch.bfloat16
    x = _latent(8)
    expected = model.predict_x0(x, ["a"], 2.0)
    assert (copy.predict_x0(x, ["a"], 2.0) - expected).abs().max() < 0.1 * expected.abs().max()


def test_bad_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_oms(FIXTURE, dtype=torch.float64)


# ------------------------------------------------------------------------- layouts


def test_fp16_variant_weight_file_is_found(tmp_path: Path, tiny_state: dict) -> None:
    root = _module_folder(tmp_path / "m")
    half = {k: v.half() for k, v in tiny_state.items()}
    save_file(half, str(root / "oms_module" / "diffusion_pytorch_model.fp16.safetensors"))
    unet, _ = load_module(root)
    assert torch.equal(unet.conv_in.weight, half["conv_in.weight"].float())


def test_single_file_with_architecture_inferred_from_shapes_reproduces_folder_load(
    tmp_path: Path, tiny_state: dict, model: OMSModel
) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_state, str(path), metadata={METADATA_CONFIG_KEY: json.dumps(TINY_HEADS)})
    single = load_oms(path, text_encoder=model.text_encoder)
    for shape in [(1, 4, 64, 64), (2, 4, 65, 97)]:
        x = _latent(9, shape)
        out = single.predict_x0(x, ["a cat"], 2.0)
        assert out.shape == x.shape
        assert torch.equal(out, model.predict_x0(x, ["a cat"], 2.0))


def test_folder_load_works_at_odd_latent_sizes(model: OMSModel) -> None:
    for shape in [(1, 4, 65, 97), (1, 4, 33, 47)]:
        assert model.predict_x0(_latent(10, shape), ["a"], 2.0).shape == shape


def test_single_file_uses_a_same_named_json_config(tmp_path: Path, tiny_state: dict) -> None:
    save_file(tiny_state, str(tmp_path / "tiny.safetensors"))
    shutil.copy(FIXTURE / "oms_module" / "config.json", tmp_path / "tiny.json")
    unet, config = load_module(tmp_path / "tiny.safetensors")
    assert config["attention_head_dim"] == [2, 4, 4]
    assert count_parameters(unet) == 2_344_804


def test_single_file_of_unknown_architecture_without_head_count_is_refused(
    tmp_path: Path, tiny_state: dict
) -> None:
    save_file(tiny_state, str(tmp_path / "tiny.safetensors"))
    with pytest.raises(OMSLoadError, match=r"tiny\.safetensors.*head count.*\.json"):
        load_module(tmp_path / "tiny.safetensors")


def test_single_file_without_text_encoder_is_refused(tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_state, str(path), metadata={METADATA_CONFIG_KEY: json.dumps(TINY_HEADS)})
    with pytest.raises(OMSLoadError, match="carries no text encoder; pass text_encoder="):
        load_oms(path)


def test_text_encoder_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(OMSLoadError, match="32-d text states but the text encoder gives 16-d"):
        load_oms(FIXTURE, text_encoder=_FixedWidthEncoder(16))


def test_oms_b_module_round_trips_strictly_through_a_single_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    released = packaged_config("oms_b_openclip_15_21")
    state = {k: v.half() for k, v in build_unet(released).state_dict().items()}
    path = tmp_path / "oms_b.safetensors"
    save_file(state, str(path))
    unet, config = load_module(path, dtype=torch.float16)
    assert count_parameters(unet) == 154_014_564
    assert config["attention_head_dim"] == released["attention_head_dim"]
    loaded = unet.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp16_file_loads_converted_into_memory_of_its_own(tmp_path: Path, dtype) -> None:
    """Released files are fp16; each parameter is the file's value converted once, in memory
    that is not the file's mapping."""
    fixture = load_file(str(FIXTURE / "oms_module" / "diffusion_pytorch_model.safetensors"))
    state = {k: v.half() for k, v in fixture.items()}
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    shutil.copy(FIXTURE / "oms_module" / "config.json", tmp_path / "tiny.json")
    unet, _ = load_module(path, dtype=dtype)
    loaded = unet.state_dict()
    assert all(
        loaded[k].dtype == dtype and torch.equal(loaded[k], v.to(dtype)) for k, v in state.items()
    )
    assert not any(p.requires_grad for p in unet.parameters())
    # No parameter is a view into the memory-mapped file (Windows could not replace it).
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps")
    mapped = [
        [int(a, 16) for a in line.split()[0].split("-")]
        for line in maps.read_text().splitlines()
        if line.endswith(str(path))
    ]
    assert not any(a <= p.data_ptr() < b for p in unet.parameters() for a, b in mapped)


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_are_refused_unopened(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"oms{suffix}"
    path.write_bytes(b"never unpickled")
    with pytest.raises(OMSLoadError, match=rf"oms\{suffix}: pickle .* \.safetensors"):
        load_oms(path)


def test_folder_with_only_pickle_weights_is_refused(tmp_path: Path) -> None:
    root = _module_folder(tmp_path / "m")
    (root / "oms_module" / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(OMSLoadError, match="only pickle weights.*safetensors"):
        load_oms(root)


def test_missing_keys_are_listed(tmp_path: Path, tiny_state: dict) -> None:
    del tiny_state["conv_out.bias"], tiny_state["mid_block.resnets.1.conv2.weight"]
    root = _module_folder(tmp_path / "m", tiny_state)
    with pytest.raises(OMSLoadError, match=r"2 missing key\(s\): conv_out\.bias, mid_block"):
        load_oms(root)


def test_unexpected_keys_are_listed(tmp_path: Path, tiny_state: dict) -> None:
    tiny_state["time_embedding.linear_1.weight"] = torch.zeros(128, 32)
    root = _module_folder(tmp_path / "m", tiny_state)
    with pytest.raises(OMSLoadError, match=r"1 unexpected key\(s\): time_embedding\.linear_1"):
        load_oms(root)


def test_shape_mismatch_is_reported(tmp_path: Path, tiny_state: dict) -> None:
    tiny_state["conv_out.bias"] = torch.zeros(5)
    root = _module_folder(tmp_path / "m", tiny_state)
    with pytest.raises(OMSLoadError, match=r"conv_out\.bias is \[5\] in the file, \[4\] by the"):
        load_oms(root)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    data = (FIXTURE / "oms_module" / WEIGHTS).read_bytes()
    root = _module_folder(tmp_path / "m")
    (root / "oms_module" / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(OMSLoadError, match=f"{WEIGHTS}: not a readable .*truncated or corrupt"):
        load_oms(root)


def test_config_that_does_not_match_the_weights_is_reported(tmp_path: Path, tiny_state) -> None:
    root = _module_folder(tmp_path / "m", tiny_state, cross_attention_dim=64)
    with pytest.raises(OMSLoadError, match=r"does not match the module config .*config\.json"):
        load_oms(root)


def test_folder_without_module_config_is_reported(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(OMSLoadError, match="no oms_module/config.json"):
        load_oms(tmp_path / "empty")


def test_module_subfolder_itself_gets_a_hint(tmp_path: Path, tiny_state: dict) -> None:
    root = _module_folder(tmp_path / "m", tiny_state)
    with pytest.raises(OMSLoadError, match="pass its parent folder"):
        load_oms(root / "oms_module")


def test_folder_without_weights_is_reported(tmp_path: Path) -> None:
    root = _module_folder(tmp_path / "m")
    with pytest.raises(OMSLoadError, match=f"no weights; expected {WEIGHTS}"):
        load_oms(root)


def test_nonexistent_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(OMSLoadError, match="no such file or folder"):
        load_oms(tmp_path / "nothing.safetensors")


class _CountingEncoder:
    """Wraps a prompt encoder and records the prompts of every call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.hidden_size = inner.hidden_size
        self.calls: list[list[str]] = []

    def __call__(self, prompts):
        self.calls.append([str(p) for p in prompts])
        return self.inner(prompts)

    def to(self, device=None, dtype=None):
        self.inner.to(device=device, dtype=dtype)
        return self


def test_owned_text_encoder_runs_once_per_prompt_across_calls() -> None:
    m = load_oms(FIXTURE)
    counting = _CountingEncoder(m.text_encoder)
    m.text_encoder = counting
    first = m.encode(["a cat", "", "a cat"])
    again = m.encode(["", "a dog"])
    assert counting.calls == [["a cat", ""], ["a dog"]]
    torch.testing.assert_close(again[0], first[1], atol=0, rtol=0)
    torch.testing.assert_close(first[0], first[2], atol=0, rtol=0)


def test_prompt_cache_keeps_only_the_most_recent_prompts() -> None:
    from oms_ext.loading import PROMPT_CACHE_SIZE

    m = load_oms(FIXTURE)
    m.encode([f"prompt {i}" for i in range(PROMPT_CACHE_SIZE + 5)])
    assert len(m.prompt_cache) == PROMPT_CACHE_SIZE
    assert WeightedPrompt.plain("prompt 0") not in m.prompt_cache
    assert WeightedPrompt.plain(f"prompt {PROMPT_CACHE_SIZE + 4}") in m.prompt_cache


def test_borrowed_text_encoder_is_run_on_every_call() -> None:
    owned = load_oms(FIXTURE)
    counting = _CountingEncoder(owned.text_encoder)
    borrowed = load_oms(FIXTURE, text_encoder=counting)
    borrowed.encode(["a cat", ""])
    borrowed.encode(["a cat", ""])
    assert counting.calls == [["a cat", ""], ["a cat", ""]]
    assert not borrowed.prompt_cache


def test_moving_the_model_moves_its_cached_text_states_along() -> None:
    m = load_oms(FIXTURE)
    first = m.encode(["a cat"])
    counting = _CountingEncoder(m.text_encoder)
    m.text_encoder = counting
    m.to(dtype=torch.bfloat16)
    again = m.encode(["a cat"])
    assert again.dtype == torch.bfloat16 and counting.calls == []  # not encoded again
    torch.testing.assert_close(again, first.to(torch.bfloat16))


def test_an_encoder_with_a_device_of_its_own_stays_there_when_the_model_moves() -> None:
    m = load_oms(FIXTURE, text_device="cpu")
    m.to(device="meta")
    assert m.device.type == "meta"
    assert {t.device.type for t in m.tensors()["text_encoder"]} == {"cpu"}
