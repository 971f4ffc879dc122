"""Fetch the files an OMS module needs from the Hugging Face Hub into the models folder.

Only the listed files are fetched (never pickles or fp32 copies). Each file is downloaded into
a temporary folder beside the target, verified, then moved into place with ``os.replace``, so
an interrupted download never leaves a truncated file where loading would find it.
Verification: the size and sha256 the hub reports (LFS files) when it reports them, else a
structural check (safetensors header, JSON parse).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from oms_ext.webui.registry import TextEncoderFiles

#: Refuse safetensors headers larger than this (a corrupt length field).
MAX_HEADER_BYTES = 100_000_000
HASH_CHUNK = 1 << 20


class DownloadError(OSError):
    """A module's files could not be fetched; the message names repo, files and folder."""


@dataclass(frozen=True)
class RemoteFile:
    """What the hub says about a file: size in bytes and sha256 (None when unknown)."""

    size: int | None
    sha256: str | None


#: ``fetch(repo_id, filename, dest_dir, endpoint) -> Path`` downloads one repo file into
#: ``dest_dir`` (keeping its relative path) and returns where it landed.
Fetch = Callable[[str, str, Path, str | None], Path]
#: ``describe(repo_id, filenames, endpoint) -> {filename: RemoteFile}``; may return {}.
Describe = Callable[[str, Sequence[str], str | None], Mapping[str, RemoteFile]]


def hub_fetch(repo_id: str, filename: str, dest_dir: Path, endpoint: str | None) -> Path:
    """Download with huggingface_hub (console progress bar) into ``dest_dir``."""
    import huggingface_hub

    kwargs = {}
    if _version_tuple(huggingface_hub.__version__) < (0, 23):
        # Older clients put symlinks into the Hugging Face cache in local_dir by default.
        kwargs["local_dir_use_symlinks"] = False
    path = huggingface_hub.hf_hub_download(
        repo_id, filename, local_dir=str(dest_dir), endpoint=endpoint or None, **kwargs
    )
    return Path(path)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def hub_describe(
    repo_id: str, filenames: Sequence[str], endpoint: str | None
) -> dict[str, RemoteFile]:
    """Sizes and LFS sha256 of ``filenames`` from the hub's metadata ({} if unavailable)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    try:
        infos = HfApi(endpoint=endpoint or None).get_paths_info(repo_id, list(filenames))
    except (HfHubHTTPError, OSError, ValueError):
        return {}
    out = {}
    for info in infos:
        lfs = getattr(info, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        if isinstance(lfs, Mapping):
            sha = lfs.get("sha256")
        out[info.path] = RemoteFile(getattr(info, "size", None), sha)
    return out


#: Where files come from when no mirror endpoint is set.
DEFAULT_ENDPOINT = "https://huggingface.co"


def repo_url(repo_id: str, endpoint: str | None = None) -> str:
    """The web address of ``repo_id`` on ``endpoint`` (a mirror) or the Hugging Face Hub."""
    return f"{(endpoint or DEFAULT_ENDPOINT).rstrip('/')}/{repo_id}"


def missing_files(folder: Path, files: Sequence[str]) -> list[str]:
    """Which of ``files`` are absent from ``folder``. An fp32 weight file stands in for its
    ``.fp16`` variant (a folder holding either one loads)."""
    missing = []
    for name in files:
        path = folder / name
        fp32 = folder / name.replace(".fp16.safetensors", ".safetensors")
        if not path.is_file() and not fp32.is_file():
            missing.append(name)
    return missing


def text_encoder_folder(models_dir: Path, spec: TextEncoderFiles) -> Path:
    """Where a text encoder repo's files go: ``<models_dir>/<owner>--<name>`` (the layout
    :func:`oms_ext.text.load_prompt_encoder` searches with ``models_dir``)."""
    return models_dir / spec.repo_id.replace("/", "--")


def check_file(path: Path, remote: RemoteFile | None) -> None:
    """Raise DownloadError unless ``path`` matches ``remote`` (size, sha256) or, when the hub
    gave no hash, unless it is structurally sound (safetensors header, JSON)."""
    size = path.stat().st_size
    if remote is not None and remote.size is not None and size != remote.size:
        raise DownloadError(f"{path.name}: {size} bytes downloaded, the hub lists {remote.size}")
    if remote is not None and remote.sha256:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
                digest.update(chunk)
        if digest.hexdigest() != remote.sha256.lower():
            raise DownloadError(f"{path.name}: sha256 differs from the hub's; download again")
        return
    if path.suffix == ".safetensors":
        _check_safetensors_header(path, size)
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DownloadError(f"{path.name}: not valid JSON ({e})") from e


def _check_safetensors_header(path: Path, size: int) -> None:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise DownloadError(f"{path.name}: truncated safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise DownloadError(f"{path.name}: truncated or corrupt safetensors header")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DownloadError(f"{path.name}: corrupt safetensors header ({e})") from e
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) != size:
        raise DownloadError(f"{path.name}: size does not match its safetensors header (truncated)")


def download_files(
    repo_id: str,
    files: Sequence[str],
    target: Path,
    *,
    endpoint: str | None = None,
    fetch: Fetch = hub_fetch,
    describe: Describe = hub_describe,
    log: Callable[[str], None] = print,
) -> Path:
    """Download the ``files`` of ``repo_id`` missing from ``target`` (created if needed).

    Returns ``target``. Raises DownloadError naming the repo, the files and the target folder
    when the hub is unreachable (offline, ``HF_HUB_OFFLINE``) or a file fails verification.
    """
    todo = missing_files(target, files)
    if not todo:
        return target
    log(f"[OMS] Downloading {', '.join(todo)} from {repo_url(repo_id, endpoint)} into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    remote = describe(repo_id, todo, endpoint)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        for name in todo:
            try:
                path = fetch(repo_id, name, staging, endpoint)
            except Exception as e:  # the hub client raises many unrelated types
                raise DownloadError(_offline_message(repo_id, todo, target, e, endpoint)) from e
            check_file(path, remote.get(name))
        for name in todo:
            dest = target / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"[OMS] Downloaded {repo_id} into {target}")
    return target


def _offline_message(
    repo_id: str, files: Sequence[str], target: Path, err: Exception, endpoint: str | None
) -> str:
    listing = "\n".join(f"  {name}" for name in files)
    return (
        f"could not download from {repo_url(repo_id, endpoint)} ({type(err).__name__}: "
        f"{err}).\nIf this machine is offline, download these files of {repo_id} by hand:\n"
        f"{listing}\nand put them, keeping their subfolders, into {target}"
    )
