"""Module registry, verified downloads, the model cache, model provision and the runner's
failure handling (OOM, NaN)."""

from __future__ import annotations

import math
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from oms_ext.precision import auto_dtype
from oms_ext.prompt_syntax import PlainSyntax, TextRules
from oms_ext.runtime.args import SKIPPED_KEY, OMSArgs
from oms_ext.runtime.cache import CacheKey, ModelCache, canonical_device, same_device
from oms_ext.runtime.download import (
    DownloadError,
    DownloadPending,
    download_files,
    missing_files,
)
from oms_ext.runtime.provider import ModelRequest, provide_model
from oms_ext.runtime.registry import (
    AUTO_MODULE,
    MODULE_FILES,
    SD21_TEXT,
    fit_warning,
    module_choices,
    resolve_module,
    scan_modules,
)
from oms_ext.runtime.runner import BatchInputs, ImageSeeds, fresh_noise, fresh_noise_seed, run_oms
from oms_ext.spaces import SamplerStart, UnsupportedModelError
from oms_ext.webui import a1111
from oms_ext.webui.settings import Settings, compute_dtype, cpu_text_dtype
from tests import webui_standins as wi
from tests.fake_hub import FakeHub

TINY = wi.TINY_MODULE


def download(hub: FakeHub, target: Path, describe=True):
    return download_files(
        "h1t/oms_b_openclip_15_21",
        MODULE_FILES,
        target,
        fetch=hub.fetch,
        describe=hub.describe if describe else (lambda *a: {}),
        log=lambda _: None,
    )


def test_auto_picks_the_module_of_the_checkpoint_family(tmp_path):
    assert resolve_module(AUTO_MODULE, "sd2", [tmp_path]).name == "oms_b_openclip_15_21"
    assert resolve_module(AUTO_MODULE, "sdxl", [tmp_path]).name == "oms_b_openclip_xl"


def test_auto_on_an_unsupported_family_says_so(tmp_path):
    with pytest.raises(UnsupportedModelError, match="sd3"):
        resolve_module(AUTO_MODULE, "sd3", [tmp_path])


def test_a_known_module_for_the_wrong_family_is_refused_in_the_notes_words(tmp_path):
    with pytest.raises(UnsupportedModelError) as refused:
        resolve_module("oms_b_openclip_xl", "sd1", [tmp_path])
    assert refused.value.reason == fit_warning("oms_b_openclip_xl", "sd1")
    assert "made for SDXL checkpoints, the chosen checkpoint is SD1.x" in refused.value.reason


def test_missing_known_module_resolves_to_the_first_models_folder(tmp_path):
    resolved = resolve_module(AUTO_MODULE, "sd1", [tmp_path / "a", tmp_path / "b"])
    assert resolved.path == tmp_path / "a" / "oms_b_openclip_15_21"
    assert not resolved.present


def test_scan_finds_module_folders_and_single_files_first_folder_winning(tmp_path):
    wi.install_tiny_module(tmp_path / "a", "mine")
    (tmp_path / "b").mkdir()
    shutil.copy(
        TINY / "oms_module" / "diffusion_pytorch_model.safetensors",
        tmp_path / "b" / "mine.safetensors",
    )
    shutil.copy(
        TINY / "oms_module" / "diffusion_pytorch_model.safetensors",
        tmp_path / "b" / "other.safetensors",
    )
    (tmp_path / "b" / "notes.txt").write_text("x")
    found = scan_modules([tmp_path / "a", tmp_path / "b", tmp_path / "missing"])
    assert [(m.name, m.path.parent.name) for m in found] == [("mine", "a"), ("other", "b")]
    assert module_choices(found)[-2:] == ["mine", "other"]
    assert module_choices(found)[0] == AUTO_MODULE


def test_unknown_module_name_lists_what_is_available(tmp_path):
    with pytest.raises(ValueError, match="oms_b_openclip_xl"):
        resolve_module("nope", "sd1", [tmp_path])


