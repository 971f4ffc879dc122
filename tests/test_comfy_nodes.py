"""The ComfyUI nodes on stand-ins of ComfyUI's sampling rules (tests/comfy_standins.py).

The start matrix: for every sampler x scheduler at 4 and 20 steps (and denoise < 1,
start_at_step, custom sigmas, batch_index, v-prediction, LCM) the first model call's x is
x0_hat + s0 * noise, recomputed here from the module with the core API; skipped or off, it is
ComfyUI's own noise scaling.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from oms_ext.loading import load_oms
from tests import comfy_standins as cs
from tests import webui_standins as wi

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEGATIVE, CFG = "a dark night", "", 2.0


@pytest.fixture(autouse=True)
def one_thread():
    """8x8 latents gain nothing from threads, and on a busy machine two threads each wait for
    the other (40x slower); the matrix runs the module some 800 times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    """ComfyUI stand-ins with the tiny module in models/oms/oms_tiny."""
    env = cs.install(monkeypatch, tmp_path)
    wi.install_tiny_module(Path(env.folder_paths.models_dir) / "oms")
    for name in [m for m in sys.modules if m.startswith("oms_ext.comfy")]:
        monkeypatch.delitem(sys.modules, name)
    return env


@pytest.fixture
def nodes(comfy):
    from oms_ext.comfy import nodes

    return nodes


@pytest.fixture
def oms(nodes):
    return nodes.OneMoreStepLoader().load("oms_tiny", "auto")[0]


@pytest.fixture(scope="module")
def reference():
    """The tiny module loaded independently of the nodes, for the recomputation."""
    return load_oms(wi.TINY_MODULE, "cpu", torch.float32)


def applied(nodes, model, oms, **kw):
    args = {"oms_prompt": PROMPT, "oms_negative": NEGATIVE, "oms_cfg": CFG,
            "noise_mode": "Keep seed noise", **kw}  # fmt: skip
    return nodes.OneMoreStepApply().apply(model, oms, **args)[0]


def first_x(model, sampler="euler", scheduler="normal", steps=4, denoise=None, seed=1,
            latent=None, start_step=None, mask=None, noise=None, batch_index=None):  # fmt: skip
    """Run KSampler(Advanced) on ``model``; the first model call's (x, sigma) and the noise."""
    latent = torch.zeros(1, 4, 8, 8) if latent is None else latent
    if noise is None:
        noise = cs.prepare_noise(latent, seed, batch_index)
    guider = cs.CFGGuider(model)
    ksampler = cs.KSampler(model, steps, sampler, scheduler, denoise)
    ksampler.sample(guider, noise, latent, start_step=start_step, denoise_mask=mask, seed=seed)
    x, sigma = guider.calls[0]
    return x, float(sigma[0]), noise


def expected_start(reference, noise, sigma0):
    """x0_hat + s0 * x_S (Eq. 20 with s = 0, in sigma space), recomputed with the core."""
    x0_hat = reference.predict_x0(noise, PROMPT, CFG, NEGATIVE)
    return x0_hat + sigma0 * noise


def comfy_scaling(noise, sigma0, model):
    """ComfyUI's own start: noise * sqrt(1 + s0^2) at sigma_max, else noise * s0."""
    sigma_max = float(model.get_model_object("model_sampling").sigma_max)
    at_max = math.isclose(sigma0, sigma_max, rel_tol=1e-5) or sigma0 > sigma_max
    return noise * (math.sqrt(1 + sigma0**2) if at_max else sigma0)


@pytest.mark.parametrize("sampler", cs.SAMPLER_NAMES)
def test_every_scheduler_starts_from_x0_hat_plus_sigma0_noise(nodes, oms, reference, sampler):
    model = applied(nodes, cs.sd_model(), oms)
    noise = cs.prepare_noise(torch.zeros(1, 4, 8, 8), 7)
    x0_hat = reference.predict_x0(noise, PROMPT, CFG, NEGATIVE)
    for scheduler in cs.SCHEDULER_NAMES:
        for steps in (4, 20):
            x, sigma0, _ = first_x(model, sampler, scheduler, steps, noise=noise)
            torch.testing.assert_close(x, x0_hat + sigma0 * noise, rtol=1e-4, atol=1e-4,
                                       msg=f"{sampler} {scheduler} {steps}")  # fmt: skip


