"""VRAM is the user's: what One More Step holds on the compute device before, during and after
a generation, per setting, and when it lets go (OMS off, another checkpoint, unloading).

There is no GPU here, so the compute device of these runs is the CPU and the place OMS offloads
to is the meta device (ModelCache / ForgeMemory ``offload_device``): every byte the cache still
reports on the CPU is a byte the extension would hold in VRAM. The WebUI side is the
stand-ins' (tests/webui_standins.py), Forge's memory manager included."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from oms_ext import load_oms
from oms_ext.runtime.args import OMSArgs
from oms_ext.runtime.cache import CacheKey, ModelCache
from oms_ext.webui import forge
from oms_ext.webui.glue import Host, OMSController
from oms_ext.webui.settings import GPU_FREE, GPU_KEEP, Settings, text_encoder_device
from tests import webui_standins as wi

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sizes() -> dict[str, int]:
    """Bytes of the tiny module's parts (float32, as OMS runs on the CPU)."""
    model = load_oms(wi.TINY_MODULE)
    return {part: sum(t.nbytes for t in tensors) for part, tensors in model.tensors().items()}


def _controller(models_dir: Path, kind: str, gpu_memory: str = "auto", **cmd_opts) -> OMSController:
    opts = SimpleNamespace(
        sgm_noise_multiplier=False,
        oms_gpu_memory=gpu_memory,
        oms_dtype="fp32",  # sizes are fp32
    )
    host = Host(
        kind=kind,
        opts=opts,
        cmd_opts=SimpleNamespace(**cmd_opts),
        device="cpu",
        models_dir=models_dir,
        extension_dir=models_dir / "ext",
        before_every_sampling=True,
        log=lambda _: None,
        cache=ModelCache(offload_device="meta"),
        forge_memory=forge.ForgeMemory(offload_device="meta") if kind == "forge" else None,
    )
    return OMSController(host)


def _generate(controller: OMSController, enabled: bool = True) -> wi.Txt2Img:
    version = "forge" if controller.host.kind == "forge" else "1.10"
    p = wi.Txt2Img(version=version, sampler_factory=lambda: wi.KDiffusionSampler(opts=None))
    p.scripts = wi.ScriptRunner(controller, version, [enabled, "", "", 2.0, "oms_tiny"])
    wi.process_images(p)
    return p


def _held(controller: OMSController) -> int:
    return sum(controller.host.cache.held_bytes(CPU).values())


@pytest.mark.parametrize(
    ("kind", "gpu_memory", "cmd_opts", "kept"),
    [
        ("a1111", "auto", {}, True),
        ("a1111", "auto", {"medvram": True}, False),
        ("a1111", "auto", {"lowvram": True}, False),
        ("a1111", GPU_FREE, {}, False),
        ("a1111", GPU_KEEP, {"medvram": True}, True),
        ("forge", "auto", {}, True),  # Forge's memory manager frees it when it needs the room
        ("forge", GPU_FREE, {}, False),
        ("forge", GPU_KEEP, {}, True),
    ],
)
def test_vram_held_before_during_and_after_a_generation(
    models_dir, sizes, forge_backend, kind, gpu_memory, cmd_opts, kept
):
    controller = _controller(models_dir, kind, gpu_memory, **cmd_opts)
    during: list[dict[str, int]] = []
    before = _held(controller)
    real_load = controller.host.cache.get

    def load_and_watch(key, load, **kwargs):
        model = real_load(key, load, **kwargs)
        if not during:
            model.unet.register_forward_pre_hook(
                lambda *_: during.append(controller.host.cache.held_bytes(CPU))
            )
        return model

    controller.host.cache.get = load_and_watch
    p = _generate(controller)
    assert "OMS alpha_bar0" in p.infotexts[0]
    states = 2 * 77 * 32 * 4  # the batch's prompt and the empty negative, cached
    assert before == 0
    assert during[0] == {
        "module": sizes["module"],
        "text_encoder": sizes["text_encoder"],
        "text_states": states,
    }
    after = controller.host.cache.held_bytes(CPU)
    assert after["module"] == (sizes["module"] if kept else 0)
    assert after["text_states"] == (states if kept else 0)
    # Under --medvram/--lowvram the encoder runs on the CPU (no VRAM) and stays there.
    text_stays = kept or bool(cmd_opts)
    assert after["text_encoder"] == (sizes["text_encoder"] if text_stays else 0)
    if kind == "forge":
        assert forge_backend.holds(controller.host.forge_memory._patcher.model) is kept


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_a_generation_with_oms_off_after_one_with_it_frees_the_gpu(models_dir, forge_backend, kind):
    controller = _controller(models_dir, kind, GPU_KEEP)
    _generate(controller)
    assert _held(controller) > 0
    _generate(controller, enabled=False)
    assert _held(controller) == 0
    assert not forge_backend.current_loaded_models