def test_download_fetches_only_missing_files_and_verifies_them(tmp_path):
    target = tmp_path / "oms" / "m"
    (target / "oms_module").mkdir(parents=True)
    shutil.copy(TINY / "model_index.json", target / "model_index.json")
    hub = FakeHub()
    download(hub, target)
    assert "model_index.json" not in hub.fetched
    assert missing_files(target, MODULE_FILES) == []
    assert not [p for p in target.parent.iterdir() if "partial" in p.name]


def test_a_file_failing_verification_leaves_nothing_behind(tmp_path):
    target = tmp_path / "m"
    broken = ("oms_module/diffusion_pytorch_model.fp16.safetensors",)
    with pytest.raises(DownloadError, match="bytes"):
        download(FakeHub(broken=broken), target)
    assert missing_files(target, MODULE_FILES) == list(MODULE_FILES)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_without_hub_hashes_a_truncated_safetensors_file_is_caught(tmp_path):
    broken = ("oms_module/diffusion_pytorch_model.fp16.safetensors",)
    with pytest.raises(DownloadError, match="safetensors"):
        download(FakeHub(broken=broken), tmp_path / "m", describe=False)


def test_offline_error_names_repo_files_and_target_folder(tmp_path):
    target = tmp_path / "m"
    with pytest.raises(DownloadError) as err:
        download(FakeHub(offline=True), target)
    text = str(err.value)
    assert "h1t/oms_b_openclip_15_21" in text and str(target) in text
    assert "oms_module/diffusion_pytorch_model.fp16.safetensors" in text


def _hub_download(hub: FakeHub):
    return lambda repo, files, target, endpoint: download_files(
        repo, files, target, fetch=hub.fetch, describe=hub.describe, log=lambda _: None
    )


def _request(folder: Path, **kwargs) -> ModelRequest:
    kwargs.setdefault("allow_download", True)
    return ModelRequest(AUTO_MODULE, "sd1", (folder,), torch.device("cpu"), torch.float32, **kwargs)


def _pending_then_loaded(request: ModelRequest, cache: ModelCache, download):
    """The first request starts the background download and says so; the model loads after."""
    with pytest.raises(DownloadPending) as pending:
        provide_model(request, cache, download=download)
    cache.downloads.wait()
    return pending.value, provide_model(request, cache, download=download)


def test_missing_known_module_and_its_text_encoder_are_downloaded_in_the_background(tmp_path):
    hub = FakeHub()
    pending, model = _pending_then_loaded(_request(tmp_path), ModelCache(), _hub_download(hub))
    assert pending.reason == (
        "downloading oms_b_openclip_15_21 (308 MB + 681 MB), OMS will apply once it is there"
    )
    assert model.cross_attention_dim == 32
    assert (tmp_path / "oms_b_openclip_15_21" / "oms_module" / "config.json").is_file()
    assert (
        tmp_path / "stabilityai--stable-diffusion-2-1" / "text_encoder" / "config.json"
    ).is_file()


def test_a_module_being_downloaded_is_not_fetched_twice(tmp_path):
    release = threading.Event()
    calls: list[str] = []

    def slow(repo_id, files, target, *, endpoint=None):
        calls.append(repo_id)
        release.wait(10)
        raise DownloadError("offline", reason="could not download (offline?)")

    cache = ModelCache()
    for _ in range(3):
        with pytest.raises(DownloadPending, match="downloading|Still"):
            provide_model(_request(tmp_path), cache, download=slow)
    release.set()
    cache.downloads.wait()
    # one job per folder: the module and SD 2.1's encoder it needs, each fetched once
    assert sorted(calls) == ["h1t/oms_b_openclip_15_21", "stabilityai/stable-diffusion-2-1"]


