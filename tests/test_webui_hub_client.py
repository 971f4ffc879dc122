"""Downloads through the real huggingface_hub client (``hub_fetch``/``hub_describe``) from a
fake Hugging Face endpoint on 127.0.0.1: what the "Hugging Face endpoint" setting and the
default download path do, without the network."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

import pytest

from oms_ext import load_oms
from oms_ext.runtime.download import DownloadError, download_files

TINY = Path(__file__).parent / "data" / "oms-tiny"
REPO_ID = "h1t/oms_b_openclip_15_21"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
#: The released layout (fp16 weight name) plus the fixture's own text encoder and tokenizer.
SERVED = {
    "model_index.json": "model_index.json",
    "oms_module/config.json": "oms_module/config.json",
    "oms_module/diffusion_pytorch_model.fp16.safetensors": (
        "oms_module/diffusion_pytorch_model.safetensors"
    ),
    "oms_text_encoder/config.json": "oms_text_encoder/config.json",
    "oms_tokenizer/config.json": "oms_tokenizer/config.json",
    "text_encoder/config.json": "text_encoder/config.json",
    "text_encoder/model.safetensors": "text_encoder/model.safetensors",
    "tokenizer/merges.txt": "tokenizer/merges.txt",
    "tokenizer/vocab.json": "tokenizer/vocab.json",
    "tokenizer/special_tokens_map.json": "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json": "tokenizer/tokenizer_config.json",
}


class FakeHub:
    """Just the endpoints huggingface_hub calls here: HEAD/GET ``/{repo}/resolve/{rev}/{file}``
    and POST ``/api/models/{repo}/paths-info/{rev}``. Weight files are listed as LFS with
    their sha256; ``corrupt`` names files whose served bytes differ from that listing."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.corrupt: set[str] = set()
        self.gets: Counter[str] = Counter()

    def body(self, name: str) -> bytes:
        data = self.files[name]
        return data[:-1] + bytes([data[-1] ^ 1]) if name in self.corrupt else data

    def paths_info(self, paths: list[str]) -> list[dict]:
        out = []
        for path in paths:
            data = self.files[path]
            entry = {"type": "file", "path": path, "size": len(data), "oid": "0" * 40}
            if path.endswith(".safetensors"):
                sha = hashlib.sha256(data).hexdigest()
                entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    prefix = f"/{REPO_ID}/resolve/"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _file(self) -> str | None:
            path = unquote(self.path.split("?")[0])
            if not path.startswith(prefix):
                return None
            name = path[len(prefix) :].split("/", 1)[1]
            return name if name in hub.files else None

        def _head(self, name: str) -> bytes:
            data = hub.body(name)
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return data

        def do_HEAD(self) -> None:
            name = self._file()
            if name is None:
                self.send_error(404)
                return
            self._head(name)

        def do_GET(self) -> None:
            name = self._file()
            if name is None:
                self.send_error(404)
                return
            hub.gets[name] += 1
            self.wfile.write(self._head(name))

        def do_POST(self) -> None:
            if f"/api/models/{REPO_ID}/paths-info/" not in self.path:
                self.send_error(404)
                return
            length = int(self.headers.get("Content-Length", 0))
            form = parse_qs(self.rfile.read(length).decode())
            body = __import__("json").dumps(hub.paths_info(form.get("paths", []))).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[FakeHub, str]]:
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    reset_sessions()  # a session made while offline refuses every request
    fake = FakeHub({name: (TINY / src).read_bytes() for name, src in SERVED.items()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    monkeypatch.undo()
    reset_sessions()


def test_module_downloads_through_the_endpoint_and_loads(hub, tmp_path) -> None:
    fake, endpoint = hub
    target = tmp_path / "models" / "oms" / "oms_b_openclip_15_21"
    download_files(REPO_ID, list(SERVED), target, endpoint=endpoint, log=lambda _: None)
    for name in SERVED:
        assert (target / name).read_bytes() == fake.files[name]
    assert load_oms(target).unet is not None
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no staging left


def test_file_differing_from_the_listed_sha256_is_refused_and_nothing_is_kept(
    hub, tmp_path
) -> None:
    fake, endpoint = hub
    fake.corrupt.add("oms_module/diffusion_pytorch_model.fp16.safetensors")
    target = tmp_path / "oms" / "oms_b_openclip_15_21"
    with pytest.raises(DownloadError, match="sha256"):
        download_files(REPO_ID, list(SERVED), target, endpoint=endpoint, log=lambda _: None)
    assert not target.exists() or not any(target.rglob("*"))
    assert [p for p in target.parent.iterdir() if p != target] == []


def test_the_download_log_names_the_endpoint_in_use(hub, tmp_path) -> None:
    _, endpoint = hub
    lines: list[str] = []
    target = tmp_path / "oms" / "oms_b_openclip_15_21"
    download_files(REPO_ID, ["model_index.json"], target, endpoint=endpoint, log=lines.append)
    assert f"from {endpoint}/{REPO_ID} into {target}" in lines[0]


def test_files_already_present_are_not_requested_again(hub, tmp_path) -> None:
    fake, endpoint = hub
    target = tmp_path / "oms" / "oms_b_openclip_15_21"
    (target / "oms_module").mkdir(parents=True)
    (target / "model_index.json").write_bytes(fake.files["model_index.json"])
    download_files(REPO_ID, list(SERVED), target, endpoint=endpoint, log=lambda _: None)
    assert fake.gets["model_index.json"] == 0
    assert fake.gets["oms_module/config.json"] == 1


def test_unreachable_endpoint_names_repo_files_and_folder(hub, tmp_path, monkeypatch) -> None:
    import socket

    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http.time, "sleep", lambda _seconds: None)  # skip retry back-off

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    target = tmp_path / "oms" / "oms_b_openclip_15_21"
    with pytest.raises(DownloadError) as err:
        download_files(REPO_ID, ["model_index.json"], target, endpoint=closed, log=lambda _: None)
    text = str(err.value)
    assert f"{closed}/{REPO_ID}" in text and "model_index.json" in text and str(target) in text


def test_a_download_shows_the_hub_clients_progress_bar_with_size_and_speed(
    hub, tmp_path, monkeypatch, capsys
) -> None:
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # as a WebUI's console has it
    monkeypatch.setenv("TQDM_POSITION", "-1")  # tqdm draws as on a terminal
    _, endpoint = hub
    target = tmp_path / "oms" / "oms_b_openclip_15_21"
    weights = "oms_module/diffusion_pytorch_model.fp16.safetensors"
    download_files(REPO_ID, [weights], target, endpoint=endpoint, log=lambda _: None)
    bar = capsys.readouterr().err
    assert "100%" in bar and "B/s" in bar  # tqdm: bytes done of the size, and the speed
