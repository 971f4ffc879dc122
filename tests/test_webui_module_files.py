"""Module files as users really have them: single files named like a release, models folders
holding anything, broken files, offline or full disks. Each case gets its own short reason
without local paths (it goes into the infotext of shared PNGs); details go to the console."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from oms_ext import load_oms
from oms_ext.runtime import download as download_module
from oms_ext.runtime.args import SKIPPED_KEY
from oms_ext.runtime.cache import ModelCache
from oms_ext.runtime.download import (
    STAGING_MARK,
    DownloadError,
    DownloadPending,
    download_files,
    hub_describe,
)
from oms_ext.runtime.provider import ModelRequest, provide_model
from oms_ext.runtime.registry import (
    MODULE_FILES,
    ModuleNotInstalled,
    module_choices,
    module_notes,
    resolve_module,
    scan_modules,
)
from oms_ext.text import TextEncoderNotFound
from oms_ext.webui.glue import Host, OMSController
from tests import webui_standins as wi
from tests.fake_hub import FakeHub

TINY = wi.TINY_MODULE
TINY_WEIGHTS = TINY / "oms_module" / "diffusion_pytorch_model.safetensors"
SD21_FILES = [
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
]


def _hub_download(hub: FakeHub):
    return lambda repo, files, target, endpoint: download_files(
        repo, files, target, fetch=hub.fetch, describe=hub.describe, log=lambda _: None
    )


def _single_file(folder: Path, name: str) -> None:
    """The tiny module as one file; its config beside it (the tiny architecture, unlike the
    released ones, cannot be read from the tensor shapes alone)."""
    shutil.copy(TINY_WEIGHTS, folder / f"{name}.safetensors")
    shutil.copy(TINY / "oms_module" / "config.json", folder / f"{name}.json")


def _request(folder: Path, choice: str = "Auto", **kwargs) -> ModelRequest:
    return ModelRequest(choice, "sd1", (folder,), torch.device("cpu"), torch.float32, **kwargs)


# --- a single file named like a release ----------------------------------------------------


def test_a_single_file_named_like_a_release_loads_and_only_its_text_encoder_is_fetched(tmp_path):
    _single_file(tmp_path, "oms_b_openclip_15_21")
    hub, cache = FakeHub(), ModelCache()
    request = _request(tmp_path, allow_download=True)
    with pytest.raises(DownloadPending) as pending:
        provide_model(request, cache, download=_hub_download(hub))
    cache.downloads.wait()
    model = provide_model(request, cache, download=_hub_download(hub))
    assert pending.value.reason == (
        "downloading the text encoder of oms_b_openclip_15_21 (681 MB), OMS will apply once it "
        "is there"
    )
    assert sorted(hub.fetched) == sorted(SD21_FILES)
    assert model.source == tmp_path / "oms_b_openclip_15_21.safetensors"
    assert model.owns_text_encoder  # its own encoder: moved with it, its states cached


def test_a_single_file_named_like_a_release_with_its_encoder_present_fetches_nothing(tmp_path):
    _single_file(tmp_path, "oms_b_openclip_15_21")
    encoder_folder = tmp_path / "stabilityai--stable-diffusion-2-1"
    shutil.copytree(TINY / "text_encoder", encoder_folder / "text_encoder")
    shutil.copytree(TINY / "tokenizer", encoder_folder / "tokenizer")

    def no_download(*_args, **_kwargs):
        raise AssertionError("nothing may be downloaded")

    model = provide_model(_request(tmp_path), ModelCache(), download=no_download)
    assert model.cross_attention_dim == 32


def test_a_local_release_folder_is_never_fetched_again_even_when_incomplete(tmp_path):
    wi.install_tiny_module(tmp_path, "oms_b_openclip_15_21")
    weights = tmp_path / "oms_b_openclip_15_21" / "oms_module" / TINY_WEIGHTS.name
    weights.unlink()

    def no_download(*_args, **_kwargs):
        raise AssertionError("a local module is never fetched again")

    with pytest.raises(Exception) as err:
        provide_model(_request(tmp_path, allow_download=True), ModelCache(), download=no_download)
    assert err.value.reason == (
        "module oms_b_openclip_15_21: the module folder has no weights file; download it again"
    )


# --- the models folder can hold anything ---------------------------------------------------


def _checkpoint_like(path: Path) -> None:
    """An SD checkpoint dropped into the OMS folder: its UNet lives under model.diffusion_model."""
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(path))


def _messy_models_folder(root: Path) -> Path:
    folder = root / "oms"
    wi.install_tiny_module(folder, "good")
    shutil.copy(TINY_WEIGHTS, folder / "single.safetensors")
    wi.install_tiny_module(folder, ".hidden")
    wi.install_tiny_module(folder, f".oms_b_openclip_15_21{STAGING_MARK}abc123")
    (folder / "lost+found").mkdir()
    (folder / "dangling.safetensors").symlink_to(folder / "gone.safetensors")
    (folder / "dangling_dir").symlink_to(folder / "gone_dir")
    _checkpoint_like(folder / "sd15-checkpoint.safetensors")
    (folder / "notes.txt").write_text("x")
    return folder


@pytest.fixture
def unreadable(monkeypatch):
    """Folders this user may not look into. The tests may run as root, which ignores
    permission bits, so listing and stat-ing them raises PermissionError here instead."""
    blocked: set[Path] = set()
    real_iterdir, real_is_dir = Path.iterdir, Path.is_dir

    def iterdir(self):
        if self in blocked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    def is_dir(self):
        if self.parent in blocked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setattr(Path, "is_dir", is_dir)
    return blocked


def test_scan_lists_only_modules_whatever_else_the_folder_holds(tmp_path, unreadable):
    folder = _messy_models_folder(tmp_path)
    unreadable.add(folder / "lost+found")
    other_user = tmp_path / "other"
    other_user.mkdir()
    unreadable.add(other_user)
    names = [m.name for m in scan_modules([folder, other_user])]
    assert names == ["good", "single"]
    assert module_choices(scan_modules([folder]))[-2:] == ["good", "single"]


def test_an_unreadable_models_folder_lists_no_modules_and_breaks_nothing(tmp_path, unreadable):
    folder = _messy_models_folder(tmp_path)
    unreadable.add(folder)
    assert scan_modules([folder]) == []
    with pytest.raises(Exception) as err:
        resolve_module("good", "sd1", [folder])
    assert err.value.reason.startswith("module good is not installed")


def test_a_generation_with_a_messy_models_folder_applies_oms(tmp_path, unreadable):
    folder = _messy_models_folder(tmp_path)
    unreadable.add(folder / "lost+found")
    opts = SimpleNamespace(sgm_noise_multiplier=False)
    host = Host("a1111", opts, SimpleNamespace(), "cpu", tmp_path, tmp_path / "ext", True)
    p = wi.Txt2Img(sampler_factory=lambda: wi.KDiffusionSampler(opts=opts))
    p.scripts = wi.ScriptRunner(OMSController(host), "1.10", [True, "", "", 2.0, "good"])
    wi.process_images(p)
    assert p.infotexts[0]["OMS alpha_bar0"] and SKIPPED_KEY not in p.infotexts[0]


def test_a_download_removes_the_staging_folders_an_interrupted_one_left(tmp_path):
    stale = tmp_path / f".m{STAGING_MARK}old"
    (stale / "oms_module").mkdir(parents=True)
    (stale / "oms_module" / "half.safetensors").write_bytes(b"12")
    download_files(
        "h1t/oms_b_openclip_15_21",
        MODULE_FILES,
        tmp_path / "m",
        fetch=FakeHub().fetch,
        describe=FakeHub().describe,
        log=lambda _: None,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --- user mistakes are named as such, and reasons hold no local path -------------------------


def _broken_pointer(folder: Path) -> None:
    wi.install_tiny_module(folder, "mod")
    (folder / "mod" / "oms_text_encoder" / "config.json").write_text("{not json")


def _encoder_missing(folder: Path) -> None:
    wi.install_tiny_module(folder, "mod")
    shutil.rmtree(folder / "mod" / "text_encoder")


def _encoder_corrupt(folder: Path) -> None:
    wi.install_tiny_module(folder, "mod")
    weights = folder / "mod" / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _module_corrupt(folder: Path) -> None:
    wi.install_tiny_module(folder, "mod")
    weights = folder / "mod" / "oms_module" / TINY_WEIGHTS.name
    weights.write_bytes(weights.read_bytes()[:1000])


def _pickle_only(folder: Path) -> None:
    wi.install_tiny_module(folder, "mod")
    weights = folder / "mod" / "oms_module" / TINY_WEIGHTS.name
    weights.rename(weights.with_name("diffusion_pytorch_model.bin"))


@pytest.mark.parametrize(
    ("make", "choice", "reason"),
    [
        (
            lambda f: f.mkdir(),
            "someone_elses_module",
            "module someone_elses_module is not installed; choose another module or put it "
            "into the OMS models folder",
        ),
        (
            _broken_pointer,
            "mod",
            "module mod: its text-encoder pointer (oms_text_encoder/config.json) is malformed; "
            "download the module again",
        ),
        (
            _encoder_missing,
            "mod",
            "module mod: its text encoder files are missing; the console says which files go "
            "where",
        ),
        (
            _encoder_corrupt,
            "mod",
            "module mod: its text encoder files are truncated or corrupt; download them again",
        ),
        (
            _module_corrupt,
            "mod",
            "module mod: the module file is truncated or corrupt; download it again",
        ),
        (
            _pickle_only,
            "mod",
            "module mod: only .safetensors modules are read, pickles (.ckpt/.pt/.bin) are refused",
        ),
    ],
    ids=["unknown", "pointer", "encoder-missing", "encoder-corrupt", "module-corrupt", "pickle"],
)
def test_each_user_mistake_gets_its_own_short_reason_without_local_paths(
    tmp_path, make, choice, reason
):
    folder = tmp_path / "oms"
    make(folder)
    opts = SimpleNamespace(sgm_noise_multiplier=False)
    log: list[str] = []
    host = Host("a1111", opts, SimpleNamespace(), "cpu", tmp_path, tmp_path, True, log.append)
    host.cache = ModelCache()
    p = wi.Txt2Img(sampler_factory=lambda: wi.KDiffusionSampler(opts=opts))
    p.scripts = wi.ScriptRunner(OMSController(host), "1.10", [True, "", "", 2.0, choice])
    wi.process_images(p)
    info = p.infotexts[0]
    assert info[SKIPPED_KEY] == reason
    written = wi.infotext_line(info)
    assert str(tmp_path) not in written and "\n" not in written
    assert "internal error" not in written and "Traceback" not in "\n".join(log)
    assert any(str(tmp_path) in line for line in log)  # the console has the details
    assert p.samplers[0].start_latent is not None  # the image was still made


def test_a_full_disk_during_download_says_so(tmp_path):
    def fetch(repo_id, filename, dest_dir, endpoint):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DownloadError) as err:
        download_files("r/m", ["a.json"], tmp_path / "m", fetch=fetch, describe=lambda *a: {})
    assert err.value.reason == "the disk of the models folder is full; free space to download r/m"
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_download_larger_than_the_free_disk_space_is_refused_before_it_starts(
    tmp_path, monkeypatch
):
    hub = FakeHub()
    monkeypatch.setattr(
        download_module.shutil, "disk_usage", lambda _p: SimpleNamespace(free=1000)
    )
    with pytest.raises(DownloadError) as err:
        download_files(
            "h1t/oms_b_openclip_15_21", MODULE_FILES, tmp_path / "m",
            fetch=hub.fetch, describe=hub.describe,
        )
    assert err.value.reason.startswith("not enough disk space for h1t/oms_b_openclip_15_21")
    assert hub.fetched == []


# --- the hub clients the WebUIs ship ---------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [KeyError("etag"), ValueError("bad url"), RuntimeError("ssl"), OSError("offline")],
    ids=lambda e: type(e).__name__,
)
def test_any_failure_of_the_hub_client_becomes_a_download_error(tmp_path, error):
    def fetch(repo_id, filename, dest_dir, endpoint):
        raise error

    with pytest.raises(DownloadError) as err:
        download_files(
            "r/m", ["a.json"], tmp_path / "m", fetch=fetch, describe=lambda *a: {},
            log=lambda _: None,
        )
    assert err.value.reason.startswith("could not download r/m (offline?)")


def test_a_hub_client_without_paths_info_gives_no_metadata(monkeypatch):
    import huggingface_hub

    class OldApi:  # huggingface_hub before get_paths_info (A1111 1.6's venv)
        def __init__(self, endpoint=None):
            pass

    monkeypatch.setattr(huggingface_hub, "HfApi", OldApi)
    assert hub_describe("h1t/oms_b_openclip_15_21", ["model_index.json"], None) == {}


# --- library edge cases ---------------------------------------------------------------------


def test_a_latent_with_the_wrong_channel_count_names_both_counts():
    model = load_oms(TINY)
    with pytest.raises(ValueError, match="16 channels, this module takes 4-channel latents"):
        model.predict_x0(torch.randn(1, 16, 8, 8), "a cat", 2.0)


def test_a_module_folder_without_its_text_encoder_says_which_files_to_get_and_where(tmp_path):
    wi.install_tiny_module(tmp_path, "mod")
    pointer = tmp_path / "mod" / "oms_text_encoder" / "config.json"
    pointer.write_text(
        json.dumps(
            {
                "_class_name": "CLIPTextModel",
                "_name_or_path": "stabilityai/stable-diffusion-2-1",
                "subfolder": "text_encoder",
            }
        )
    )
    shutil.rmtree(tmp_path / "mod" / "text_encoder")
    with pytest.raises(TextEncoderNotFound) as err:
        load_oms(tmp_path / "mod", models_dir=tmp_path)
    text = str(err.value)
    assert "config.json" in text and "model.fp16.safetensors" in text
    assert str(tmp_path / "stabilityai--stable-diffusion-2-1" / "text_encoder") in text
    assert "huggingface-cli download stabilityai/stable-diffusion-2-1" in text


def test_without_a_terminal_the_download_logs_its_progress_with_size_and_speed(tmp_path):
    import time

    from oms_ext.runtime.download import RemoteFile

    def slow_fetch(repo_id, filename, dest_dir, endpoint):
        path = dest_dir / filename
        with path.open("wb") as f:
            for _ in range(5):
                f.write(b"x" * 400_000)
                f.flush()
                time.sleep(0.05)
        return path

    lines: list[str] = []
    download_files(
        "r/m",
        ["big.bin"],
        tmp_path / "m",
        fetch=slow_fetch,
        describe=lambda *a: {"big.bin": RemoteFile(2_000_000, None)},
        log=lines.append,
        progress_every_s=0.05,
    )
    progress = [line for line in lines if "MB/s" in line]
    assert progress and all(" of 2 MB (" in line for line in progress)


@pytest.mark.parametrize("where", ["my_module.ckpt", "my_module/oms_module/model.bin"])
def test_a_module_found_only_as_a_pickle_is_named_as_refused_not_as_missing(tmp_path, where):
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / where).write_bytes(b"pickled weights")
    with pytest.raises(ModuleNotInstalled) as err:
        resolve_module("my_module", "sd1", [tmp_path])
    assert "pickle file" in err.value.reason and "refuses to load" in err.value.reason
    assert Path(where).name in err.value.reason and str(tmp_path) not in err.value.reason


def test_the_auto_note_names_each_module_once(tmp_path):
    auto = module_notes("Auto", [tmp_path], None).splitlines()[0]
    assert auto.count("oms_b_openclip_15_21") == 1 and "for SD1.x/SD2.x" in auto


def test_the_auto_note_says_which_module_the_chosen_checkpoint_gets_and_that_it_downloads(
    tmp_path,
):
    auto = module_notes("Auto", [tmp_path], "sdxl").splitlines()[0]
    assert auto.endswith(
        "for the chosen SDXL checkpoint it uses oms_b_openclip_xl, a 308 MB + 681 MB text "
        "encoder download not on disk yet, fetched at the first Generate"
    )


def test_the_auto_note_says_a_module_on_disk_needs_no_download(tmp_path):
    shutil.copytree(TINY, tmp_path / "oms_b_openclip_15_21")
    auto = module_notes("Auto", [tmp_path], "sd1").splitlines()[0]
    assert auto.endswith("for the chosen SD1.x checkpoint it uses oms_b_openclip_15_21, on disk")