def test_the_matrix_covers_both_noise_scalings(nodes, oms):
    # ddim_uniform starts below sigma_max (noise * s0), normal at it (noise * sqrt(1 + s0^2)).
    ms = cs.sd_model().get_model_object("model_sampling")
    starts = {s: float(cs.calculate_sigmas(ms, s, 20)[0]) for s in cs.SCHEDULER_NAMES}
    sigma_max = float(ms.sigma_max)
    assert starts["normal"] == pytest.approx(sigma_max)
    assert starts["ddim_uniform"] < sigma_max * 0.9


@pytest.mark.parametrize("denoise", [0.3, 0.75])
def test_denoise_below_one_starts_lower_and_still_at_the_oms_start(nodes, oms, reference, denoise):
    x, sigma0, noise = first_x(applied(nodes, cs.sd_model(), oms), "dpmpp_2m", "karras", 10,
                               denoise=denoise)  # fmt: skip
    assert sigma0 < 14.0
    torch.testing.assert_close(x, expected_start(reference, noise, sigma0), rtol=1e-4, atol=1e-4)


def test_start_at_step_of_ksampler_advanced(nodes, oms, reference):
    x, sigma0, noise = first_x(applied(nodes, cs.sd_model(), oms), "euler", "normal", 20,
                               start_step=5)  # fmt: skip
    assert sigma0 < 5.0
    torch.testing.assert_close(x, expected_start(reference, noise, sigma0), rtol=1e-4, atol=1e-4)


def _custom_sigmas():
    """SamplerCustomAdvanced's sigma nodes (comfy_extras/nodes_custom_sampler.py,
    nodes_align_your_steps.py): AYS SD1 (starts at 14.615, above sigma_max), Karras with
    its node's defaults, SDTurbo (timesteps 999, 899, ...), SplitSigmas' second half."""
    ms = cs.sd_model().get_model_object("model_sampling")
    ays = torch.tensor(cs.schedules.AYS_SIGMAS["sd15"], dtype=torch.float32)
    karras = cs.schedules.karras_sigmas(8, 0.0291675, 14.614642).float()
    turbo = torch.cat([ms.sigma(torch.tensor([999.0, 899.0, 799.0, 699.0])), torch.zeros(1)])
    split = cs.calculate_sigmas(ms, "normal", 10)[4:]
    return {"ays": ays, "karras": karras, "sdturbo": turbo, "split": split}


@pytest.mark.parametrize("name", ["ays", "karras", "sdturbo", "split"])
def test_sampler_custom_advanced_with_custom_sigmas(nodes, oms, reference, name):
    sigmas = _custom_sigmas()[name]
    model = applied(nodes, cs.sd_model(), oms)
    latent = torch.zeros(1, 4, 8, 8)
    noise = cs.prepare_noise(latent, 3)  # Noise_RandomNoise.generate_noise
    guider = cs.CFGGuider(model)
    guider.sample(noise, latent, cs.sampler_object("euler_ancestral"), sigmas, seed=3)
    x, sigma = guider.calls[0]
    assert float(sigma[0]) == pytest.approx(float(sigmas[0]))
    torch.testing.assert_close(
        x, expected_start(reference, noise, float(sigmas[0])), rtol=1e-4, atol=1e-4
    )


