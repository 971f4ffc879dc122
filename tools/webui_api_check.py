"""Check One More Step in a running WebUI through its API, as users meet it (a developer tool).

    python tools/webui_api_check.py http://127.0.0.1:7861 \\
        --models-dir <WebUI>/models/oms --log <the WebUI's console log file>

Needs an SD1.x checkpoint loaded, the extension installed, and the WebUI's OMS models folder
(``--models-dir``) writable. The checks put what they need into that folder, built from this
repository's random-weight test module (tests/data/oms-tiny), and remove it afterwards:

* that module as the folder ``oms_tiny`` (the module the checks choose by name), unless the
  folder holds one of that name already;
* a single ``.safetensors`` file named like the SD1.x/SD2.x release, with the release's text
  encoder beside it where downloads would put it (the test module's own small encoder);
* things that are not modules: a hidden folder, an interrupted download's staging folder, a
  broken link and an SD checkpoint's keys in a ``.safetensors`` file.

Then, one line each with PASS/FAIL (exit 1 on any failure):

1. "Fresh noise" with a variation strength: OMS applies to a batch of 4 that shares one
   seed, the images differ from OMS off with the same seeds, they differ from each other,
   and a second variation seed changes them.
2. "Auto" picks the single file named like the release and loads it as it is (no module
   file is fetched).
3. The OMS text is the prompt of the first step: ``[day:night:0.2] street`` at 4 steps reads
   "night street", a typed ``(dark:1.3) night <lora:x:0.8>`` reads "(dark:1.3) night", both
   shown in the console line of the batch (``--log``).
4. The models folder holding other things: ``/oms/v1/schema`` lists modules only; OMS applies.
5. A module from someone else's infotext: a short reason in the infotext, no local path.
6. OMS off after on: the console says the OMS module left the GPU (Forge: its memory
   manager unloaded it; on A1111 started with ``--use-cpu all`` there is no VRAM to free).
7. "Show OMS preview" through the API: the response holds one preview per image only when
   asked.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "oms-tiny"
RELEASE = "oms_b_openclip_15_21"
MODULE = "oms_tiny"
SD21_FOLDER = "stabilityai--stable-diffusion-2-1"
JUNK = (".hidden", f".{RELEASE}.partial-x1y2", "broken.safetensors", "sd-checkpoint.safetensors")


class WebUI:
    """The WebUI's API on ``url``; ``log`` is its console output, read by offset."""

    def __init__(self, url: str, log: Path | None) -> None:
        self.url = url.rstrip("/")
        self.log = log
        self.log_offset = log.stat().st_size if log and log.exists() else 0

    def call(self, path: str, payload: dict | None = None) -> dict:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=1800) as response:
            return json.load(response)

    def txt2img(self, oms: list | dict | None, **payload) -> dict:
        body = {
            "prompt": "a lone candle in a pitch black room",
            "steps": 4,
            "width": 64,
            "height": 64,
            "seed": 1,
            "sampler_name": "Euler a",
            "cfg_scale": 7,
            **payload,
        }
        if oms is not None:
            args = [oms] if isinstance(oms, dict) else oms
            body["alwayson_scripts"] = {"one more step": {"args": args}}
        result = self.call("/sdapi/v1/txt2img", body)
        result["info"] = json.loads(result["info"])
        return result

    def new_console(self) -> str:
        """Console lines written since the last call."""
        if self.log is None or not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(self.log_offset)
            text = f.read().decode("utf-8", "replace")
        self.log_offset += len(text.encode("utf-8"))
        return text


def _digests(result: dict) -> list[str]:
    return [hashlib.sha256(base64.b64decode(image)).hexdigest() for image in result["images"]]


