"""A check's node, registered only when ``OMS_COMFY_RECORD_DIR`` names a folder: records the
x and sigma of a MODEL's first model call (ComfyUI's APPLY_MODEL wrapper, comfy/model_base.py
``BaseModel.apply_model``) into ``<folder>/<label>.safetensors`` and, if asked, stops the
prompt there (``InterruptProcessingException``), so tools/comfy_check.py can compare the
sampler's real start with an independent recomputation. Users never see it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

ENV = "OMS_COMFY_RECORD_DIR"
RECORD_KEY = "one_more_step_record"


class FirstCallRecorder:
    """APPLY_MODEL wrapper: saves ``x`` [B, C, h, w] and ``sigma`` [B] of the first call."""

    def __init__(self, path: Path, stop: bool) -> None:
        self.path = path
        self.stop = stop
        self.done = False

    def __call__(self, executor: Any, x: torch.Tensor, t: torch.Tensor, *args: Any, **kw: Any):
        if not self.done:
            self.done = True
            _save_atomic(self.path, {"x": x.float().cpu(), "sigma": t.float().cpu()})
            if self.stop:
                import comfy.model_management

                raise comfy.model_management.InterruptProcessingException()
        return executor(x, t, *args, **kw)


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


class OneMoreStepRecordFirstCall:
    CATEGORY = "sampling/one_more_step/debug"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "record"
    DESCRIPTION = "Check tool only: records the first model call's x and sigma."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL",),
                "label": ("STRING", {"default": "run"}),
                "stop": ("BOOLEAN", {"default": True}),
            }
        }

    def record(self, model: Any, label: str, stop: bool) -> tuple[Any]:
        import comfy.patcher_extension

        kind = comfy.patcher_extension.WrappersMP.APPLY_MODEL
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        patched = model.clone()
        patched.remove_wrappers_with_key(kind, RECORD_KEY)
        recorder = FirstCallRecorder(Path(os.environ[ENV]) / f"{name}.safetensors", stop)
        patched.add_wrapper_with_key(kind, RECORD_KEY, recorder)
        return (patched,)

    @classmethod
    def IS_CHANGED(cls, model: Any, label: str, stop: bool) -> float:
        return float("nan")  # record on every prompt, never from ComfyUI's cache


def record_nodes() -> dict[str, type]:
    """The recorder node when :data:`ENV` is set, else nothing."""
    return {"OneMoreStepRecordFirstCall": OneMoreStepRecordFirstCall} if os.environ.get(ENV) else {}