def test_missing_module_with_downloads_off_names_the_files_to_fetch(tmp_path):
    with pytest.raises(DownloadError, match="downloading is off") as err:
        provide_model(_request(tmp_path, allow_download=False), ModelCache())
    assert "oms_module/diffusion_pytorch_model.fp16.safetensors" in str(err.value)
    assert err.value.reason.startswith("oms_b_openclip_15_21 is not downloaded (308 MB + 681 MB)")


def test_a_failed_download_fails_at_once_for_a_while_then_is_retried(tmp_path, monkeypatch):
    from oms_ext.runtime import download as download_module

    calls: list[str] = []

    def offline(repo_id, files, target, *, endpoint=None):
        calls.append(repo_id)
        raise DownloadError(f"could not download {repo_id}", reason="could not download (offline?)")

    clock = [1000.0]
    monkeypatch.setattr(download_module.time, "monotonic", lambda: clock[0])
    cache = ModelCache()
    with pytest.raises(DownloadPending):
        provide_model(_request(tmp_path), cache, download=offline)
    cache.downloads.wait()
    for _ in range(2):
        with pytest.raises(DownloadError) as err:
            provide_model(_request(tmp_path), cache, download=offline)
        assert err.value.reason == "could not download (offline?)"
    assert len(calls) == 2  # the module's job and the encoder's, once each
    clock[0] += cache.downloads.RETRY_AFTER_S
    with pytest.raises(DownloadPending):
        provide_model(_request(tmp_path), cache, download=offline)
    cache.downloads.wait()
    assert len(calls) == 4


class _FakeModel:
    def __init__(self, name: str):
        self.name = name
        self.moves: list[str] = []
        self._device = torch.device("cpu")

    @property
    def device(self):
        return self._device

    def to(self, device=None, dtype=None):
        self.moves.append(str(device))
        self._device = torch.device(device)
        return self

    def devices(self):
        return {self._device}

    def tensors(self):
        return {}


def test_cache_reuses_the_model_for_the_same_key_and_replaces_it_for_another():
    cache, loads = ModelCache(), []
    key = CacheKey("m", "cpu", "float32", "module")

    def load(name):
        loads.append(name)
        return _FakeModel(name)

    first = cache.get(key, lambda: load("a"))
    assert cache.get(key, lambda: load("b")) is first
    other = cache.get(CacheKey("m", "cpu", "float16", "module"), lambda: load("c"))
    assert other.name == "c" and loads == ["a", "c"]


def test_offloaded_model_returns_to_its_device_on_next_use():
    cache = ModelCache()
    key = CacheKey("m", "meta", "float16", "module")
    model = cache.get(key, lambda: _FakeModel("a"))
    cache.offload()
    assert model.device.type == "cpu"
    cache.get(key, lambda: _FakeModel("b"))
    assert model.device.type == "meta"


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("cuda", "cuda:0", True),
        ("cuda:1", "cuda", False),
        ("mps", "mps:0", True),
        ("cpu", "cpu", True),
    ],
)
def test_a_device_name_without_index_is_the_current_device(a, b, same):
    assert same_device(a, b) is same


class _CudaModel(_FakeModel):
    """Reports ``cuda:0``, as a model moved to A1111's ``devices.device`` ("cuda") does."""

    def __init__(self):
        super().__init__("gpu")
        self._device = torch.device("cuda", 0)


def test_a_model_on_cuda_0_is_not_moved_for_a_key_naming_cuda():
    cache, loads = ModelCache(), []
    key = CacheKey("m", str(canonical_device("cuda")), "float16", "module")
    for _ in range(3):
        model = cache.get(key, lambda: loads.append(1) or _CudaModel())
    assert loads == [1] and model.moves == []


CPU_AUTO = auto_dtype(torch.device("cpu"))  # bf16 where this CPU runs it faster, else fp32


