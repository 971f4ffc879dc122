"""What the WebUI script's callbacks do, with every WebUI object passed in.

``scripts/one_more_step.py`` builds one :class:`Host` from the WebUI's modules and forwards
its callbacks to an :class:`OMSController`; tests drive the same controller with stand-ins.
Per-run state lives on ``p`` (``p.oms_args``, ``p.oms_last_batch``), never on the script.

Callback order (A1111 1.6-1.10, Forge): ``process(p, *args)`` once per run; per batch
``process_batch`` then ``p.sample()``, which calls ``process_before_every_sampling`` (A1111
>= 1.10, Forge) or draws ``p.rng.next()`` (hooked on A1111 < 1.10); ``postprocess_batch``;
``postprocess(p, processed)`` once at the end, with the run's images.

When OMS does not run, the user sees why where they look: "OMS skipped: <reason>" in the
infotext and, through the WebUI's own ``p.comment``, one line under the result.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from oms_ext.errors import OMSUserError
from oms_ext.loading import OMSModel
from oms_ext.preview import FAMILIES as PREVIEW_FAMILIES
from oms_ext.prompt_syntax import PlainSyntax, PromptSyntax
from oms_ext.runtime.args import (
    ALPHA_BAR_KEY,
    AUTO_MODULE,
    ENABLED_KEY,
    FIELD_BY_ATTR,
    FIELDS,
    INFOTEXT_FIELDS,
    NOTE_KEY,
    SKIPPED_KEY,
    VERSION_KEY,
    OMSArgs,
    OMSArgsError,
)
from oms_ext.runtime.cache import MODEL_CACHE, ModelCache
from oms_ext.runtime.download import console
from oms_ext.runtime.provider import ModelRequest, provide_model
from oms_ext.runtime.registry import ResolvedModule, module_name, own_module, resolve_module
from oms_ext.runtime.runner import Outcome, run_oms, skipped
from oms_ext.spaces import UnsupportedModelError
from oms_ext.text import TextEncoderError
from oms_ext.webui import a1111, forge
from oms_ext.webui.settings import (
    Settings,
    compute_device,
    compute_dtype,
    cpu_text_dtype,
    frees_gpu_after_each_generation,
    frees_gpu_after_its_step,
    models_folders,
    text_encoder_device,
)

_OMS_INFOTEXT_KEYS = (
    ENABLED_KEY,
    VERSION_KEY,
    ALPHA_BAR_KEY,
    SKIPPED_KEY,
    NOTE_KEY,
    *(f.label for f in INFOTEXT_FIELDS),
)


@dataclass
class Host:
    """The WebUI's services as plain values.

    ``kind``: "a1111" or "forge". ``opts``/``cmd_opts``: ``shared.opts``/``shared.cmd_opts``.
    ``device``: the WebUI's compute device. ``models_dir``: the WebUI's models folder;
    ``extension_dir``: this extension's folder. ``before_every_sampling``: whether the WebUI
    calls ``process_before_every_sampling`` (A1111 >= 1.10, Forge). ``log``: console output.
    ``webui_dtype``: the precision the WebUI runs its own models in on a device (None: fp16
    on GPUs). ``prompt_syntax``: the WebUI's prompt parser (:class:`a1111.WebUIPromptSyntax`);
    this package's own implementation of its rules when absent. ``precision_scope``: where
    the OMS step runs inside the WebUI's sampling, so that no cast of the WebUI's overrides
    the precision OMS chose (:func:`a1111.own_precision`).
    """

    kind: str
    opts: Any
    cmd_opts: Any
    device: torch.device | str
    models_dir: Path
    extension_dir: Path
    before_every_sampling: bool
    log: Callable[[str], None] = console
    cache: ModelCache = MODEL_CACHE
    forge_memory: forge.ForgeMemory | None = field(default=None)
    webui_dtype: Callable[[torch.device], torch.dtype] | None = None
    prompt_syntax: PromptSyntax = field(default_factory=PlainSyntax)
    precision_scope: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext


class OMSController:
    """Turns the script's callbacks into OMS steps on the host WebUI."""

    def __init__(self, host: Host) -> None:
        if host.kind not in ("a1111", "forge"):
            raise ValueError(f"Host.kind must be 'a1111' or 'forge', got {host.kind!r}")
        self.host = host
        self.adapter = forge if host.kind == "forge" else a1111
        memory = host.forge_memory
        if memory is not None and memory.drop not in host.cache.release_listeners:
            host.cache.release_listeners.append(memory.drop)

    # --- callbacks ---------------------------------------------------------------------

    def process(self, p: Any, values: Sequence[Any]) -> OMSArgs:
        """Read the script args (positional UI order or one dict) plus XYZ overrides
        (``p.oms_<field>``) into ``p.oms_args``. Invalid args (an API call with cfg 99, say)
        turn OMS off for this run and say why in the console and the infotext.

        OMS keys an earlier run left in ``p.extra_generation_params`` are dropped first: the
        XYZ grid runs each cell on a shallow copy of one ``p``, so the cells share that dict,
        and a cell with OMS off must not carry the keys of the cell before it."""
        _record(p, {})
        try:
            args = OMSArgs.from_values(list(values))
            overrides = {
                f.attr: getattr(p, f"oms_{f.attr}")
                for f in FIELDS
                if hasattr(p, f"oms_{f.attr}")
            }
            args = args.with_overrides(overrides) if overrides else args
        except OMSArgsError as e:
            reason = f"invalid OMS settings: {e}"
            self.host.log(f"[OMS] One More Step skipped: {reason}")
            _record(p, {SKIPPED_KEY: reason})
            _comment(p, reason)
            args = OMSArgs()
        p.oms_args = args
        p.oms_last_batch = None
        p.oms_previews = []
        p.oms_release_after_generation = False
        if not args.enabled:
            self.release_gpu("OMS is off")  # VRAM is the user's: nothing of OMS stays there
        return args

    def process_without_oms(self, p: Any, why: str) -> None:
        """A generation OMS takes no part in (img2img): nothing of OMS stays on the GPU."""
        p.oms_args = OMSArgs()
        self.release_gpu(why)

    def release_gpu(self, why: str) -> None:
        """Take the OMS model off the GPU: through Forge's memory manager on Forge, to the
        CPU on A1111 (reloading it from there is quick); says so in the console when it held
        anything. ``why``: the occasion, for that line."""
        unloaded = self.host.forge_memory is not None and self.host.forge_memory.release()
        freed = self.host.cache.offload()
        if unloaded:
            self.host.log(f"[OMS] {why}: Forge's memory manager unloaded the OMS module")
        elif freed:
            self.host.log(f"[OMS] {why}: moved the OMS module off the GPU ({freed / 2**20:.0f} MB)")

    def on_model_loaded(self, sd_model: Any) -> None:
        """The WebUI loaded a checkpoint: OMS leaves the GPU, and a model borrowing the text
        encoder of the previous checkpoint is dropped (its tower is never kept alive)."""
        if self.host.cache.drop_borrowed_from_other_checkpoint(_checkpoint_id(sd_model)):
            self.host.log("[OMS] checkpoint changed: dropped the OMS model borrowing its encoder")
        self.release_gpu("checkpoint changed")

    def process_batch(self, p: Any) -> None:
        """On WebUIs without ``process_before_every_sampling`` (A1111 < 1.10): wrap the first
        draw of this batch's ``p.rng`` so it returns the OMS noise."""
        if self.host.before_every_sampling or not self._enabled(p):
            return
        rng = getattr(p, "rng", None)
        if rng is None:
            self.host.log("[OMS] this WebUI has no p.rng (older than 1.6?); OMS not applied")
            return
        a1111.hook_first_noise(rng, lambda x: self._noise_from_first_draw(p, x))

    def before_every_sampling(self, p: Any, x: torch.Tensor) -> None:
        """A1111 >= 1.10 and Forge: replace the batch's noise ``x`` right before sampling."""
        if not self.host.before_every_sampling or not self._enabled(p):
            return
        outcome = self._run_guarded(p, x)
        if outcome.noise is None:
            return
        if self.host.kind == "forge":
            forge.apply_noise(p, outcome.noise, like=x)
        else:
            a1111.apply_in_place(x, outcome.noise)

    def postprocess_batch(self, p: Any) -> None:
        """Remove a hook that was never triggered (e.g. an interrupted batch)."""
        rng = getattr(p, "rng", None)
        if rng is not None:
            a1111.unhook_first_noise(rng)

    def postprocess(self, p: Any, processed: Any) -> None:
        """"Show OMS preview": after the run's images, one picture per image of what OMS
        predicted (x0_hat through the cheap latent-to-RGB map, at the image size), its
        infotext saying so, with brightness and main colour, in a first line above the info
        text of the image it belongs to: the WebUI's Save button reads the seed and prompt
        from it (``modules/ui_common.py`` ``save_files``), and the saved file's name and
        PNG info say it is a preview. Added after saving, so never written to disk unless the
        user saves it; the API returns them as it returns every image of the run.
        With "free after each generation", OMS leaves the GPU here, once per generation."""
        if getattr(p, "oms_release_after_generation", False):
            p.oms_release_after_generation = False
            self.release_gpu("generation done")
        previews = getattr(p, "oms_previews", None)
        if not previews:
            return
        from PIL import Image

        from oms_ext.preview import preview_images, summarize_latent

        size = (int(p.height), int(p.width))
        offset = int(getattr(processed, "index_of_first_image", 0))  # 1 after a grid
        infotexts = list(processed.infotexts)
        for image, latent, family in previews:
            picture = preview_images(latent, family, size=size)
            summary = summarize_latent(latent, family)[0]
            source = infotexts[offset + image] if offset + image < len(infotexts) else ""
            processed.images.append(Image.fromarray(picture.numpy()))
            processed.infotexts.append(
                f"One More Step preview of image {image + 1} (what OMS predicted, not an image "
                f"the WebUI made): {summary.text()}\n{source}".strip()
            )

    # --- internals ---------------------------------------------------------------------

    @staticmethod
    def _enabled(p: Any) -> bool:
        args = getattr(p, "oms_args", None)
        return args is not None and args.enabled

    def _noise_from_first_draw(self, p: Any, x: torch.Tensor) -> torch.Tensor:
        outcome = self._run_guarded(p, x)
        if getattr(p, "enable_hr", False):
            # Before 1.10 the hires pass has no hook to note itself: say it here, once.
            _record(p, {NOTE_KEY: a1111.HIRES_NOTE}, replace=False)
        return x if outcome.noise is None else outcome.noise

    def _run_guarded(self, p: Any, x: torch.Tensor) -> Outcome:
        """:meth:`_run`, where any unexpected failure (a bug: the user's mistakes are
        :class:`OMSUserError` and handled in :func:`run_oms`) leaves the noise alone, prints its
        traceback and says "OMS skipped: internal error (<type>) ..." in the infotext, without
        the message, which may hold local paths: the image is always sampled (from the seed's
        noise), whatever breaks inside OMS."""
        try:
            return self._run(p, x)
        except Exception as e:
            reason = (
                f"internal error ({type(e).__name__}); please report it with the traceback "
                "from the console"
            )
            outcome = skipped(p.oms_args, reason)
            self.host.log(f"{outcome.message}\n{traceback.format_exc()}")
            _record(p, outcome.infotext)
            _comment(p, reason)
            return outcome

    def _run(self, p: Any, x: torch.Tensor) -> Outcome:
        batch = getattr(p, "iteration", 0)
        first_pass = not getattr(p, "is_hr_pass", False)
        if first_pass and getattr(p, "oms_last_batch", None) == batch:
            return Outcome(None)  # already applied to this batch: OMS runs once per batch
        sd_model = p.sd_model
        try:
            inputs = self.adapter.batch_inputs(
                p, x, self.host.opts, sd_model, self.host.prompt_syntax
            )
        except UnsupportedModelError as e:
            outcome = skipped(p.oms_args, e.reason)
            _record(p, outcome.infotext)
            _comment(p, e.reason)
            self.host.log(outcome.message)
            return outcome
        settings = Settings.from_opts(self.host.opts)
        loaded = False
        picked = ""  # the module's name, for "Auto"

        def load(fp32: bool) -> OMSModel:
            nonlocal loaded, picked
            loaded = True  # (no reference kept: a model the cache drops must leave memory)
            model = self.provide(p.oms_args, inputs.family, settings, sd_model, fp32=fp32)
            picked = module_name(model.source)
            return model

        with self.host.precision_scope():
            outcome = run_oms(inputs, p.oms_args, load)
        if first_pass:
            p.oms_last_batch = batch
        # On Forge "auto" leaves it to the memory manager, which frees models as needed.
        a1111_low_vram = self.host.kind == "a1111" and self._a1111_low_vram(inputs.family)
        if loaded and frees_gpu_after_its_step(settings, a1111_low_vram):
            self.release_gpu("after its step")
        elif loaded and frees_gpu_after_each_generation(settings):
            p.oms_release_after_generation = True  # in postprocess, after the last batch
        infotext = outcome.infotext
        if outcome.applied and p.oms_args.module == AUTO_MODULE:
            # Name the module "Auto" picked, so pasting the infotext reproduces the image
            # even on a checkpoint of another family.
            infotext = {**infotext, FIELD_BY_ATTR["module"].label: picked}
        _record(p, infotext, replace=first_pass)
        if SKIPPED_KEY in infotext:
            _comment(p, infotext[SKIPPED_KEY])
        if outcome.x0_hat is not None and p.oms_args.preview and first_pass:
            family = inputs.family if inputs.family in PREVIEW_FAMILIES else "sd1"
            first = batch * len(outcome.x0_hat)  # the run's index of the batch's first image
            p.oms_previews.extend(
                (first + row, latent, family) for row, latent in enumerate(outcome.x0_hat)
            )
        if outcome.message:
            self.host.log(outcome.message)
        return outcome

    def provide(
        self, args: OMSArgs, family: str, settings: Settings, sd_model: Any, *, fp32: bool = False
    ) -> OMSModel:
        """The OMS model for this generation, ready on its device: read to the CPU and moved
        by Forge's memory manager on Forge (which makes room first), placed by the cache on
        A1111. ``fp32``: the retry after half precision gave NaN."""
        request = self._request(args, family, settings, sd_model)
        if fp32:
            self.host.cache.note_half_precision_nan(request.device)
            request = replace(request, dtype=torch.float32)
        model = provide_model(request, self.host.cache)
        if request.managed and self.host.forge_memory is not None:
            self.host.forge_memory.load(model)
        return model

    def _request(
        self, args: OMSArgs, family: str, settings: Settings, sd_model: Any
    ) -> ModelRequest:
        device = compute_device(settings, self.host.device)
        webui_dtype = self.host.webui_dtype(device) if self.host.webui_dtype else None
        half_works = self.host.cache.half_precision_works(device)
        dtype = compute_dtype(settings, device, webui_dtype, half_works=half_works)
        if self.host.kind == "forge":  # "auto": where Forge runs its own text encoders
            saves_vram = forge.keeps_text_encoders_off_its_device()
        else:
            saves_vram = self._a1111_low_vram(family)
        text_device = text_encoder_device(settings, saves_vram)
        # beside a module on the CPU it shares its precision; away from a GPU module, its own
        text_dtype = dtype if device.type == "cpu" else cpu_text_dtype(settings)
        folders = models_folders(settings, self.host.models_dir, self.host.extension_dir)
        try:  # once per generation; a choice that does not resolve is provide_model's to report
            resolved = resolve_module(args.module, family, folders)
        except OMSUserError:
            resolved = None
        factory, borrowed_id = self._borrowed_encoder(settings, family, sd_model, resolved)
        return ModelRequest(
            choice=args.module,
            family=family,
            folders=tuple(folders),
            device=device,
            dtype=dtype,
            text_device=text_device,
            text_dtype=None if text_device is None else text_dtype,
            allow_download=settings.allow_download,
            endpoint=settings.hf_endpoint.strip() or None,
            borrowed_encoder=factory,
            borrowed_id=borrowed_id,
            # Forge's memory manager places the model; "OMS runs on: cpu" never touches VRAM
            managed=self.host.forge_memory is not None and settings.device != "cpu",
            resolved=resolved,
        )

    def _borrowed_encoder(
        self,
        settings: Settings,
        family: str,
        sd_model: Any,
        resolved: ResolvedModule | None = None,
    ) -> tuple[Callable[[], Any] | None, str]:
        """The checkpoint's own text encoder to lend the module, if it takes one: a module of
        the user's own trained on it (``python -m oms_ext.train --encoder checkpoint``) always
        reads it; the releases read an SD2.x checkpoint's OpenCLIP encoder (no second copy in
        memory) when the setting allows."""
        checkpoint_id = _checkpoint_id(sd_model)
        own = _reads_checkpoint_encoder(resolved)
        if own:
            if self.host.kind == "forge":
                encoder = forge.checkpoint_text_encoder(sd_model, family)
            else:
                encoder = a1111.checkpoint_text_encoder(sd_model, family, self.host.device)
            if encoder is None:
                raise TextEncoderError(
                    f"OMS module {own} reads the checkpoint's own text encoder, which this "
                    f"{family} checkpoint does not expose as OMS expects",
                    reason=f"module {own} reads the checkpoint's own text encoder, which this "
                    "checkpoint does not expose as expected; choose another module",
                )
            return (lambda: encoder), checkpoint_id
        if not settings.reuse_sd2_text_encoder or family != "sd2":
            return None, ""
        if self.host.kind == "forge":
            encoder = forge.sd2_text_encoder(sd_model)
            return (None, "") if encoder is None else ((lambda: encoder), checkpoint_id)
        tower = a1111.sd2_text_tower(sd_model)
        if tower is None:
            return None, ""
        from oms_ext.openclip_convert import wrap_openclip_tower

        # Token ids go where A1111 sends its own (devices.device): under --medvram/--lowvram
        # its hooks move the tower there only when the embedding is called.
        device = torch.device(self.host.device)
        return (lambda: wrap_openclip_tower(tower, compute_device=lambda: device)), checkpoint_id

    def _a1111_low_vram(self, family: str) -> bool:
        return a1111.low_vram(self.host.cmd_opts, family)


