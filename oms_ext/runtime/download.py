"""Fetch the files an OMS module needs from the Hugging Face Hub into the models folder.

Only the listed files are fetched (never pickles or fp32 copies). Each file is downloaded into
a hidden staging folder beside the target (``.<name>.partial-resume``, never listed as a
module), verified, then moved into place with ``os.replace``, so an interrupted download never
leaves a truncated file where loading would find it. The staging folder outlives a download
that the network interrupted, so the next one resumes where it stopped (the hub client
continues its ``.incomplete`` files there) instead of fetching 681 MB-5 GB again; it is removed
once the files are in place, or when a file fails verification. Verification: the size and
sha256 the hub reports (LFS files) when it reports them, else a structural check (safetensors
header, JSON).

:class:`DownloadJobs` runs downloads in the background, one per target, so the generation that
asked for a missing module goes on without it and a second request does not fetch it again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from oms_ext.errors import OMSUserError
from oms_ext.runtime.registry import TextEncoderFiles

#: Refuse safetensors headers larger than this (a corrupt length field).
MAX_HEADER_BYTES = 100_000_000
HASH_CHUNK = 1 << 20
#: Prefix of the hidden staging folders (``.<target name><STAGING_MARK>resume``).
STAGING_MARK = ".partial-"


class DownloadError(OMSUserError, OSError):
    """A module's files could not be fetched; the message names repo, files and folder,
    ``reason`` says what happened in a few words."""


class DownloadPending(OMSUserError):
    """The module is being downloaded in the background; OMS applies once it is there."""


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
        # Older clients put symlinks into the Hugging Face cache in local_dir by default, and
        # resume an interrupted download only when asked (newer ones always do).
        kwargs["local_dir_use_symlinks"] = False
        kwargs["resume_download"] = True
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
    """Sizes and LFS sha256 of ``filenames`` from the hub's metadata; {} when the hub cannot
    say (offline, or a client older than ``get_paths_info``, as in A1111 1.6's venv): then the
    files are checked structurally after download."""
    from huggingface_hub import HfApi

    try:
        infos = HfApi(endpoint=endpoint or None).get_paths_info(repo_id, list(filenames))
    except Exception:  # any client version, any network failure: verification falls back
        return {}
    out = {}
    for info in infos:
        lfs = getattr(info, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        if isinstance(lfs, Mapping):
            sha = lfs.get("sha256")
        out[info.path] = RemoteFile(getattr(info, "size", None), sha)
    return out


def console(line: str) -> None:
    """Print one console line in a single write, so that lines from a download thread and a
    generation never run together (``print`` writes the text and its newline separately)."""
    print(f"{line}\n", end="", flush=True)


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


REASON_BAD_FILE = "a downloaded file was incomplete or corrupt and was discarded; try again later"


def check_file(path: Path, remote: RemoteFile | None) -> None:
    """Raise DownloadError unless ``path`` matches ``remote`` (size, sha256) or, when the hub
    gave no hash, unless it is structurally sound (safetensors header, JSON)."""
    size = path.stat().st_size
    if remote is not None and remote.size is not None and size != remote.size:
        raise DownloadError(
            f"{path.name}: {size} bytes downloaded, the hub lists {remote.size}",
            reason=REASON_BAD_FILE,
        )
    if remote is not None and remote.sha256:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
                digest.update(chunk)
        if digest.hexdigest() != remote.sha256.lower():
            raise DownloadError(
                f"{path.name}: sha256 differs from the hub's; download again",
                reason=REASON_BAD_FILE,
            )
        return
    if path.suffix == ".safetensors":
        _check_safetensors_header(path, size)
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DownloadError(f"{path.name}: not valid JSON ({e})", reason=REASON_BAD_FILE) from e


def _check_safetensors_header(path: Path, size: int) -> None:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise DownloadError(
                f"{path.name}: truncated safetensors file ({size} bytes)", reason=REASON_BAD_FILE
            )
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise DownloadError(
                f"{path.name}: truncated or corrupt safetensors header", reason=REASON_BAD_FILE
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DownloadError(
                f"{path.name}: corrupt safetensors header ({e})", reason=REASON_BAD_FILE
            ) from e
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) != size:
        raise DownloadError(
            f"{path.name}: size does not match its safetensors header (truncated)",
            reason=REASON_BAD_FILE,
        )


def staging_folder(target: Path) -> Path:
    """Where the files of ``target`` are downloaded to before they are verified and moved in;
    the same for every attempt, so an interrupted download resumes there."""
    return target.parent / f".{target.name}{STAGING_MARK}resume"


def remove_stale_staging(target: Path) -> None:
    """Delete staging folders of ``target`` no download can resume (earlier releases named
    them at random); the resumable one stays."""
    try:
        leftovers = list(target.parent.glob(f".{target.name}{STAGING_MARK}*"))
    except OSError:
        return
    for folder in leftovers:
        if folder != staging_folder(target):
            shutil.rmtree(folder, ignore_errors=True)


def _folder_error(err: OSError, repo_id: str, target: Path) -> DownloadError:
    """A DownloadError for a failure to write into the models folder."""
    if err.errno == errno.ENOSPC:
        return DownloadError(
            f"the disk holding {target.parent} is full ({err}); free some space and try again",
            reason=f"the disk of the models folder is full; free space to download {repo_id}",
        )
    return DownloadError(
        f"cannot write {repo_id} into {target} ({type(err).__name__}: {err})",
        reason="cannot write into the OMS models folder; check its permissions or pick another "
        "folder in Settings",
    )


def _check_free_space(remote: Mapping[str, RemoteFile], repo_id: str, target: Path) -> None:
    need = sum(r.size or 0 for r in remote.values())
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        return
    if need > free:
        raise DownloadError(
            f"{repo_id} needs {need / 1e6:.0f} MB, the disk holding {target.parent} has "
            f"{free / 1e6:.0f} MB free",
            reason=f"not enough disk space for {repo_id} ({need / 1e6:.0f} MB needed, "
            f"{free / 1e6:.0f} MB free)",
        )


def download_files(
    repo_id: str,
    files: Sequence[str],
    target: Path,
    *,
    endpoint: str | None = None,
    fetch: Fetch = hub_fetch,
    describe: Describe = hub_describe,
    log: Callable[[str], None] = console,
    progress_every_s: float | None = None,
) -> Path:
    """Download the ``files`` of ``repo_id`` missing from ``target`` (created if needed).

    Returns ``target``. Raises DownloadError, whatever the hub client raised, naming the
    repo, the files and the target folder when the hub is unreachable (offline,
    ``HF_HUB_OFFLINE``), a file fails verification, or the folder cannot be written (a full
    disk says so). Progress: the hub client draws its bar (size, speed) on a terminal; when
    the console is not one (a WebUI started by a launcher, output to a log), it hides it, so
    then a line with the bytes so far, the total and the speed is logged every
    ``progress_every_s`` seconds (default :data:`PROGRESS_EVERY_S`; 0 = never).
    """
    todo = missing_files(target, files)
    if not todo:
        return target
    # The hub client joins "<endpoint>/<repo>": a mirror typed with a trailing slash gave "//".
    endpoint = (endpoint.strip().rstrip("/") or None) if endpoint else None
    log(f"[OMS] Downloading {', '.join(todo)} from {repo_url(repo_id, endpoint)} into {target}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        remote = describe(repo_id, todo, endpoint)
        _check_free_space(remote, repo_id, target)
        staging = staging_folder(target)
        staging.mkdir(exist_ok=True)
    except OSError as e:
        raise e if isinstance(e, DownloadError) else _folder_error(e, repo_id, target) from e
    every = PROGRESS_EVERY_S if progress_every_s is None else progress_every_s
    watch = _ProgressLog(repo_id, staging, remote, log, every)
    resumable = False
    try:
        for name in todo:
            try:
                path = fetch(repo_id, name, staging, endpoint)
            except Exception as e:  # the hub client raises many unrelated types
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    raise _folder_error(e, repo_id, target) from e
                resumable = True  # the network stopped it: keep what arrived
                raise DownloadError(
                    _offline_message(repo_id, todo, target, e, endpoint),
                    reason=f"could not download {repo_id} (offline?); the console says which "
                    "files to get and where to put them",
                ) from e
            check_file(path, remote.get(name))
        for name in todo:
            dest = target / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, dest)
    except OSError as e:
        raise e if isinstance(e, DownloadError) else _folder_error(e, repo_id, target) from e
    finally:
        watch.stop()
        if not resumable:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"[OMS] Downloaded {repo_id} into {target}")
    return target


#: Seconds between progress lines when the console is no terminal.
PROGRESS_EVERY_S = 10.0


class _ProgressLog:
    """Logs "Downloading <repo>: <done> of <total> MB (<speed> MB/s)" every ``every_s``
    seconds from the bytes in the staging folder, unless stderr is a terminal (the hub
    client's own bar shows there) or ``every_s`` is 0."""

    def __init__(
        self,
        repo_id: str,
        staging: Path,
        remote: Mapping[str, RemoteFile],
        log: Callable[[str], None],
        every_s: float,
    ) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if every_s <= 0 or sys.stderr.isatty():
            return
        total = sum(r.size or 0 for r in remote.values())

        def run() -> None:
            started = time.monotonic()
            while not self._stop.wait(every_s):
                done = _folder_bytes(staging)
                speed = done / max(time.monotonic() - started, 1e-6)
                of = f" of {total / 1e6:.0f}" if total else ""
                log(
                    f"[OMS] Downloading {repo_id}: {done / 1e6:.0f}{of} MB "
                    f"({speed / 1e6:.1f} MB/s)"
                )

        self._thread = threading.Thread(target=run, name=f"OMS progress {repo_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def _offline_message(
    repo_id: str, files: Sequence[str], target: Path, err: Exception, endpoint: str | None
) -> str:
    listing = "\n".join(f"  {name}" for name in files)
    return (
        f"could not download from {repo_url(repo_id, endpoint)} ({type(err).__name__}: "
        f"{err}).\nIf this machine is offline, download these files of {repo_id} by hand:\n"
        f"{listing}\nand put them, keeping their subfolders, into {target}"
    )


class DownloadJobs:
    """Downloads running in background threads, at most one per key (a target folder), and
    the failures of recent ones.

    A failed download is not tried again for :attr:`RETRY_AFTER_S` seconds: offline, the hub
    client's own retries take about 20 s, which every generation would pay. Thread-safe.
    """

    #: Seconds during which a failed download of the same key is not tried again.
    RETRY_AFTER_S = 300.0

    def __init__(self, log: Callable[[str], None] = console) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}
        self._failed: dict[str, tuple[float, DownloadError]] = {}

    def running(self, key: str) -> bool:
        with self._lock:
            return key in self._running

    def recent_failure(self, key: str) -> DownloadError | None:
        """The error of a download of ``key`` that failed less than :attr:`RETRY_AFTER_S`
        seconds ago, else None."""
        with self._lock:
            failed = self._failed.get(key)
        if failed is None or time.monotonic() - failed[0] >= self.RETRY_AFTER_S:
            return None
        return failed[1]

    def start(self, key: str, work: Callable[[], object]) -> bool:
        """Run ``work()`` in a daemon thread unless a download of ``key`` is running; returns
        whether it started one. A DownloadError it raises is remembered (see
        :meth:`recent_failure`); anything else is a bug and is printed with its traceback."""
        with self._lock:
            if key in self._running:
                return False
            thread = threading.Thread(
                target=self._run, args=(key, work), name=f"OMS download {key}", daemon=True
            )
            self._running[key] = thread
            self._failed.pop(key, None)
        thread.start()
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Block until the downloads running now have ended (for callers that would rather
        wait, such as scripts and tests), at most ``timeout`` seconds for each."""
        with self._lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(timeout)

    def _run(self, key: str, work: Callable[[], object]) -> None:
        try:
            work()
        except DownloadError as e:
            with self._lock:
                self._failed[key] = (time.monotonic(), e)
            self._log(f"[OMS] Download failed: {e}")
        except Exception as e:
            self._log(f"[OMS] Download failed (internal error):\n{traceback.format_exc()}")
            error = DownloadError(
                f"{type(e).__name__}: {e}",
                reason=f"the download failed ({type(e).__name__}); the console has the details",
            )
            with self._lock:
                self._failed[key] = (time.monotonic(), error)
        finally:
            with self._lock:
                self._running.pop(key, None)