@pytest.mark.parametrize(
    ("setting", "device", "webui", "half_works", "expected"),
    [
        ("auto", "cuda", torch.float16, True, torch.float16),
        ("auto", "cuda", torch.float32, True, torch.float32),  # --no-half / --precision full
        ("auto", "cuda", None, True, torch.float16),
        ("auto", "cuda", torch.float16, False, torch.float32),  # fp16 gave NaN here before
        ("auto", "cpu", torch.float16, True, CPU_AUTO),
        ("fp16", "cpu", None, True, torch.float32),  # fp16 is never used on the CPU
        ("fp16", "cuda", torch.float32, True, torch.float16),
        ("bf16", "cpu", None, True, torch.bfloat16),
        ("fp32", "cpu", None, True, torch.float32),
        ("auto", "cpu", None, False, torch.float32),  # bf16 gave NaN here before
    ],
)
def test_precision_follows_the_setting_the_webui_and_the_device(
    setting, device, webui, half_works, expected
):
    got = compute_dtype(Settings(dtype=setting), torch.device(device), webui, half_works=half_works)
    assert got == expected


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("auto", CPU_AUTO), ("fp16", CPU_AUTO), ("fp32", torch.float32), ("bf16", torch.bfloat16)],
)
def test_a_text_encoder_moved_to_the_cpu_never_runs_fp16_there(setting, expected):
    assert cpu_text_dtype(Settings(dtype=setting)) == expected


def test_a1111_precision_honours_no_half_and_precision_full():
    devices = SimpleNamespace(dtype=torch.float16)
    assert a1111.model_dtype(devices, SimpleNamespace()) == torch.float16
    assert a1111.model_dtype(devices, SimpleNamespace(no_half=True)) == torch.float32
    assert a1111.model_dtype(devices, SimpleNamespace(precision="full")) == torch.float32
    full = SimpleNamespace(dtype=torch.float32)  # devices.dtype after --no-half
    assert a1111.model_dtype(full, SimpleNamespace()) == torch.float32


def test_half_precision_nan_is_remembered_per_device():
    cache = ModelCache()
    cache.note_half_precision_nan("cuda")
    assert not cache.half_precision_works("cuda:0") and cache.half_precision_works("cuda:1")


def test_settings_fall_back_to_defaults_when_absent_or_invalid():
    assert Settings.from_opts(SimpleNamespace()) == Settings()
    opts = SimpleNamespace(oms_dtype="fp8", oms_gpu_memory="keep on GPU between generations")
    assert Settings.from_opts(opts) == Settings(gpu_memory="keep on GPU between generations")


def _inputs(**kwargs) -> BatchInputs:
    values = dict(
        noise=torch.randn(1, 4, 8, 8),
        start=SamplerStart.from_sigmas([14.6146, 0.0]),
        prompts=["a cat"],
        text_rules=TextRules(PlainSyntax(), 20),
        seeds=ImageSeeds([1]),
        family="sd1",
    )
    values.update(kwargs)
    return BatchInputs(**values)


class _ConstModel:
    """A stand-in OMS model predicting a constant x0 (NaN for a broken half precision)."""

    device = torch.device("cpu")

    def __init__(self, dtype=torch.float32, value=0.5):
        self.dtype, self.value = dtype, value

    def predict_x0(self, x_S, prompts, cfg, negatives):
        return torch.full_like(x_S, self.value)

    def count_tokens(self, prompts):
        return [len(str(p).split()) for p in prompts]


def test_nan_output_in_float32_skips_oms_for_the_batch():
    outcome = run_oms(_inputs(), OMSArgs(enabled=True), lambda fp32: _ConstModel(value=math.nan))
    assert outcome.noise is None and "NaN" in outcome.infotext[SKIPPED_KEY]


def test_nan_in_half_precision_is_retried_once_in_float32():
    asked = []

    def load(fp32):
        asked.append(fp32)
        return _ConstModel() if fp32 else _ConstModel(torch.float16, math.nan)

    outcome = run_oms(_inputs(), OMSArgs(enabled=True), load)
    assert outcome.applied and asked == [False, True]
    assert "float16 gave NaN/inf" in outcome.message


