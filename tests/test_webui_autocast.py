"""A1111 samples inside ``devices.autocast()``; the OMS step inside it runs in the precision OMS
chose, not the WebUI's cast, and the WebUI's cast is back in place for its own sampling.

No CUDA here: the CPU's autocast (bf16) plays ``torch.autocast("cuda")``; ``manual_cast`` is
A1111's class-wide forward swap (tests/webui_standins.py, ``A1111Devices``)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from oms_ext import load_oms
from oms_ext.runtime.cache import ModelCache
from oms_ext.webui import a1111
from oms_ext.webui.glue import Host, OMSController
from tests import webui_standins as wi
from tests.test_webui_glue import expected_vp_start


class _WatchingSampler(wi.KDiffusionSampler):
    """Records whether the WebUI's cast is in force when the WebUI samples."""

    def sample(self, p, x, *args, **kwargs):
        self.autocast = torch.is_autocast_enabled("cpu")
        self.manual_cast = "org_forward" in vars(torch.nn.Linear)
        return super().sample(p, x, *args, **kwargs)


def _run(models_dir, devices: wi.A1111Devices, *, scoped: bool = True) -> wi.Txt2Img:
    opts = SimpleNamespace(sgm_noise_multiplier=False, oms_dtype="fp32")
    host = Host(
        kind="a1111",
        opts=opts,
        cmd_opts=SimpleNamespace(),
        device="cpu",
        models_dir=models_dir,
        extension_dir=models_dir / "ext",
        before_every_sampling=True,
        log=lambda _: None,
        cache=ModelCache(),
        precision_scope=functools.partial(a1111.own_precision, devices),
    )
    p = wi.Txt2Img(version="1.10", devices=devices, sampler_factory=lambda: _WatchingSampler())
    p.scripts = wi.ScriptRunner(OMSController(host), "1.10", [True, "", "", 2.0, "oms_tiny"])
    wi.process_images(p)
    return p


@pytest.mark.parametrize(
    ("mode", "dtype"),
    [("autocast", torch.bfloat16), ("manual_cast", torch.float16), ("manual_cast", torch.bfloat16)],
)
def test_oms_in_fp32_gives_the_fp32_start_inside_the_webuis_cast(models_dir, mode, dtype):
    p = _run(models_dir, wi.A1111Devices(mode, dtype))
    assert "OMS alpha_bar0" in p.infotexts[0]
    got = wi.vp_start_of(p.samplers[0], p.steps)
    expected = expected_vp_start(load_oms(wi.TINY_MODULE), p, 0)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["autocast", "manual_cast"])
def test_the_webuis_cast_is_in_force_again_when_it_samples(models_dir, mode):
    p = _run(models_dir, wi.A1111Devices(mode))
    sampler = p.samplers[0]
    assert (sampler.autocast, sampler.manual_cast) == (mode == "autocast", mode == "manual_cast")
    assert "org_forward" not in vars(torch.nn.Linear)  # manual_cast undone after sampling
