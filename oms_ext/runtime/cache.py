"""The extension's one model cache: the OMS module (with its text encoder) in use.

At most one module is kept. It is loaded on first use and kept for the next generation; a
request with a different key (module path, device, dtype, text-encoder source) replaces it.
:meth:`ModelCache.offload` moves it to the CPU after the OMS step (low/medium VRAM or when the
setting asks); :meth:`ModelCache.get` moves it back to its device on the next use.
It also holds the downloads under way (:class:`~oms_ext.runtime.download.DownloadJobs`, which
remember recent failures, so an offline WebUI does not wait for the hub client's retries on
every generation) and the devices whose half precision gave NaN.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from oms_ext.loading import OMSModel
from oms_ext.runtime.download import DownloadJobs


def canonical_device(device: torch.device | str) -> torch.device:
    """``device`` with its index filled in, so that names of one device compare equal:
    ``"cuda"`` (A1111's ``devices.device``) is the current CUDA device (``cuda:0`` when none is
    visible), ``"mps"`` is ``mps:0``; devices without an index (cpu, meta) stay as they are."""
    dev = torch.device(device)
    if dev.index is not None or dev.type in ("cpu", "meta"):
        return dev
    index = torch.cuda.current_device() if dev.type == "cuda" and torch.cuda.is_available() else 0
    return torch.device(dev.type, index)


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether ``a`` and ``b`` name the same device (``"cuda"`` and ``"cuda:0"`` do)."""
    return canonical_device(a) == canonical_device(b)


@dataclass(frozen=True)
class CacheKey:
    """What makes two loaded modules interchangeable.

    ``path``: module folder or file; ``device``/``dtype``: where it runs (strings, e.g.
    "cuda:0", "float16"; the device as :func:`canonical_device` names it); ``text_encoder``:
    where the text encoder comes from ("module" for the files the module names, or an id of a
    borrowed checkpoint encoder); ``text_device``: where an own encoder runs ("" = beside
    the module).
    """

    path: str
    device: str
    dtype: str
    text_encoder: str
    text_device: str = ""


class ModelCache:
    """Holds the OMS model in use; thread-safe (the WebUI API may run jobs in threads).
    ``offload_device``: where :meth:`offload` puts it (the CPU)."""

    def __init__(self, offload_device: torch.device | str = "cpu") -> None:
        self.offload_device = torch.device(offload_device)
        #: Called with a model the cache lets go of, before another one loads (a host's
        #: memory manager that holds it, e.g. Forge's, unloads it there).
        self.release_listeners: list[Callable[[OMSModel], None]] = []
        self._lock = threading.Lock()
        self._key: CacheKey | None = None
        self._model: OMSModel | None = None
        self.downloads = DownloadJobs()
        self._half_precision_nan: set[torch.device] = set()

    def half_precision_works(self, device: torch.device | str) -> bool:
        """False once fp16/bf16 gave NaN on ``device`` this session (GTX 16xx cards do in
        fp16); "auto" precision then stays fp32 there."""
        return canonical_device(device) not in self._half_precision_nan

    def note_half_precision_nan(self, device: torch.device | str) -> None:
        self._half_precision_nan.add(canonical_device(device))

    @property
    def key(self) -> CacheKey | None:
        return self._key

    def get(self, key: CacheKey, load: Callable[[], OMSModel], *, place: bool = True) -> OMSModel:
        """The cached model for ``key``, loading it with ``load()`` if the cache holds another
        one (which is released first, so two never coexist). ``place``: move it wholly to
        ``key.device`` (False: a host's memory manager places it, as Forge's does). A move
        that fails half-way drops the model, so the next call loads it afresh instead of
        computing across two devices, and re-raises."""
        with self._lock:
            if self._key != key or self._model is None:
                self._release()
                model = load()
                self._key, self._model = key, model
            model = self._model
            if place and not _wholly_on(model, key.device):
                self._move_or_drop(model, key.device)
            return model

    def offload(self) -> int:
        """Move the cached model (module, own text encoder, cached text states) to
        :attr:`offload_device`; returns the bytes it took off its device (0 when empty or
        already there)."""
        with self._lock:
            model = self._model
            if model is None or _wholly_on(model, self.offload_device):
                return 0
            device = model.device
            held = _bytes_on(model, device)
            self._move_or_drop(model, self.offload_device)
            _empty_device_cache()
            return held - (_bytes_on(model, device) if self._model is model else 0)

    def drop_borrowed_from_other_checkpoint(self, checkpoint_id: str) -> bool:
        """Drop the cached model if it borrows the text encoder of a checkpoint other than
        ``checkpoint_id`` (so the old checkpoint's tower is not kept alive); returns whether
        it did."""
        with self._lock:
            source = self._key.text_encoder if self._key is not None else ""
            if source.startswith("checkpoint:") and source != f"checkpoint:{checkpoint_id}":
                self._release()
                return True
            return False

    def held_bytes(self, device: torch.device | str) -> dict[str, int]:
        """Bytes of the tensors the cache holds on ``device``, by part ("module",
        "text_encoder", "text_states"; see :meth:`OMSModel.tensors`)."""
        with self._lock:
            parts = self._model.tensors() if self._model is not None else {}
        return {part: _sum_bytes(tensors, device) for part, tensors in parts.items()}

    def _move_or_drop(self, model: OMSModel, device: torch.device | str) -> None:
        try:
            model.to(device=device)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._model is not None:
            model = self._model
            self._key, self._model = None, None
            for listener in self.release_listeners:
                listener(model)
            del model
            gc.collect()
            _empty_device_cache()


def _sum_bytes(tensors: list[torch.Tensor], device: torch.device | str) -> int:
    return sum(t.nbytes for t in tensors if same_device(t.device, device))


def _wholly_on(model: OMSModel, device: torch.device | str) -> bool:
    return all(same_device(d, device) for d in model.devices())


def _bytes_on(model: OMSModel, device: torch.device | str) -> int:
    return sum(_sum_bytes(tensors, device) for tensors in model.tensors().values())


def _empty_device_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


#: The extension's model cache (the only module-level mutable state of the WebUI glue).
MODEL_CACHE = ModelCache()