@pytest.mark.parametrize(
    "error",
    [torch.cuda.OutOfMemoryError("CUDA out of memory"), RuntimeError("MPS backend out of memory")],
)
def test_out_of_memory_skips_oms_for_the_batch(error):
    def load(fp32):
        raise error

    outcome = run_oms(_inputs(), OMSArgs(enabled=True), load)
    assert outcome.noise is None and "out of memory" in outcome.infotext[SKIPPED_KEY]


def test_other_runtime_errors_are_not_swallowed():
    def load(fp32):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_oms(_inputs(), OMSArgs(enabled=True), load)


def test_16_channel_latents_are_skipped_with_the_reason():
    outcome = run_oms(
        _inputs(noise=torch.randn(1, 16, 8, 8), family="sd3"), OMSArgs(enabled=True), _ConstModel
    )
    assert "16 channels" in outcome.infotext[SKIPPED_KEY]


def test_fresh_noise_is_seeded_from_the_image_seed_and_differs_from_the_seed_noise():
    z = fresh_noise(ImageSeeds([5, 6]), (4, 8, 8))
    torch.testing.assert_close(z, fresh_noise(ImageSeeds([5, 6]), (4, 8, 8)))
    x_S = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(z[0], x_S)
    assert fresh_noise_seed(5) != fresh_noise_seed(6)


def _salted(values):
    return [fresh_noise_seed(v) for v in values]


@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
def test_fresh_noise_mixes_variation_seeds_by_the_webuis_rule(strength):
    seeds = ImageSeeds([9, 9, 9], subseeds=[40, 41, 42], subseed_strength=strength)
    webui_rule = wi.ImageRNG(
        (4, 8, 8), _salted(seeds.seeds), subseeds=_salted(seeds.subseeds), subseed_strength=strength
    ).first()
    torch.testing.assert_close(fresh_noise(seeds, (4, 8, 8)), webui_rule, atol=1e-6, rtol=1e-5)


def test_fresh_noise_follows_resize_seed_from_like_the_webuis_noise():
    seeds = ImageSeeds([3], subseeds=[4], subseed_strength=0.5, resize_from=(48, 80))
    webui_rule = wi.ImageRNG(
        (4, 8, 8), _salted([3]), subseeds=_salted([4]), subseed_strength=0.5,
        seed_resize_from_h=48, seed_resize_from_w=80,
    ).first()
    torch.testing.assert_close(fresh_noise(seeds, (4, 8, 8)), webui_rule, atol=1e-6, rtol=1e-5)


def test_fresh_noise_of_a_variation_batch_differs_per_image_and_per_variation_seed():
    seeds = ImageSeeds([9, 9, 9, 9], subseeds=[40, 41, 42, 43], subseed_strength=0.3)
    z = fresh_noise(seeds, (4, 8, 8))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(z[i], z[j])
    changed = ImageSeeds([9] * 4, subseeds=[50, 41, 42, 43], subseed_strength=0.3)
    other = fresh_noise(changed, (4, 8, 8))
    assert not torch.allclose(z[0], other[0]) and torch.equal(z[1:], other[1:])


def test_a_mirror_address_with_a_trailing_slash_reaches_the_hub_client_without_it(tmp_path):
    hub, seen = FakeHub(), []

    def fetch(repo_id, filename, dest_dir, endpoint):
        seen.append(endpoint)
        return hub.fetch(repo_id, filename, dest_dir, endpoint)

    download_files(
        "h1t/oms_b_openclip_15_21",
        MODULE_FILES,
        tmp_path / "m",
        endpoint=" https://mirror.example/ ",
        fetch=fetch,
        describe=lambda *a: {},
        log=lambda _: None,
    )
    assert seen and set(seen) == {"https://mirror.example"}