def test_nothing_is_loaded_while_oms_is_off(models_dir):
    controller = _controller(models_dir, "a1111")
    _generate(controller, enabled=False)
    assert controller.host.cache.key is None and _held(controller) == 0


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_another_checkpoint_takes_oms_off_the_gpu(models_dir, forge_backend, kind):
    controller = _controller(models_dir, kind, GPU_KEEP)
    _generate(controller)
    controller.on_model_loaded(wi.SDModel())
    assert _held(controller) == 0
    assert controller.host.cache.key is not None  # its own encoder: kept, in RAM


def test_a_model_borrowing_a_checkpoints_encoder_is_dropped_with_the_checkpoint(tmp_path):
    cache = ModelCache()
    borrowing = CacheKey("m", "cpu", "float32", "checkpoint:old")
    cache.get(borrowing, lambda: load_oms(wi.TINY_MODULE))
    controller = OMSController(
        Host("a1111", None, SimpleNamespace(), "cpu", tmp_path, tmp_path, True, cache=cache)
    )
    same = wi.SDModel()
    same.sd_checkpoint_info = SimpleNamespace(hash="old")
    controller.on_model_loaded(same)
    assert cache.key is not None
    other = wi.SDModel()
    other.sd_checkpoint_info = SimpleNamespace(hash="new")
    controller.on_model_loaded(other)
    assert cache.key is None


@pytest.mark.parametrize(
    ("setting", "saves_vram", "expected"),
    [("auto", True, "cpu"), ("auto", False, None), ("cpu", False, "cpu"), ("gpu", True, None)],
)
def test_the_text_encoder_runs_on_the_cpu_where_the_webui_saves_vram(setting, saves_vram, expected):
    got = text_encoder_device(Settings(text_encoder_device=setting), saves_vram)
    assert got == (torch.device(expected) if expected else None)


@pytest.mark.parametrize(("kind", "low"), [("a1111", "medvram"), ("forge", "low_vram")])
def test_auto_keeps_the_text_encoder_off_the_gpu_where_the_webui_saves_vram(
    models_dir, forge_backend, kind, low
):
    forge_backend.low_vram = kind == "forge"
    forge_backend.device = torch.device("meta")  # Forge's GPU (only a request is built here)
    cmd_opts = {low: True} if kind == "a1111" else {}
    controller = _controller(models_dir, kind, **cmd_opts)
    request = controller._request(OMSArgs(enabled=True, module="oms_tiny"), "sd1", Settings(), None)
    assert request.text_device == CPU


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_free_after_each_generation_frees_once_after_the_last_batch(
    models_dir, forge_backend, kind
):
    controller = _controller(models_dir, kind, GPU_FREE)
    releases: list[str] = []
    real_release = controller.release_gpu

    def release(why):
        releases.append(why)
        real_release(why)

    controller.release_gpu = release
    version = "forge" if kind == "forge" else "1.10"
    p = wi.Txt2Img(
        version=version, n_iter=3, sampler_factory=lambda: wi.KDiffusionSampler(opts=None)
    )
    p.scripts = wi.ScriptRunner(controller, version, [True, "", "", 2.0, "oms_tiny"])
    wi.process_images(p)
    assert all("OMS alpha_bar0" in info for info in p.infotexts)
    assert releases == ["generation done"] and _held(controller) == 0


def test_the_half_precision_model_leaves_memory_before_the_fp32_retry_loads(
    models_dir, monkeypatch
):
    import gc
    import weakref

    from oms_ext.runtime import provider

    controller = _controller(models_dir, "a1111")
    controller.host.opts.oms_dtype = "bf16"
    real_load = provider.load_oms
    first: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    def load(path, device, dtype, **kwargs):
        if first:  # the fp32 retry
            gc.collect()
            alive_at_retry.append(first[0]() is not None)
            return real_load(path, device, dtype, **kwargs)
        model = real_load(path, device, dtype, **kwargs)
        model.unet.forward = lambda x, context: torch.full(
            (context.shape[0], *x.shape[1:]), float("nan"), dtype=x.dtype
        )
        first.append(weakref.ref(model))
        return model

    monkeypatch.setattr(provider, "load_oms", load)
    p = _generate(controller)
    assert "OMS alpha_bar0" in p.infotexts[0]  # applied, by the fp32 model
    assert alive_at_retry == [False]
