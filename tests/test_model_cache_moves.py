"""A move of the OMS model is all or nothing: one that stops half-way (out of memory moving it
back to the GPU under --medvram, say) leaves no model computing across two devices; the cache
drops it and the next generation loads it afresh. The meta device plays the GPU."""

from __future__ import annotations

import pytest
import torch

from oms_ext import load_oms
from oms_ext.runtime.cache import CacheKey, ModelCache
from tests import webui_standins as wi

GPU = torch.device("meta")
KEY = CacheKey("oms_tiny", "meta", "float32", "module")


def _fails_when_moved(module: torch.nn.Module) -> None:
    real_apply = module._apply

    def apply(fn, recurse=True):
        if fn(torch.zeros(())).device == GPU:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real_apply(fn, recurse)

    module._apply = apply


def test_a_model_on_two_devices_reports_both():
    model = load_oms(wi.TINY_MODULE)
    model.unet.conv_in.to(GPU)
    assert model.devices() == {torch.device("cpu"), GPU}


def test_a_move_that_fails_half_way_drops_the_model_and_the_next_use_reloads_it():
    cache, loads = ModelCache(), []

    def load():
        model = load_oms(wi.TINY_MODULE)
        if not loads:
            _fails_when_moved(model.unet.conv_out)  # the last layer: the others have moved
        loads.append(model)
        return model

    with pytest.raises(torch.cuda.OutOfMemoryError):
        cache.get(KEY, load)
    assert cache.key is None and loads[0].devices() == {torch.device("cpu"), GPU}
    model = cache.get(KEY, load)
    assert len(loads) == 2 and model.devices() == {GPU}


def test_a_model_left_on_two_devices_is_moved_wholly_at_its_next_use():
    cache = ModelCache()
    model = cache.get(KEY, lambda: load_oms(wi.TINY_MODULE))
    # conv_in, which OMSModel.device reads, stays on the GPU
    model.unet.conv_out.to_empty(device="cpu")
    assert cache.get(KEY, lambda: pytest.fail("reloaded")).devices() == {GPU}
