"""Screenshot the One More Step nodes in a running ComfyUI page.

    python tools/comfy_screenshot.py http://127.0.0.1:8188 docs/comfyui-nodes.png

Opens the page in headless Chromium (Playwright; ``--chromium`` names the browser executable,
default ``/usr/bin/chromium``), loads ``examples/one_more_step_workflow.json`` into the graph
with the frontend's own ``app.loadGraphData`` and saves a screenshot. Fails (exit status 1)
unless the page knows the three OMS node types and the loaded graph holds every node of the
example, so the screenshot is also the check that the example loads in ComfyUI.

With ``--toast PNG`` (after tools/comfy_check.py has written its checkpoint and module into
that ComfyUI) it also queues a generation OMS must skip (add_noise off), waits for the page's
"One More Step skipped" toast and saves a screenshot of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "one_more_step_workflow.json"
OMS_NODES = ("OneMoreStepLoader", "OneMoreStepApply", "OneMoreStepPreview")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--toast", type=Path, help="also check the skip toast, save it here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    workflow = json.loads(EXAMPLE.read_text())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(args.url, wait_until="networkidle")
        page.wait_for_function("() => window.app && window.app.graph", timeout=60_000)
        known = page.evaluate(
            "(names) => names.filter((n) => window.LiteGraph.registered_node_types[n])",
            list(OMS_NODES),
        )
        page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
        page.wait_for_timeout(1000)
        page.keyboard.press("Escape")  # the templates dialog of a first visit
        page.evaluate(
            "() => window.app.extensionManager?.command?.execute('Comfy.Canvas.FitView')"
        )
        page.wait_for_timeout(1000)
        loaded = page.evaluate("() => window.app.graph._nodes.map((n) => n.type)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        toast = _toast(page, args.url, args.toast) if args.toast else True
        browser.close()
    wanted = sorted(n["type"] for n in workflow["nodes"])
    ok = sorted(known) == sorted(OMS_NODES) and sorted(loaded) == wanted
    print(f"{'PASS' if ok else 'FAIL'}: page knows {known}; graph holds {sorted(loaded)}")
    if args.toast:
        print(f"{'PASS' if toast else 'FAIL'}: the page shows the skip toast")
    return 0 if ok and toast else 1


def _toast(page, url: str, out: Path) -> bool:
    """Queue a generation with add_noise off and wait for the page's skip toast."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    sys.path.insert(0, str(ROOT / "tools"))
    from comfy_check import workflow

    # A new seed each time: ComfyUI runs nothing for a prompt whose outputs it has cached.
    prompt = workflow("toast", add_noise=False, record=False, seed=uuid.uuid4().int % 2**31)
    body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
    headers = {"Content-Type": "application/json"}
    urllib.request.urlopen(urllib.request.Request(f"{url}/prompt", body, headers), timeout=60)
    try:
        page.wait_for_selector("text=One More Step skipped", timeout=120_000)
    except PlaywrightTimeout:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    return True


if __name__ == "__main__":
    sys.exit(main())