def test_a_second_module_needing_the_encoder_being_fetched_joins_that_download(tmp_path):
    """Switching checkpoint during the first download: the SDXL module needs SD 2.1's encoder,
    which the SD1.x module's download is fetching already; no second job clears its folder."""
    release = threading.Event()
    calls: list[tuple[str, Path]] = []

    def slow(repo_id, files, target, *, endpoint=None):
        calls.append((repo_id, target))
        release.wait(10)
        raise DownloadError("offline", reason="could not download (offline?)")

    cache = ModelCache()
    for family in ("sd1", "sdxl"):
        cpu = torch.device("cpu")
        request = ModelRequest(
            AUTO_MODULE, family, (tmp_path,), cpu, torch.float32, allow_download=True
        )
        with pytest.raises(DownloadPending):
            provide_model(request, cache, download=slow)
    release.set()
    cache.downloads.wait()
    repos = sorted(repo for repo, _ in calls)
    assert repos == ["h1t/oms_b_openclip_15_21", "h1t/oms_b_openclip_xl", SD21_TEXT.repo_id]
    assert len({target for _, target in calls}) == 3


def test_a_failed_download_lists_every_file_still_needed_for_a_download_by_hand(tmp_path):
    def offline(repo_id, files, target, *, endpoint=None):
        raise DownloadError(f"could not download {repo_id}", reason="could not download (offline?)")

    cache = ModelCache()
    with pytest.raises(DownloadPending):
        provide_model(_request(tmp_path), cache, download=offline)
    cache.downloads.wait()
    with pytest.raises(DownloadError) as err:
        provide_model(_request(tmp_path), cache, download=offline)
    text = str(err.value)
    assert all(name in text for name in (*MODULE_FILES, *SD21_TEXT.files))
    assert len(SD21_TEXT.files) == 6


class _InterruptingHub(FakeHub):
    """The hub client's rule for ``local_dir`` downloads (huggingface_hub >= 0.23,
    ``file_download._download_to_tmp_and_move``): bytes arrive in
    ``<local_dir>/.cache/huggingface/download/<file>.incomplete`` and a later call resumes from
    its size. The connection drops half-way through the weights the first time."""

    def __init__(self):
        super().__init__()
        self.resumed_from: dict[str, int] = {}
        self.dropped = False

    def fetch(self, repo_id, filename, dest_dir, endpoint):
        from tests.fake_hub import _served

        data = _served(filename)
        partial = dest_dir / ".cache" / "huggingface" / "download" / f"{filename}.incomplete"
        partial.parent.mkdir(parents=True, exist_ok=True)
        have = partial.stat().st_size if partial.exists() else 0
        if have:
            self.resumed_from[filename] = have
        if filename.endswith(".safetensors") and not self.dropped:
            partial.write_bytes(data[: len(data) // 2])
            self.dropped = True
            raise OSError("Connection reset by peer")
        with partial.open("ab") as out:
            out.write(data[have:])
        dest = dest_dir / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, dest)
        return dest


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path):
    hub = _InterruptingHub()
    with pytest.raises(DownloadError):
        download(hub, tmp_path / "m")
    weights = "oms_module/diffusion_pytorch_model.fp16.safetensors"
    download(hub, tmp_path / "m")
    assert hub.resumed_from == {weights: len(_served_bytes(weights)) // 2}
    assert missing_files(tmp_path / "m", MODULE_FILES) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # staging gone once done


def _served_bytes(name: str) -> bytes:
    from tests.fake_hub import _served

    return _served(name)


def test_console_lines_are_written_in_one_piece(monkeypatch):
    import sys

    from oms_ext.runtime.download import console

    writes: list[str] = []
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(write=writes.append, flush=lambda: None))
    console("[OMS] Downloading oms_b_openclip_15_21")
    assert [w for w in writes if w] == ["[OMS] Downloading oms_b_openclip_15_21\n"]