def _reads_checkpoint_encoder(resolved: ResolvedModule | None) -> str | None:
    """The name of ``resolved`` when it is one of the user's own modules that reads the
    checkpoint's own text encoder (``python -m oms_ext.train --encoder checkpoint``), else
    None."""
    if resolved is None or not resolved.present or resolved.known is not None:
        return None
    own = own_module(resolved.path)
    return resolved.name if own is not None and own.borrows_encoder else None


def _checkpoint_id(sd_model: Any) -> str:
    """Names the loaded checkpoint (its hash, else its file, else the object)."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return str(getattr(info, "hash", None) or getattr(info, "filename", None) or id(sd_model))


def _comment(p: Any, reason: str) -> None:
    """One line under the result through the WebUI's own comments (``p.comment``, A1111
    1.6+ and Forge: shown below the images, as the WebUI shows its own warnings)."""
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(f"One More Step skipped: {reason}")


def _record(p: Any, infotext: dict[str, Any], *, replace: bool = True) -> None:
    """Write OMS infotext entries; ``replace`` first drops the previous batch's (first pass),
    otherwise they are added to the first pass's (hires-pass note; notes are joined)."""
    params = p.extra_generation_params
    if replace:
        for key in _OMS_INFOTEXT_KEYS:
            params.pop(key, None)
    note = params.get(NOTE_KEY)
    params.update(infotext)
    if note and NOTE_KEY in infotext and note != infotext[NOTE_KEY]:
        params[NOTE_KEY] = f"{note}; {infotext[NOTE_KEY]}"