def prepare(models: Path) -> list[Path]:
    """Put the single-file release, its encoder and the junk into ``models``; return what
    was created, for :func:`clean_up`."""
    import torch
    from safetensors.torch import save_file

    made = []
    if not (models / MODULE).exists():
        shutil.copytree(TINY, models / MODULE)
        made.append(models / MODULE)
    single = models / f"{RELEASE}.safetensors"
    shutil.copy(TINY / "oms_module" / "diffusion_pytorch_model.safetensors", single)
    shutil.copy(TINY / "oms_module" / "config.json", single.with_suffix(".json"))
    made += [single, single.with_suffix(".json")]
    encoder = models / SD21_FOLDER
    if not encoder.exists():
        shutil.copytree(TINY / "text_encoder", encoder / "text_encoder")
        shutil.copytree(TINY / "tokenizer", encoder / "tokenizer")
        made.append(encoder)
    hidden, staging, broken, checkpoint = (models / name for name in JUNK)
    shutil.copytree(TINY, hidden)
    shutil.copytree(TINY, staging)
    broken.symlink_to(models / "gone.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(checkpoint))
    made += [hidden, staging, broken, checkpoint]
    return made


def clean_up(made: list[Path]) -> None:
    for path in made:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


def check_variation_seeds(ui: WebUI) -> str:
    fresh = {"enabled": True, "module": MODULE, "noise_mode": "Fresh noise"}
    a = ui.txt2img(fresh, batch_size=4, subseed=5, subseed_strength=0.3)
    b = ui.txt2img(fresh, batch_size=4, subseed=99, subseed_strength=0.3)
    off = ui.txt2img({"enabled": False}, batch_size=4, subseed=5, subseed_strength=0.3)
    seeds = a["info"]["all_seeds"]
    applied = all("OMS alpha_bar0" in text for text in a["info"]["infotexts"])
    ok = applied and len(set(seeds)) == 1 and len(set(_digests(a))) == 4
    ok = ok and _digests(a) != _digests(b) and not set(_digests(a)) & set(_digests(off))
    return (
        f"{'PASS' if ok else 'FAIL'} fresh noise follows variation seeds (seeds {seeds}; "
        f"OMS {'applied' if applied else 'NOT applied'})"
    )


def check_single_file_release(ui: WebUI) -> str:
    result = ui.txt2img({"enabled": True})
    info = result["info"]["infotexts"][0]
    console = ui.new_console()
    ok = f"OMS module: {RELEASE}" in info and "OMS alpha_bar0" in info
    ok = ok and "Downloading" not in console and "downloading" not in info
    return f"{'PASS' if ok else 'FAIL'} a single file named like the release loads: {info[-160:]}"


def check_first_step_prompt(ui: WebUI) -> list[str]:
    lines = []
    cases = (
        ("[day:night:0.2] street", "", 'OMS prompt "night street"'),
        ("a room", "(dark:1.3) night <lora:x:0.8>", 'OMS prompt "(dark:1.3) night"'),
    )
    for prompt, typed, expected in cases:
        ui.new_console()
        ui.txt2img({"enabled": True, "module": MODULE, "prompt": typed}, prompt=prompt)
        console = ui.new_console()
        ok = expected in console
        shown = next((ln for ln in console.splitlines() if "One More Step applied" in ln), "")
        lines.append(f"{'PASS' if ok else 'FAIL'} OMS text of {prompt or typed!r}: {shown[-90:]}")
    return lines


def check_models_folder(ui: WebUI) -> str:
    modules = ui.call("/oms/v1/schema")["modules"]
    result = ui.txt2img({"enabled": True, "module": MODULE})
    junk = [name for name in modules if name.startswith(".") or name in ("broken", "sd-checkpoint")]
    ok = not junk and "OMS alpha_bar0" in result["info"]["infotexts"][0]
    return f"{'PASS' if ok else 'FAIL'} the models folder may hold anything: modules {modules}"


def check_user_mistake(ui: WebUI, models: Path) -> str:
    info = ui.txt2img({"enabled": True, "module": "someone_elses_module"})["info"]["infotexts"][0]
    reason = "module someone_elses_module is not installed"  # quoted or not, as the WebUI does
    ok = f"OMS skipped: {reason}" in info.replace('OMS skipped: "', "OMS skipped: ")
    ok = ok and str(models) not in info and "internal error" not in info
    return f"{'PASS' if ok else 'FAIL'} someone else's module is named as such: {info[-150:]}"


def check_release_when_off(ui: WebUI) -> str:
    ui.txt2img({"enabled": True, "module": MODULE})
    ui.new_console()
    ui.txt2img({"enabled": False})
    console = ui.new_console()
    line = next((ln for ln in console.splitlines() if "[OMS] OMS is off" in ln), "")
    if not line and "all" in (ui.call("/sdapi/v1/cmd-flags").get("use_cpu") or []):
        # A1111 on the CPU: OMS ran there too, so it held no VRAM and there is nothing to free
        return "n/a  OMS off after on frees it: the WebUI computes on the CPU (--use-cpu all)"
    return f"{'PASS' if line else 'FAIL'} OMS off after on frees it: {line or 'no console line'}"


def check_preview(ui: WebUI) -> str:
    on = ui.txt2img({"enabled": True, "module": MODULE, "preview": True}, batch_size=2)
    off = ui.txt2img({"enabled": True, "module": MODULE}, batch_size=2)
    texts = on["info"]["infotexts"]
    ok = len(on["images"]) == 4 and len(off["images"]) == 2
    ok = ok and texts[-1].startswith("One More Step preview of image 2")
    return f"{'PASS' if ok else 'FAIL'} preview only when asked: {len(on['images'])} / " + (
        f"{len(off['images'])} images; {texts[-1][:90]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the WebUI's address, e.g. http://127.0.0.1:7861")
    parser.add_argument("--models-dir", type=Path, required=True, help="its OMS models folder")
    parser.add_argument("--log", type=Path, default=None, help="its console log file")
    args = parser.parse_args(argv)
    ui = WebUI(args.url, args.log)
    made = prepare(args.models_dir)
    checks: list[Callable[[], str | list[str]]] = [
        lambda: check_variation_seeds(ui),
        lambda: check_single_file_release(ui),
        lambda: check_first_step_prompt(ui),
        lambda: check_models_folder(ui),
        lambda: check_user_mistake(ui, args.models_dir),
        lambda: check_release_when_off(ui),
        lambda: check_preview(ui),
    ]
    failed = 0
    try:
        ui.new_console()
        for check in checks:
            started = time.time()
            result = check()
            for line in [result] if isinstance(result, str) else result:
                print(f"{line}  ({time.time() - started:.0f} s)", flush=True)
                failed += line.startswith("FAIL")
    finally:
        clean_up(made)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