def test_batch_index_noise_is_used_row_by_row(nodes, oms, reference):
    latent = torch.zeros(3, 4, 8, 8)
    x, sigma0, noise = first_x(applied(nodes, cs.sd_model(), oms), latent=latent,
                               batch_index=[4, 1, 4])  # fmt: skip
    torch.testing.assert_close(noise[0], noise[2])
    torch.testing.assert_close(x, expected_start(reference, noise, sigma0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["v_prediction", "lcm"])
def test_v_prediction_and_lcm_model_sampling_patches(nodes, oms, reference, kind):
    model = applied(nodes, cs.model_sampling_patch(cs.sd_model(), kind), oms)
    cases = (("euler", "normal"), ("lcm", "sgm_uniform"), ("ddim", "ddim_uniform"))
    for sampler, scheduler in cases:
        x, sigma0, noise = first_x(model, sampler, scheduler, 4)
        torch.testing.assert_close(
            x, expected_start(reference, noise, sigma0), rtol=1e-4, atol=1e-4
        )


def test_without_apply_the_start_is_comfyuis_noise_scaling():
    model = cs.sd_model()
    for scheduler in ("normal", "ddim_uniform"):
        x, sigma0, noise = first_x(model, "euler", scheduler, 20)
        torch.testing.assert_close(x, comfy_scaling(noise, sigma0, model))


def _skip_cases():
    latent = torch.zeros(1, 4, 8, 8)
    return {
        "img2img": {"latent": torch.ones(1, 4, 8, 8) * 0.1},
        "inpainting mask": {"mask": torch.ones(1, 1, 8, 8)},
        "add_noise off": {"noise": torch.zeros_like(latent)},
        "16-channel latent": {"latent": torch.zeros(1, 16, 8, 8)},
    }


@pytest.mark.parametrize("case", list(_skip_cases()))
def test_inputs_oms_must_not_touch_are_left_exactly_alone(nodes, oms, case, caplog):
    kw = _skip_cases()[case]
    model = applied(nodes, cs.sd_model(), oms)
    x, sigma0, noise = first_x(model, "euler", "normal", 4, **kw)
    latent = kw.get("latent", torch.zeros(1, 4, 8, 8))
    torch.testing.assert_close(x, comfy_scaling(noise, sigma0, model) + latent)
    assert sum("One More Step skipped" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (lambda: cs.model_sampling_patch(cs.sd_model(), "eps", zsnr=True), "zero-terminal-SNR"),
        (lambda: cs.model_sampling_patch(cs.sd_model(), "edm"), "EDM"),
        (lambda: cs.model_sampling_patch(cs.sd_model(), "x0"), "EDM"),
        (lambda: cs.sd_model(latent_format=cs.SD3()), "latent space"),
    ],
)
def test_models_oms_does_not_apply_to_are_left_alone(nodes, oms, build, why, caplog):
    model = applied(nodes, build(), oms)
    x, sigma0, noise = first_x(model, "euler", "normal", 4)
    torch.testing.assert_close(x, comfy_scaling(noise, sigma0, model))
    assert any(why in r.message for r in caplog.records)


def test_flow_models_are_left_alone(nodes, oms, caplog):
    model = applied(nodes, cs.model_sampling_patch(cs.sd_model(), "flow"), oms)
    noise = cs.prepare_noise(torch.zeros(1, 4, 8, 8), 1)
    guider = cs.CFGGuider(model)
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    guider.sample(noise, torch.zeros(1, 4, 8, 8), cs.sampler_object("euler"), sigmas, seed=1)
    torch.testing.assert_close(guider.calls[0][0], noise)  # CONST: sigma 1 * noise
    assert any("flow matching" in r.message for r in caplog.records)


def test_a_module_of_another_latent_family_is_left_alone(nodes, oms, caplog):
    oms.families = ("sdxl",)
    model = applied(nodes, cs.sd_model(), oms)
    x, sigma0, noise = first_x(model)
    torch.testing.assert_close(x, comfy_scaling(noise, sigma0, model))
    assert any("made for SDXL latents" in r.message for r in caplog.records)


def test_a_second_apply_replaces_the_first(nodes, oms, reference):
    once = applied(nodes, cs.sd_model(), oms, oms_prompt="pure white")
    twice = applied(nodes, once, oms)
    assert len(twice.get_wrappers(cs.WrappersMP.OUTER_SAMPLE, "one_more_step")) == 1
    x, sigma0, noise = first_x(twice)
    torch.testing.assert_close(x, expected_start(reference, noise, sigma0), rtol=1e-4, atol=1e-4)


def test_apply_leaves_its_input_model_untouched(nodes, oms):
    model = cs.sd_model()
    applied(nodes, model, oms)
    assert model.wrappers == {}


