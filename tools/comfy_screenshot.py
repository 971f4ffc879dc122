"""Screenshot the One More Step nodes in a running ComfyUI page.

    python tools/comfy_screenshot.py http://127.0.0.1:8188 docs/comfyui-nodes.png

Opens the page in headless Chromium (Playwright; ``--chromium`` names the browser executable,
default ``/usr/bin/chromium``), loads ``examples/one_more_step_workflow.json`` into the graph
with the frontend's own ``app.loadGraphData`` and saves a screenshot. Fails (exit status 1)
unless the page knows the three OMS node types and the loaded graph holds every node of the
example, so the screenshot is also the check that the example loads in ComfyUI.
"""

from __future__ import annotations

import argparse
import json
import sys
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
        browser.close()
    wanted = sorted(n["type"] for n in workflow["nodes"])
    ok = sorted(known) == sorted(OMS_NODES) and sorted(loaded) == wanted
    print(f"{'PASS' if ok else 'FAIL'}: page knows {known}; graph holds {sorted(loaded)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
