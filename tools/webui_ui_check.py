"""Drive a running WebUI's txt2img page the way a user does and check the OMS accordion.

Run against an AUTOMATIC1111 (gradio 3.41) or Forge (gradio 4.x) started with this extension
installed and an OMS module in its models folder:

    python tools/webui_ui_check.py http://127.0.0.1:7860 --screenshot docs/accordion-forge.png

Steps: open the "One More Step" accordion, tick it, set an OMS prompt and CFG (screenshot of
the accordion), generate; untick it and generate again; then paste the first image's infotext
back into the prompt box, press "paste parameters" and read the accordion. Prints one line per
check and exits 1 if any fails. Needs ``pip install playwright`` and a Chromium
(``--chromium``, default: the one Playwright installed, else ``/usr/bin/chromium``); it is a
developer tool, not part of the extension or of the test suite.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

from playwright.sync_api import Locator, Page, sync_playwright

OMS_PROMPT = "dark"
OMS_CFG = "3"
IMAGE_PROMPT = "a (pitch black:1.2) room <lora:none:1>"


def set_number(page: Page, elem_id: str, value: str) -> None:
    """Type into the number box of a gradio slider and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")
    box.blur()


def header_checkbox(page: Page) -> Locator | None:
    """The checkbox in the accordion's header (InputAccordion of A1111 >= 1.7 and Forge)."""
    header = page.locator("#oms_enabled-visible-checkbox")
    return header if header.count() else None


def accordion_checkbox(page: Page) -> Locator:
    """The checkbox holding the enable value: the header one, else InputAccordion's hidden
    checkbox (A1111 1.6: the accordion is on while it is open), else the plain checkbox."""
    header = header_checkbox(page)
    if header is not None:
        return header
    hidden = page.locator("#oms_enabled-checkbox input[type=checkbox]")
    return hidden if hidden.count() else page.locator("#oms_enabled input[type=checkbox]")


def toggle_accordion(page: Page) -> None:
    page.locator("#oms_enabled .label-wrap, #oms_accordion .label-wrap").first.click(
        position={"x": 300, "y": 10}
    )
    page.wait_for_timeout(300)


def open_accordion(page: Page) -> None:
    if not page.locator("#oms_prompt textarea").is_visible():
        toggle_accordion(page)
    page.locator("#oms_prompt textarea").wait_for(state="visible")


def set_enabled(page: Page, on: bool) -> None:
    box = accordion_checkbox(page)
    if box.is_checked() == on:
        return
    if box.is_visible():
        box.click()
    else:  # A1111 1.6 InputAccordion: opening the accordion turns it on
        toggle_accordion(page)
    page.wait_for_timeout(300)


def read_accordion(page: Page) -> dict[str, str]:
    noise = page.locator("#oms_noise_mode input[type=radio]:checked")
    return {
        "enabled": str(accordion_checkbox(page).is_checked()),
        "prompt": page.locator("#oms_prompt textarea").input_value(),
        "cfg": page.locator("#oms_cfg input[type=number]").input_value(),
        "module": page.locator("#oms_module input").first.input_value(),
        "noise": noise.get_attribute("value") or "" if noise.count() else "",
    }


def shown_seed(text: str) -> str | None:
    found = re.search(r"Seed: (\d+)", text)
    return found.group(1) if found else None


def generate(page: Page, timeout_s: float) -> str:
    """Click Generate (random seed) and return the infotext of the new image: the one whose
    seed differs from the image shown before (progress text also changes the element)."""
    info = page.locator("#html_info_txt2img").first  # gradio 3.41 repeats the id inside
    before = shown_seed(info.inner_text())
    page.locator("#txt2img_seed input[type=number]").fill("-1")
    page.locator("#txt2img_generate").click()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page.wait_for_timeout(1000)
        text = info.inner_text()
        seed = shown_seed(text)
        if seed is not None and seed != before:
            return text
    raise TimeoutError(f"no new infotext after {timeout_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--screenshot", type=Path, help="PNG of the opened accordion")
    parser.add_argument("--chromium", default=None, help="Chromium executable")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per generation")
    args = parser.parse_args()
    chromium = args.chromium or shutil.which("chromium")
    results: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        results.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(args.url, timeout=180_000)
        page.locator("#txt2img_prompt textarea").wait_for(timeout=180_000)
        page.locator("#txt2img_prompt textarea").fill(IMAGE_PROMPT)
        set_number(page, "txt2img_width", "64")
        set_number(page, "txt2img_height", "64")
        set_number(page, "txt2img_steps", "4")

        open_accordion(page)
        set_enabled(page, True)
        page.locator("#oms_prompt textarea").fill(OMS_PROMPT)
        set_number(page, "oms_cfg", OMS_CFG)
        if args.screenshot:
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.locator("#oms_enabled, #oms_accordion").first.screenshot(path=args.screenshot)
            check("accordion screenshot", args.screenshot.stat().st_size > 0, str(args.screenshot))

        on_info = generate(page, args.timeout)
        check("OMS on: infotext has 'OMS: True'", "OMS: True" in on_info, on_info[-300:])
        check(
            "OMS on: OMS prompt and CFG recorded",
            f"OMS prompt: {OMS_PROMPT}" in on_info and f"OMS CFG: {float(OMS_CFG)}" in on_info,
        )
        check("OMS on: module recorded", "OMS module: " in on_info)

        # Reset the accordion, turn it off, generate, then paste the OMS-on infotext back.
        page.locator("#oms_prompt textarea").fill("")
        set_number(page, "oms_cfg", "7")
        set_enabled(page, False)
        off_info = generate(page, args.timeout)
        check("OMS off: no OMS keys", "OMS" not in off_info, off_info[-200:])

        page.locator("#txt2img_prompt textarea").fill(on_info)
        page.locator("#txt2img_tools #paste, #paste").first.click()
        page.wait_for_timeout(3000)
        got = read_accordion(page)
        check("paste: enabled", got["enabled"] == "True", str(got))
        check("paste: OMS prompt", got["prompt"] == OMS_PROMPT)
        check("paste: OMS CFG", float(got["cfg"] or "nan") == float(OMS_CFG))
        module = on_info.split("OMS module: ", 1)[-1].split(",", 1)[0]
        check("paste: module", got["module"] == module, f"{got['module']!r} vs {module!r}")

        page.locator("#txt2img_prompt textarea").fill(off_info)
        page.locator("#txt2img_tools #paste, #paste").first.click()
        page.wait_for_timeout(3000)
        still_on = accordion_checkbox(page).is_checked()
        check("paste of an image made without OMS turns it off", not still_on)
        browser.close()

    failed = [name for name, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
