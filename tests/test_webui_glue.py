"""The OMS controller driven through stand-ins of A1111 1.6, A1111 1.10.1 and Forge f2.0.1
(see tests/webui_standins.py): hooking, exactly-once application, the start in each sampler's
space, skips, batches and infotext."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from oms_ext import load_oms, oms_start
from oms_ext.precision import auto_dtype
from oms_ext.prompt_syntax import WeightedPrompt
from oms_ext.runtime.args import ALPHA_BAR_KEY, ENABLED_KEY, NOTE_KEY, SKIPPED_KEY
from oms_ext.runtime.cache import ModelCache
from oms_ext.runtime.runner import fresh_noise_seed
from oms_ext.webui import a1111, forge, glue
from oms_ext.webui.glue import Host, OMSController
from tests import webui_standins as wi

VERSIONS = ("1.6", "1.10", "forge")
#: One cache for the whole file, as in the WebUI: runs reuse the loaded module.
CACHE = ModelCache()


@pytest.fixture(autouse=True)
def _forge_backend(forge_backend):
    """Forge runs have Forge's memory manager (stand-in) as the script's host has."""
    return forge_backend


@pytest.fixture(scope="module")
def tiny_model(models_dir: Path):
    return load_oms(models_dir / "oms" / "oms_tiny")


def make_run(models_dir: Path, version: str, *, args=None, sgm=False, **p_kwargs):
    """A stand-in txt2img run with the controller wired in like the script wires it."""
    # fp32: the expected starts are computed in fp32 ("auto" picks bf16 on CPUs that run it
    # faster, which would move them by about 5e-4)
    opts = SimpleNamespace(sgm_noise_multiplier=sgm, oms_dtype="fp32")
    log: list[str] = []
    host = Host(
        kind="forge" if version == "forge" else "a1111",
        opts=opts,
        cmd_opts=SimpleNamespace(),
        device="cpu",
        models_dir=models_dir,
        extension_dir=models_dir / "ext",
        before_every_sampling=version != "1.6",
        log=log.append,
        cache=CACHE,
        forge_memory=forge.ForgeMemory() if version == "forge" else None,
        prompt_syntax=a1111.WebUIPromptSyntax(
            wi.prompt_parser_module(), wi.extra_networks_module(), opts
        ),
    )
    script_args = args if args is not None else [True, "", "", 2.0, "oms_tiny"]
    p_kwargs.setdefault("sampler_factory", lambda: wi.KDiffusionSampler(opts=opts))
    p = wi.Txt2Img(version=version, **p_kwargs)
    p.scripts = wi.ScriptRunner(OMSController(host), version, script_args)
    return p, log


def expected_vp_start(model, p, batch: int, cfg: float = 2.0, prompts=None) -> torch.Tensor:
    """Eq. 20 with s = 0 from the batch's own seeded noise, computed directly; ``prompts``:
    the OMS texts (default: the batch's prompts as they are)."""
    sampler = p.samplers[batch]
    seeds = p.all_seeds[batch * p.batch_size : (batch + 1) * p.batch_size]
    if prompts is None:
        prompts = p.all_prompts[batch * p.batch_size : (batch + 1) * p.batch_size]
    x_S = wi.ImageRNG((4, p.height // 8, p.width // 8), seeds).first()
    x0 = model.predict_x0(x_S, prompts, cfg, [""] * len(prompts))
    return oms_start(x0, x_S, wi.start_alpha_bar_of(sampler, p.steps))


SAMPLERS = {
    "euler_a_karras": lambda opts, version: wi.KDiffusionSampler(opts=opts),
    "euler_a_uniform": lambda opts, version: wi.KDiffusionSampler(scheduler="uniform", opts=opts),
    "ddim": lambda opts, version: wi.CompVisSampler(wi.ddim, version),
    "unipc": lambda opts, version: wi.CompVisSampler(wi.unipc, version),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_sampler_starts_from_oms_x_T_in_its_own_space(models_dir, tiny_model, version, sampler):
    opts = SimpleNamespace(sgm_noise_multiplier=False)
    p, _ = make_run(models_dir, version, sampler_factory=lambda: SAMPLERS[sampler](opts, version))
    wi.process_images(p)
    got = wi.vp_start_of(p.samplers[0], p.steps)
    torch.testing.assert_close(got, expected_vp_start(tiny_model, p, 0), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("version", VERSIONS)
def test_sgm_noise_multiplier_start_matches_oms_x_T(models_dir, tiny_model, version):
    p, _ = make_run(models_dir, version, sgm=True)
    p.sampler_factory = lambda: wi.KDiffusionSampler(
        opts=SimpleNamespace(sgm_noise_multiplier=True)
    )
    wi.process_images(p)
    got = wi.vp_start_of(p.samplers[0], p.steps)
    torch.testing.assert_close(got, expected_vp_start(tiny_model, p, 0), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("version", VERSIONS)
def test_per_step_noise_of_ancestral_samplers_is_untouched(models_dir, version):
    on, _ = make_run(models_dir, version)
    off, _ = make_run(models_dir, version, args=[False])
    wi.process_images(on)
    wi.process_images(off)
    assert not torch.allclose(on.samplers[0].start_latent, off.samplers[0].start_latent)
    for a, b in zip(on.samplers[0].step_noises, off.samplers[0].step_noises, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_oms_runs_exactly_once_per_batch(models_dir, version):
    p, log = make_run(models_dir, version, n_iter=3, batch_size=1)
    wi.process_images(p)
    assert sum("applied" in line for line in log) == 3


@pytest.mark.parametrize("version", VERSIONS)
def test_each_batch_of_a_batch_count_run_uses_its_own_prompts(models_dir, tiny_model, version):
    prompts = ["a dark room", "a bright beach", "a red car", "a snowy field"]
    p, _ = make_run(models_dir, version, prompt=prompts, n_iter=2, batch_size=2)
    wi.process_images(p)
    for batch in (0, 1):
        got = wi.vp_start_of(p.samplers[batch], p.steps)
        torch.testing.assert_close(
            got, expected_vp_start(tiny_model, p, batch), atol=2e-5, rtol=1e-4
        )


@pytest.mark.parametrize("version", VERSIONS)
def test_hires_pass_is_left_alone_with_a_note(models_dir, version):
    on, _ = make_run(models_dir, version, enable_hr=True)
    off, _ = make_run(models_dir, version, args=[False], enable_hr=True)
    wi.process_images(on)
    wi.process_images(off)
    assert on.rngs[-1].draws == off.rngs[-1].draws == 1
    torch.testing.assert_close(on.hires_noise, off.hires_noise, atol=0, rtol=0)
    assert "first pass only" in on.infotexts[0][NOTE_KEY]
    assert ALPHA_BAR_KEY in on.infotexts[0]


def test_forge_hands_noise_over_through_modified_noise_and_leaves_x_alone(models_dir):
    p, _ = make_run(models_dir, "forge")
    seen = {}
    original = p.scripts.controller.before_every_sampling

    def spy(p_, x):
        before = x.clone()
        original(p_, x)
        seen["x_unchanged"] = torch.equal(before, x)
        seen["modified"] = p_.modified_noise is not None

    p.scripts.controller.before_every_sampling = spy
    wi.process_images(p)
    assert seen == {"x_unchanged": True, "modified": True}
    assert p.modified_noise is None


def test_flux_on_forge_is_skipped_with_the_reason_in_infotext(models_dir):
    sd_model = wi.forge_sd_model(wi.PredictionFlux(), is_sd1=False)
    p, log = make_run(models_dir, "forge", sd_model=sd_model)
    wi.process_images(p)
    assert "flow-matching" in p.infotexts[0][SKIPPED_KEY]
    assert p.samplers[0].start_latent is not None
    assert any("skipped" in line for line in log)


class _ZeroTerminalSNRSampler(wi.KDiffusionSampler):
    def get_sigmas(self, p, steps):
        return torch.tensor([4500.0, 10.0, 1.0, 0.1, 0.0])


def test_zero_terminal_snr_start_is_left_alone(models_dir):
    on, _ = make_run(models_dir, "1.10", sampler_factory=_ZeroTerminalSNRSampler)
    off, _ = make_run(models_dir, "1.10", args=[False], sampler_factory=_ZeroTerminalSNRSampler)
    wi.process_images(on)
    wi.process_images(off)
    assert "zero-terminal-SNR" in on.infotexts[0][SKIPPED_KEY]
    torch.testing.assert_close(on.samplers[0].start_latent, off.samplers[0].start_latent)


@pytest.mark.parametrize("version", VERSIONS)
def test_load_error_skips_oms_and_the_image_is_still_sampled(models_dir, version, tmp_path):
    (tmp_path / "oms").mkdir()
    (tmp_path / "oms" / "broken.safetensors").write_bytes(b"not a safetensors file")
    p, _ = make_run(tmp_path, version, args=[True, "", "", 2.0, "broken"])
    wi.process_images(p)
    reason = p.infotexts[0][SKIPPED_KEY]
    assert reason == "module broken: the module file is truncated or corrupt; download it again"
    assert p.samplers[0].start_latent is not None


@pytest.mark.parametrize("version", VERSIONS)
def test_unexpected_error_skips_oms_with_the_reason_and_the_image_is_still_sampled(
    models_dir, version, monkeypatch
):
    def broken(*_args, **_kwargs):
        raise AttributeError("'EmbeddingsWithFixes' object has no attribute 'weight'")

    monkeypatch.setattr(glue, "provide_model", broken)
    p, log = make_run(models_dir, version)
    wi.process_images(p)
    info = p.infotexts[0]
    assert info[ENABLED_KEY] == "True"
    assert info[SKIPPED_KEY].startswith("internal error (AttributeError); please report")
    assert "EmbeddingsWithFixes" not in info[SKIPPED_KEY]  # messages may hold local paths
    assert any("Traceback" in line for line in log)
    seed_noise = wi.ImageRNG((4, 8, 8), p.all_seeds[:2]).first()
    sigma0 = p.samplers[0].get_sigmas(p, 4)[0]
    torch.testing.assert_close(p.samplers[0].start_latent, seed_noise * sigma0)


def test_disabled_oms_leaves_noise_and_infotext_alone(models_dir):
    p, log = make_run(models_dir, "1.10", args=[False])
    wi.process_images(p)
    expected = wi.ImageRNG((4, 8, 8), p.all_seeds[:2]).first() * p.samplers[0].get_sigmas(p, 4)[0]
    torch.testing.assert_close(p.samplers[0].start_latent, expected)
    assert p.infotexts[0] == {}
    assert log == []


@pytest.mark.parametrize("version", VERSIONS)
def test_nothing_is_loaded_while_oms_is_off(models_dir, monkeypatch, version):
    """No module or text-encoder weights are read for runs with OMS off; the first run with
    OMS on reads them (so the spies do see loading)."""
    import oms_ext.loading
    import oms_ext.text

    reads: list[str] = []

    def spy(owner: object, name: str) -> None:
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: reads.append(name) or real(*a, **k))

    spy(oms_ext.loading, "_build_and_fill")
    spy(oms_ext.text, "load_clip_text_model")
    monkeypatch.setitem(globals(), "CACHE", ModelCache())  # nothing loaded by earlier tests
    for _ in range(2):
        wi.process_images(make_run(models_dir, version, args=[False])[0])
    assert reads == []
    wi.process_images(make_run(models_dir, version)[0])
    assert sorted(set(reads)) == ["_build_and_fill", "load_clip_text_model"]


@pytest.mark.parametrize("version", VERSIONS)
def test_each_batch_looks_through_the_models_folders_once(models_dir, monkeypatch, version):
    """The module is resolved once per batch: choosing its text encoder and loading it share
    that one look at the folders."""
    import oms_ext.runtime.registry as registry

    scans: list[int] = []
    real = registry.scan_modules
    monkeypatch.setattr(registry, "scan_modules", lambda *a, **k: scans.append(1) or real(*a, **k))
    p, _ = make_run(models_dir, version, n_iter=2)
    wi.process_images(p)
    assert all(ALPHA_BAR_KEY in info for info in p.infotexts)
    assert len(scans) == 2


def test_infotext_records_marker_version_alpha_bar_and_non_defaults(models_dir):
    p, _ = make_run(models_dir, "1.10", args=[True, "dark", "", 3.0, "oms_tiny"])
    wi.process_images(p)
    info = p.infotexts[0]
    assert info[ENABLED_KEY] == "True"
    assert info["OMS prompt"] == "dark" and info["OMS CFG"] == 3.0
    assert info["OMS module"] == "oms_tiny"
    assert "OMS negative prompt" not in info and "OMS noise" not in info
    assert abs(float(info[ALPHA_BAR_KEY]) - wi.start_alpha_bar_of(p.samplers[0], p.steps)) < 1e-6


def test_infotext_names_the_module_auto_resolved_to(tmp_path):
    folder = wi.install_tiny_module(tmp_path / "oms", name="oms_b_openclip_15_21")
    weights = folder / "oms_module" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    p, _ = make_run(tmp_path, "1.10", args=[True])
    wi.process_images(p)
    assert ALPHA_BAR_KEY in p.infotexts[0]
    assert p.infotexts[0]["OMS module"] == "oms_b_openclip_15_21"


def test_xyz_override_on_p_replaces_the_ui_value(models_dir, tiny_model):
    p, _ = make_run(models_dir, "1.10")
    p.oms_cfg = 5.0
    wi.process_images(p)
    got = wi.vp_start_of(p.samplers[0], p.steps)
    torch.testing.assert_close(
        got, expected_vp_start(tiny_model, p, 0, cfg=5.0), atol=2e-5, rtol=1e-4
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_xyz_cells_with_oms_off_carry_no_oms_keys_of_an_earlier_cell(models_dir, version):
    p, _ = make_run(models_dir, version, batch_size=1)
    cells = [
        {"oms_enabled": "True", "oms_cfg": 3.0},
        {"oms_enabled": "False", "oms_cfg": 3.0},
        {"oms_enabled": "True", "oms_cfg": 2.0},  # the default: written nowhere
    ]
    on, off, on_again = wi.run_xyz_cells(p, cells)
    assert on.infotexts[0][ENABLED_KEY] == "True" and on.infotexts[0]["OMS CFG"] == 3.0
    assert not [k for k in off.infotexts[0] if k.startswith("OMS")]
    assert on_again.infotexts[0][ENABLED_KEY] == "True" and "OMS CFG" not in on_again.infotexts[0]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("steps", "second_order", "oms_text"),
    [(4, False, "night street"), (20, False, "day street"), (4, True, "day street")],
)
def test_oms_reads_the_prompt_the_webui_uses_at_the_first_step(
    models_dir, tiny_model, version, steps, second_order, oms_text
):
    p, log = make_run(
        models_dir,
        version,
        prompt="[day:night:0.2] street",
        steps=steps,
        second_order_sampler=second_order,  # counts 2 x steps: int(0.2 * 8) = 1
        batch_size=1,
    )
    wi.process_images(p)
    expected = expected_vp_start(tiny_model, p, 0, prompts=[oms_text])
    got = wi.vp_start_of(p.samplers[0], p.steps)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert f'OMS prompt "{oms_text}"' in next(line for line in log if "applied" in line)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_typed_oms_prompt_is_read_with_its_weights_and_without_tags(
    models_dir, tiny_model, version
):
    args = [True, "(dark:1.3) night <lora:x:0.8>", "", 2.0, "oms_tiny"]
    p, _ = make_run(models_dir, version, args=args, batch_size=1)
    wi.process_images(p)
    weighted = WeightedPrompt((("dark", 1.3), (" night ", 1.0)))
    expected = expected_vp_start(tiny_model, p, 0, prompts=[weighted])
    got = wi.vp_start_of(p.samplers[0], p.steps)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_a_prompt_longer_than_75_tokens_is_reported_as_cut(models_dir):
    p, log = make_run(models_dir, "1.10", prompt=" ".join(["dark"] * 80), batch_size=1)
    wi.process_images(p)
    assert p.infotexts[0][NOTE_KEY] == "OMS read the first 75 tokens of its prompt (80 in all)"
    assert any("first 75 tokens" in line for line in log)


def test_api_dict_argument_is_accepted(models_dir, tiny_model):
    p, _ = make_run(models_dir, "1.10", args=[{"enabled": True, "cfg": 2.0, "module": "oms_tiny"}])
    wi.process_images(p)
    got = wi.vp_start_of(p.samplers[0], p.steps)
    torch.testing.assert_close(got, expected_vp_start(tiny_model, p, 0), atol=2e-5, rtol=1e-4)


def test_fresh_noise_mode_is_reproducible_from_the_seed(models_dir):
    args = [True, "", "", 2.0, "oms_tiny", "Fresh noise"]
    a, _ = make_run(models_dir, "1.10", args=args)
    b, _ = make_run(models_dir, "1.10", args=args)
    keep, _ = make_run(models_dir, "1.10")
    for p in (a, b, keep):
        wi.process_images(p)
    torch.testing.assert_close(a.samplers[0].start_latent, b.samplers[0].start_latent)
    assert not torch.allclose(a.samplers[0].start_latent, keep.samplers[0].start_latent)


@pytest.mark.parametrize("version", VERSIONS)
def test_fresh_noise_batch_with_a_variation_strength_starts_each_image_from_its_own_z(
    models_dir, tiny_model, version
):
    args = [True, "", "", 2.0, "oms_tiny", "Fresh noise"]
    p, _ = make_run(models_dir, version, args=args, batch_size=4, subseed_strength=0.3)
    wi.process_images(p)
    assert len(set(p.all_seeds)) == 1  # the WebUI's rule: the variation lives in the subseeds
    sampler, shape = p.samplers[0], (4, p.height // 8, p.width // 8)
    x_S = wi.ImageRNG(shape, p.seeds, subseeds=p.subseeds, subseed_strength=0.3).first()
    z = wi.ImageRNG(
        shape,
        [fresh_noise_seed(s) for s in p.seeds],
        subseeds=[fresh_noise_seed(s) for s in p.subseeds],
        subseed_strength=0.3,
    ).first()
    alpha_bar = wi.start_alpha_bar_of(sampler, p.steps)
    x0 = tiny_model.predict_x0(x_S, p.prompts, 2.0)
    expected = oms_start(x0, x_S, alpha_bar, s=(1 - alpha_bar) ** 0.5, noise=z)
    got = wi.vp_start_of(sampler, p.steps)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(got[i], got[j], atol=0.05)


def test_unfired_rng_hook_is_removed_after_the_batch(models_dir):
    p, _ = make_run(models_dir, "1.6")
    p.sample = lambda: torch.zeros(1)  # an interrupted batch never draws its noise
    wi.process_images(p)
    assert "next" not in vars(p.rngs[0])


def test_a_sampler_of_unknown_shape_is_skipped_with_the_reason(models_dir):
    class Unknown:
        """A sampler of neither WebUI shape (e.g. from another extension)."""

        start_latent = None

        def sample(self, p, x, *args, **kwargs):
            self.start_latent = x.clone()
            return x

    p, _ = make_run(models_dir, "1.10", sampler_factory=Unknown)
    wi.process_images(p)
    assert "neither get_sigmas nor get_timesteps" in p.infotexts[0][SKIPPED_KEY]
    assert p.samplers[0].start_latent is not None


def test_invalid_api_args_turn_oms_off_with_a_reason_and_the_image_is_still_sampled(models_dir):
    p, log = make_run(models_dir, "forge", args=[True, "", "", 99.0, "oms_tiny"])
    wi.process_images(p)
    assert "cfg must lie in [0.0, 20.0], got 99.0" in p.infotexts[0][SKIPPED_KEY]
    assert ENABLED_KEY not in p.infotexts[0]
    assert any("skipped: invalid OMS settings" in line for line in log)
    assert p.samplers[0].start_latent is not None


# --- what the user sees under the result ----------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_a_skipped_oms_says_so_under_the_result(models_dir, version):
    p, _ = make_run(models_dir, version, args=[True, "", "", 2.0, "someone_elses_module"])
    processed = wi.process_images(p)
    assert processed.comments == (
        "One More Step skipped: module someone_elses_module is not installed; choose another "
        "module or put it into the OMS models folder\n"
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_an_applied_oms_adds_no_comment(models_dir, version):
    p, _ = make_run(models_dir, version)
    assert wi.process_images(p).comments == ""


# --- "Show OMS preview" ---------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("enable_hr", [False, True])
def test_the_preview_adds_one_picture_per_image_after_the_images(
    models_dir, tiny_model, version, enable_hr
):
    from oms_ext.preview import preview_images

    args = [True, "", "", 2.0, "oms_tiny", "Keep seed noise", True]
    p, _ = make_run(
        models_dir, version, args=args, batch_size=2, n_iter=2, width=64, height=48,
        enable_hr=enable_hr,
    )
    processed = wi.process_images(p)
    assert len(processed.images) == len(processed.infotexts) == 8
    assert processed.images[:4] == [f"image {i}" for i in range(4)]  # the real images first
    previews = processed.images[4:]
    assert [im.size for im in previews] == [(64, 48)] * 4  # PIL: (width, height)
    assert all(t.startswith("One More Step preview of image") for t in processed.infotexts[4:])
    seeds = p.all_seeds[2:4]  # the second batch's first image is preview 3
    x_S = wi.ImageRNG((4, 6, 8), seeds).first()
    x0 = tiny_model.predict_x0(x_S, p.all_prompts[2:4], 2.0)
    expected = preview_images(x0[0], "sd1", size=(48, 64)).numpy()
    got = torch.as_tensor(np.asarray(previews[2]))
    assert (got.int() - torch.as_tensor(expected).int()).abs().max() <= 1


@pytest.mark.parametrize("version", VERSIONS)
def test_the_save_button_saves_a_preview_under_the_seed_of_its_image(models_dir, version):
    args = [True, "", "", 2.0, "oms_tiny", "Keep seed noise", True]
    p, _ = make_run(models_dir, version, args=args, batch_size=2, n_iter=2)
    processed = wi.process_images(p)
    for image, text in enumerate(processed.infotexts[4:]):
        seed, prompt = wi.save_button_fields(text)  # raised KeyError: 'Seed' before
        assert seed == str(p.all_seeds[image])
        assert prompt.startswith(f"One More Step preview of image {image + 1} (")


@pytest.mark.parametrize("version", VERSIONS)
def test_without_the_preview_switch_the_run_has_only_its_own_images(models_dir, version):
    p, _ = make_run(models_dir, version, batch_size=2)
    processed = wi.process_images(p)
    assert processed.images == ["image 0", "image 1"]
    assert "preview" not in wi.infotext_line(p.infotexts[0]).lower()


def test_the_preview_is_asked_for_through_the_api_by_name(models_dir):
    p, _ = make_run(
        models_dir, "1.10", args=[{"enabled": True, "module": "oms_tiny", "preview": True}]
    )
    assert len(wi.process_images(p).images) == 2 * p.batch_size


def test_auto_precision_on_the_cpu_starts_within_a_percent_of_the_fp32_start(
    models_dir, tiny_model
):
    """'auto' runs OMS in bf16 where this CPU runs it faster (fp32 elsewhere)."""
    p, _ = make_run(models_dir, "1.10")
    p.scripts.controller.host.opts.oms_dtype = "auto"
    p.scripts.controller.host.cache = ModelCache()
    wi.process_images(p)
    got = wi.vp_start_of(p.samplers[0], p.steps)
    expected = expected_vp_start(tiny_model, p, 0)
    assert torch.linalg.vector_norm(got - expected) <= 1e-2 * torch.linalg.vector_norm(expected)
    model = p.scripts.controller.host.cache.get(p.scripts.controller.host.cache.key, None)
    assert model.dtype == auto_dtype(torch.device("cpu"))