def test_fresh_noise_replaces_the_seed_noise_by_z(nodes, oms, reference):
    model = applied(nodes, cs.sd_model(), oms, noise_mode="Fresh noise")
    x, sigma0, noise = first_x(model, seed=5)
    from oms_ext.comfy.sampling import fresh_z

    x0_hat = reference.predict_x0(noise, PROMPT, CFG, NEGATIVE)
    torch.testing.assert_close(x, x0_hat + sigma0 * fresh_z(5, tuple(noise.shape)),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_the_module_is_loaded_fully_through_model_management(comfy, nodes, oms):
    model = applied(nodes, cs.sd_model(), oms)
    first_x(model)
    patchers = [m for models, _ in comfy.mm.loads for m in models]
    assert patchers == [oms.patcher] and all(full for _, full in comfy.mm.loads)
    assert isinstance(oms.patcher, cs.ModelPatcher)
    assert oms.patcher.model.unet is oms.model.unet


def test_nan_from_half_precision_is_retried_in_float32(nodes, reference):
    half = nodes.OneMoreStepLoader().load("oms_tiny", "bf16")[0]
    weight = half.model.unet.conv_out.bias
    with torch.no_grad():
        weight.fill_(float("nan"))
    x, sigma0, noise = first_x(applied(nodes, cs.sd_model(), half))
    assert half._fp32 is not None and half._fp32.dtype == torch.float32
    torch.testing.assert_close(x, expected_start(reference, noise, sigma0), rtol=1e-4, atol=1e-4)


def test_out_of_memory_skips_oms_and_the_image_is_still_made(nodes, oms, monkeypatch, caplog):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(oms.model, "predict_x0", oom)
    model = applied(nodes, cs.sd_model(), oms)
    x, sigma0, noise = first_x(model)
    torch.testing.assert_close(x, comfy_scaling(noise, sigma0, model))
    assert any("out of memory" in r.message for r in caplog.records)


def test_preview_shows_x0_hat_through_the_webui_preview_map(nodes, oms, reference):
    from oms_ext.preview import preview_images

    model = applied(nodes, cs.sd_model(), oms)
    _, _, noise = first_x(model)
    image = nodes.OneMoreStepPreview().preview(model, {"samples": torch.zeros(1, 4, 8, 8)})[0]
    want = preview_images(reference.predict_x0(noise, PROMPT, CFG, NEGATIVE), "sd1")
    assert image.shape == (1, 64, 64, 3) and image.dtype == torch.float32
    assert (image * 255).round().to(torch.uint8).sub(want.int()).abs().max() <= 1


def test_preview_without_apply_says_what_to_connect(nodes):
    with pytest.raises(ValueError, match="connect the MODEL output of One More Step Apply"):
        nodes.OneMoreStepPreview().preview(cs.sd_model(), {"samples": torch.zeros(1, 4, 8, 8)})


def test_the_oms_folder_merges_with_extra_model_paths(comfy, tmp_path):
    shared = tmp_path / "webui" / "models" / "oms"
    wi.install_tiny_module(shared, "webui_module")
    comfy.folder_paths.add_model_folder_path("oms", str(shared))  # extra_model_paths.yaml
    from oms_ext.comfy import models

    names = models.module_names()
    assert names[:2] == ["oms_tiny", "webui_module"]
    assert set(names[2:]) == {"oms_b_openclip_15_21", "oms_b_openclip_xl", "oms_b_mixclip_xl"}
    paths, exts = comfy.folder_paths.folder_names_and_paths["oms"]
    assert paths == [str(Path(comfy.folder_paths.models_dir) / "oms"), str(shared)]
    assert exts == {".safetensors"}


@pytest.mark.parametrize(
    ("name", "precision", "message"),
    [
        ("nope", "auto", "neither a known release nor in"),
        ("oms_tiny", "fp8", "precision must be one of auto, fp16, bf16, fp32"),
        ("", "auto", "choose an OMS module"),
    ],
)
def test_bad_loader_input_is_a_clear_error_on_the_node(nodes, name, precision, message):
    with pytest.raises(ValueError, match=message):
        nodes.OneMoreStepLoader().load(name, precision)


def test_without_ftfy_the_loader_says_once_how_to_install_it(nodes, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # ``import ftfy`` fails, as when absent
    nodes.OneMoreStepLoader().load("oms_tiny", "auto")
    nodes.OneMoreStepLoader().load("oms_tiny", "fp32")
    said = [r.message for r in caplog.records if "ftfy" in r.message]
    assert len(said) == 1 and "python -m pip install ftfy" in said[0]


def test_with_ftfy_the_loader_says_nothing_about_it(nodes, caplog):
    pytest.importorskip("ftfy")
    nodes.OneMoreStepLoader().load("oms_tiny", "auto")
    assert not any("ftfy" in r.message for r in caplog.records)


def test_comfyui_manager_installs_ftfy_from_the_requirements_file():
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert [line for line in lines if line and not line.startswith("#")] == ["ftfy"]


def test_a_pickle_is_refused_by_the_loader(comfy, nodes):
    (Path(comfy.folder_paths.models_dir) / "oms" / "evil.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        nodes.OneMoreStepLoader().load("evil", "auto")


def test_a_broken_module_file_is_a_clear_error(comfy, nodes):
    (Path(comfy.folder_paths.models_dir) / "oms" / "broken.safetensors").write_bytes(b"xx")
    with pytest.raises(ValueError, match="broken"):
        nodes.OneMoreStepLoader().load("broken", "auto")


def test_bad_apply_numbers_are_a_clear_error(nodes, oms):
    with pytest.raises(ValueError, match=r"cfg must lie in \[0.0, 20.0\]"):
        applied(nodes, cs.sd_model(), oms, oms_cfg=99.0)


def test_a_release_downloads_with_comfyuis_progress_bar(comfy, nodes, monkeypatch):
    from oms_ext.comfy import models

    fetched = []

    def fetch(repo_id, filename, dest_dir, endpoint):
        fetched.append(filename)
        raise OSError("offline")

    monkeypatch.setattr(models, "hub_fetch", fetch)
    with pytest.raises(ValueError, match="h1t/oms_b_openclip_15_21"):
        nodes.OneMoreStepLoader().load("oms_b_openclip_15_21", "auto")
    assert fetched == ["model_index.json"]
    bar = cs.ProgressBar.instances[-1]
    assert bar.total > len(fetched) and bar.current == 0


@pytest.fixture
def no_oms_ext():
    """``oms_ext`` neither importable from the repository root nor imported; every oms_ext
    module as it was afterwards (a fresh copy left behind would hold other class objects)."""
    ours = lambda name: name == "oms_ext" or name.startswith("oms_ext.")  # noqa: E731
    saved_path = list(sys.path)
    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    for name in saved:
        del sys.modules[name]
    yield
    for name in [k for k in sys.modules if ours(k)]:
        del sys.modules[name]
    sys.modules.update(saved)
    sys.path[:] = saved_path


def test_root_init_loads_by_path_as_comfyui_loads_custom_nodes(comfy, no_oms_ext, monkeypatch):
    # nodes.py load_custom_node: spec_from_file_location(<folder path>, <folder>/__init__.py),
    # the module put into sys.modules under that name, the folder not on sys.path.
    spec = importlib.util.spec_from_file_location(str(ROOT), ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, str(ROOT), module)
    spec.loader.exec_module(module)
    assert set(module.NODE_CLASS_MAPPINGS) == {
        "OneMoreStepLoader", "OneMoreStepApply", "OneMoreStepPreview",
    }  # fmt: skip
    assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(module.NODE_CLASS_MAPPINGS)
    assert (ROOT / module.WEB_DIRECTORY / "one_more_step.js").is_file()
    assert "oms" in comfy.folder_paths.folder_names_and_paths
    assert sys.path[-1] == str(ROOT)


def test_root_init_outside_comfyui_exports_no_nodes(no_oms_ext, monkeypatch):
    # pytest imports a root package's __init__.py while collecting; there is no ComfyUI there.
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    spec = importlib.util.spec_from_file_location("one_more_step_root", ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and "oms_ext" not in sys.modules


def test_node_inputs_follow_comfyuis_conventions(nodes):
    for cls in (nodes.OneMoreStepLoader, nodes.OneMoreStepApply, nodes.OneMoreStepPreview):
        assert cls.CATEGORY == "sampling/one_more_step" and cls.DESCRIPTION
        spec = cls.INPUT_TYPES()
        for inputs in spec.values():
            for name, (_kind, *options) in inputs.items():
                assert options and options[0].get("tooltip"), f"{cls.__name__}.{name}"
    apply = nodes.OneMoreStepApply.INPUT_TYPES()
    assert apply["required"]["oms_prompt"][1]["multiline"] is True
    assert apply["required"]["noise_mode"][0] == ["Keep seed noise", "Fresh noise"]
    assert "clip" in apply["optional"]


class FakeClip:
    """comfy/sd.py CLIP as the Apply node uses it: clone() keeps layer_idx (CLIPSetLastLayer
    sets it); encode_from_tokens gives [1, 77 * chunks, width] (a prompt of more than 75
    tokens takes 154); tokenize(return_word_ids=True) marks start/end/padding with word id 0.
    Its states: each token id's embedding, scaled by the layer it is read at."""

    def __init__(self, width: int = 32, layer_idx: int | None = None) -> None:
        self.width, self.layer_idx = width, layer_idx
        self.table = torch.randn(1000, width, generator=torch.Generator().manual_seed(0))

    def clone(self) -> FakeClip:
        n = FakeClip(self.width, self.layer_idx)
        n.table = self.table
        return n

    def tokenize(self, text: str, return_word_ids: bool = False) -> dict:
        words = text.split()
        chunks = [words[i : i + 75] for i in range(0, max(len(words), 1), 75)]
        out = []
        for chunk in chunks:
            ids = [(1, 1.0, 0)] + [(hash(w) % 997 + 2, 1.0, j + 1) for j, w in enumerate(chunk)]
            ids += [(0, 1.0, 0)] * (77 - len(ids))
            out.append(ids if return_word_ids else [t[:2] for t in ids])
        return {"h": out}

    def encode_from_tokens(self, tokens: dict) -> torch.Tensor:
        ids = torch.tensor([t[0] for chunk in tokens["h"] for t in chunk])
        scale = 1.0 if self.layer_idx is None else 0.5
        return (self.table[ids] * scale).unsqueeze(0)


def test_a_connected_clip_is_the_module_text_encoder_at_its_default_layer(nodes, oms):
    from oms_ext.comfy.clip import ClipTextEncoder
    from oms_ext.loading import OMSModel

    clip = FakeClip(layer_idx=-1)  # after a CLIPSetLastLayer
    model = applied(nodes, cs.sd_model(), oms, clip=clip)
    x, sigma0, noise = first_x(model)
    encoder = ClipTextEncoder(FakeClip())
    assert encoder.clip.layer_idx is None and clip.layer_idx == -1
    borrowed = OMSModel(
        oms.model.unet, encoder, oms.model.config, oms.path, owns_text_encoder=False
    )
    want = borrowed.predict_x0(noise, PROMPT, CFG, NEGATIVE) + sigma0 * noise
    torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-4)
    long = " ".join(f"w{i}" for i in range(100))
    assert encoder([long]).shape == (1, 77, 32) and encoder.count_tokens([long]) == [100]


def test_a_clip_of_the_wrong_width_is_a_clear_error_on_apply(nodes, oms):
    with pytest.raises(ValueError, match="gives 768-wide text states, oms_tiny reads 32-wide"):
        applied(nodes, cs.sd_model(), oms, clip=FakeClip(width=768))


def test_a_module_of_your_own_reads_the_checkpoints_clip_and_needs_it(comfy, nodes):
    """A module trained on the checkpoint's own encoder (oms_ext.train --encoder checkpoint)
    loads without any text-encoder files and reads the CLIP connected to Apply."""
    from oms_ext.comfy.clip import ClipTextEncoder
    from oms_ext.loading import OMSModel

    wi.install_own_module(Path(comfy.folder_paths.models_dir) / "oms", "mine", "sd1")
    mine = nodes.OneMoreStepLoader().load("mine", "auto")[0]
    assert mine.needs_clip and mine.families == ("sd1",)
    with pytest.raises(ValueError, match="mine reads the checkpoint's own text encoder"):
        applied(nodes, cs.sd_model(), mine)
    model = applied(nodes, cs.sd_model(), mine, clip=FakeClip())
    x, sigma0, noise = first_x(model)
    encoder = ClipTextEncoder(FakeClip())
    borrowed = OMSModel(
        mine.model.unet, encoder, mine.model.config, mine.path, owns_text_encoder=False
    )
    want = borrowed.predict_x0(noise, PROMPT, CFG, NEGATIVE) + sigma0 * noise
    torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-4)


def test_a_module_of_your_own_trained_on_an_sd2_checkpoint_applies_to_sd2_models(comfy, nodes):
    """ComfyUI gives SD2.x models SD1.x's latent format, so a module that learnt an SD2.x
    checkpoint's latents (and reads its ViT-H) must not be skipped as made for other latents."""
    from oms_ext.comfy.clip import ClipTextEncoder
    from oms_ext.loading import OMSModel

    wi.install_own_module(Path(comfy.folder_paths.models_dir) / "oms", "mine2", "sd2")
    mine = nodes.OneMoreStepLoader().load("mine2", "auto")[0]
    assert mine.families == ("sd2",)
    x, sigma0, noise = first_x(applied(nodes, cs.sd_model(), mine, clip=FakeClip()))
    encoder = ClipTextEncoder(FakeClip())
    borrowed = OMSModel(
        mine.model.unet, encoder, mine.model.config, mine.path, owns_text_encoder=False
    )
    want = borrowed.predict_x0(noise, PROMPT, CFG, NEGATIVE) + sigma0 * noise
    torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-4)
