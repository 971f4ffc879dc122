"""A stand-in for the Hugging Face Hub as ``oms_ext.runtime.download`` sees it (its ``fetch`` and
``describe`` hooks): it serves the tiny test module in the released layout, and SD 2.1's text
encoder files as the tiny module's own encoder, so downloads can be tested offline."""

from __future__ import annotations

import hashlib
import json

from oms_ext.runtime.download import RemoteFile
from tests.webui_standins import TINY_MODULE as TINY


def _pointer(cls: str, subfolder: str) -> bytes:
    """A released module's pointer file naming SD 2.1's hub repo (as the real ones do)."""
    data = {
        "_class_name": cls,
        "_name_or_path": "stabilityai/stable-diffusion-2-1",
        "subfolder": subfolder,
    }
    return json.dumps(data).encode()


#: What the fake hub serves: the tiny fixture in the released layout (weights as .fp16).
HUB_SOURCE = {
    "model_index.json": TINY / "model_index.json",
    "oms_module/config.json": TINY / "oms_module" / "config.json",
    "oms_module/diffusion_pytorch_model.fp16.safetensors": TINY
    / "oms_module"
    / "diffusion_pytorch_model.safetensors",
    "oms_text_encoder/config.json": _pointer("CLIPTextModel", "text_encoder"),
    "oms_tokenizer/config.json": _pointer("CLIPTokenizer", "tokenizer"),
    "text_encoder/config.json": TINY / "text_encoder" / "config.json",
    "text_encoder/model.fp16.safetensors": TINY / "text_encoder" / "model.safetensors",
    **{f"tokenizer/{p.name}": p for p in (TINY / "tokenizer").iterdir()},
}


def _served(name: str) -> bytes:
    source = HUB_SOURCE[name]
    return source if isinstance(source, bytes) else source.read_bytes()


class FakeHub:
    """Serves fixture files like huggingface_hub; ``broken`` files arrive truncated."""

    def __init__(self, broken: tuple[str, ...] = (), offline: bool = False):
        self.broken = broken
        self.offline = offline
        self.fetched: list[str] = []

    def fetch(self, repo_id, filename, dest_dir, endpoint):
        if self.offline:
            raise OSError("offline mode is enabled")
        self.fetched.append(filename)
        dest = dest_dir / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = _served(filename)
        dest.write_bytes(data[: len(data) // 2] if filename in self.broken else data)
        return dest

    def describe(self, repo_id, filenames, endpoint):
        out = {}
        for name in filenames:
            data = _served(name)
            out[name] = RemoteFile(len(data), hashlib.sha256(data).hexdigest())
        return out
