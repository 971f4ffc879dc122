"""Drive a running WebUI's txt2img page the way a user does and check the OMS accordion.

Run against an AUTOMATIC1111 (gradio 3.41) or Forge (gradio 4.x) started with this extension
installed and an SD1.x or SD2.x checkpoint loaded:

    python tools/webui_ui_check.py http://127.0.0.1:7860 --module oms_tiny --screenshots docs

Checks, in this order (one PASS/FAIL line each, exit status 1 if any fails):

* layout, at a browser width of 1920 px and of 800 px: the refresh button sits beside the
  module list, the OMS CFG slider spans the accordion, and typing a value into it and dragging
  it both read back; with ``--screenshots DIR`` the opened accordion is saved as
  ``DIR/accordion-NAME-1920.png`` and ``DIR/accordion-NAME-800.png``;
* the notes under the module list (``#oms_module_notes``) name every module with what it is
  for and whether it is on disk (``--module`` must be "on disk"); choosing ``--skip-module``
  (default ``oms_b_openclip_xl``, an SDXL module: it cannot run with an SD1.x/SD2.x checkpoint;
  pass ``oms_b_openclip_15_21`` for an SDXL checkpoint) warns "OMS will be skipped: ..."
  before anything is generated, ``--module`` and "Auto" do not; the refresh button keeps the
  choice and the notes;
* with ``--other-checkpoint TITLE`` (a checkpoint of the other family in the WebUI's list):
  picking it in the checkpoint list clears the warning for ``--skip-module`` and picking the
  first checkpoint again brings it back (A1111 loads each pick: allow minutes for SDXL);
* a generation with ``--skip-module``: "One More Step skipped: ..." shows under the result
  (the WebUI's comments) and the infotext says "OMS skipped";
* a generation with OMS on and ``--module``: the infotext records OMS, its prompt, CFG and
  module, and nothing about OMS shows under the result; with OMS off the infotext has no OMS
  keys. ``--module`` defaults to "Auto", which picks a released module: offline, where that
  is not downloaded and OMS is skipped, pass a module that is on disk (e.g. ``oms_tiny``,
  the random-weight test module copied into the WebUI's ``models/oms/``);
* "paste parameters" of the first image's infotext restores every OMS control, and of an
  image made without OMS turns the accordion off;
* "Show OMS preview" with a batch of 2 (browser width 1280 px from here on): the gallery
  holds 2 images and 2 previews (and the grid, if the WebUI shows one), and the info text of
  the first preview starts "One More Step preview of image" (screenshot
  ``DIR/preview-NAME.png``: the gallery as a grid, with that info text under it);
* the Settings page: the "One More Step" section is listed under a category of its own (not
  "Uncategorized"), each of its settings shows a help line, and the settings search finds all
  of them for "OMS" and for "One More Step" (screenshot ``DIR/settings-NAME.png``: the
  section's settings).

NAME is ``--name`` (default: "forge" when the page's footer names a Forge version, else
"a1111"). Each generation is 64x64 with 4 steps. Needs ``pip install playwright`` and a
Chromium (``--chromium``, default: ``chromium`` on the PATH, else the one Playwright
installed); it is a developer tool, not part of the extension or of the test suite.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Locator, Page, sync_playwright

OMS_PROMPT = "dark"
OMS_CFG = "3"
IMAGE_PROMPT = "a (pitch black:1.2) room <lora:none:1>"
WIDTHS = (1920, 800)
#: Browser width for the gallery and settings checks (keeps their screenshots small).
PAGE_WIDTH = 1280
PREVIEW_INFO = "One More Step preview of image"
SKIP_COMMENT = "One More Step skipped:"
FIT_WARNING = "OMS will be skipped:"
#: The WebUI's checkpoint list: A1111's quick setting, Forge f2's own dropdown.
CHECKPOINT_LIST = ("#setting_sd_model_checkpoint", ".model_selection")
#: What a module line in the notes ends with: where the module is.
MODULE_STATES = ("on disk", "not downloaded")
SEARCHES = ("OMS", "One More Step")

Check = Callable[[str, bool, str], None]


def set_number(page: Page, elem_id: str, value: str) -> None:
    """Type into the number box of a gradio slider or number field and commit it."""
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
    """Click the accordion's header at its right end (the arrow), away from its label: a
    click on the label text would also toggle the header checkbox."""
    header = page.locator("#oms_enabled .label-wrap, #oms_accordion .label-wrap").first
    box = header.bounding_box()
    width = box["width"] if box else 300
    header.click(position={"x": max(width - 20, 1), "y": 10})
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


def set_checkbox(page: Page, elem_id: str, on: bool) -> None:
    box = page.locator(f"#{elem_id} input[type=checkbox]")
    if box.is_checked() != on:
        box.click()
    page.wait_for_timeout(300)


def dropdown_value(page: Page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input").first.input_value()


def choose(page: Page, elem_id: str, value: str) -> None:
    """Pick ``value`` from a gradio dropdown (3.41 and 4.x: a list of options under it)."""
    choose_in(page, f"#{elem_id}", value)


def option_pattern(value: str) -> re.Pattern[str]:
    """A dropdown option showing ``value``: the whole text (after gradio's check mark), or
    ``value`` and the short hash A1111 appends to a checkpoint's title once it has hashed the
    file (``modules/sd_models.py``, ``CheckpointInfo.calculate_shorthash``), so a checkpoint
    is found by its file name before and after its first load."""
    return re.compile(rf"^\W*{re.escape(value)}(\s+\[[0-9a-f]{{8,}}\])?\s*$")


def choose_in(page: Page, selector: str, value: str) -> None:
    """:func:`choose` for the first dropdown matching a CSS ``selector``."""
    block = page.locator(selector).first
    block.locator("input").first.click()
    options = block.locator("ul.options li")
    options.first.wait_for(state="visible")
    exact = option_pattern(value)
    options.filter(has_text=exact).first.click()
    page.wait_for_timeout(100)


def notes_text(page: Page) -> str:
    return page.locator("#oms_module_notes").first.inner_text()  # gradio 3.41 repeats the id


def redrawn(page: Page, selector: str, timeout_ms: int = 15_000) -> None:
    """Wait until the server has redrawn a gradio block (CSS ``selector``) after an event: its
    progress overlay (the block's ``.wrap`` child, hidden when idle) appears, then hides
    again. An update quicker than the polling passes after 1.5 s."""
    overlay = page.locator(f"{selector} > .wrap").first
    if overlay.count() == 0:  # a block without a progress overlay: nothing to wait for
        return

    def busy() -> bool:
        return "hide" not in (overlay.get_attribute("class") or "hide").split()

    deadline = time.monotonic() + 1.5
    while not busy() and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    deadline = time.monotonic() + timeout_ms / 1000
    while busy() and time.monotonic() < deadline:
        page.wait_for_timeout(100)


def choose_module(page: Page, value: str) -> str:
    """Pick an OMS module and return the notes the server redrew for it."""
    choose(page, "oms_module", value)
    redrawn(page, "#oms_module_notes")
    return notes_text(page)


def read_accordion(page: Page) -> dict[str, str]:
    noise = page.locator("#oms_noise_mode input[type=radio]:checked")
    return {
        "enabled": str(accordion_checkbox(page).is_checked()),
        "prompt": page.locator("#oms_prompt textarea").input_value(),
        "cfg": page.locator("#oms_cfg input[type=number]").input_value(),
        "module": dropdown_value(page, "oms_module"),
        "noise": noise.get_attribute("value") or "" if noise.count() else "",
    }


def shown_seed(text: str) -> str | None:
    found = re.search(r"Seed: (\d+)", text)
    return found.group(1) if found else None


def info_box(page: Page) -> Locator:
    return page.locator("#html_info_txt2img").first  # gradio 3.41 repeats the id inside


def comments_text(page: Page) -> str:
    """What the WebUI shows under the result besides the infotext (its comments and timing)."""
    return page.locator("#html_log_txt2img").first.inner_text()


def generate(page: Page, timeout_s: float) -> str:
    """Click Generate (random seed) and return the infotext of the new image: the one whose
    seed differs from the image shown before (progress text also changes the element)."""
    info = info_box(page)
    before = shown_seed(info.inner_text())
    page.locator("#txt2img_seed input[type=number]").fill("-1")
    page.locator("#txt2img_generate").click()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page.wait_for_timeout(1000)
        text = info.inner_text()
        seed = shown_seed(text)
        if seed is not None and seed != before:
            page.wait_for_timeout(500)  # the comments arrive with the same response
            return text
    raise TimeoutError(f"no new infotext after {timeout_s:.0f} s")


def screenshot(locator: Locator, folder: Path | None, name: str, check: Check) -> None:
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    locator.screenshot(path=path)
    check(f"screenshot {name}", path.stat().st_size > 0, str(path))


def check_layout(page: Page, width: int, shots: Path | None, name: str, check: Check) -> None:
    """At ``width``: refresh beside the module list, CFG slider full width and usable."""
    page.set_viewport_size({"width": width, "height": 1400})
    page.wait_for_timeout(800)
    open_accordion(page)
    page.locator("#oms_enabled, #oms_accordion").first.scroll_into_view_if_needed()
    module = page.locator("#oms_module").bounding_box()
    refresh = page.locator("#oms_refresh").bounding_box()
    beside = (
        module is not None
        and refresh is not None
        and refresh["x"] >= module["x"] + module["width"] - 2
        and refresh["y"] < module["y"] + module["height"]
        and refresh["y"] + refresh["height"] > module["y"]
        and refresh["width"] < 80
    )
    check(f"{width} px: refresh button beside the module list", beside, f"{module} {refresh}")

    content = page.locator("#oms_prompt").bounding_box()
    track = page.locator("#oms_cfg input[type=range]")
    bar = track.bounding_box()
    full = content is not None and bar is not None and bar["width"] >= 0.9 * content["width"]
    check(
        f"{width} px: OMS CFG slider spans the accordion",
        full,
        f"slider {bar and round(bar['width'])} px of {content and round(content['width'])} px",
    )

    set_number(page, "oms_cfg", "2.5")
    page.wait_for_timeout(300)
    typed = track.input_value()
    check(f"{width} px: OMS CFG typed 2.5 reads back", _close(typed, 2.5, 0.01), typed)

    low, high = float(track.get_attribute("min") or 0), float(track.get_attribute("max") or 1)
    if bar is not None:
        y = bar["y"] + bar["height"] / 2
        page.mouse.move(bar["x"] + 0.3 * bar["width"], y)
        page.mouse.down()
        page.mouse.move(bar["x"] + 0.75 * bar["width"], y, steps=8)
        page.mouse.up()
        page.wait_for_timeout(300)
    expected = low + 0.75 * (high - low)
    dragged = page.locator("#oms_cfg input[type=number]").input_value()
    check(
        f"{width} px: OMS CFG slider dragged to 3/4 reads back",
        _close(dragged, expected, 0.05 * (high - low)),
        f"{dragged} (expected about {expected:.1f})",
    )
    set_number(page, "oms_cfg", OMS_CFG)
    page.wait_for_timeout(300)
    accordion = page.locator("#oms_enabled, #oms_accordion").first
    screenshot(accordion, shots, f"accordion-{name}-{width}.png", check)


def _close(text: str, target: float, tolerance: float) -> bool:
    try:
        return abs(float(text) - target) <= tolerance
    except ValueError:
        return False


def check_notes(
    page: Page, modules: list[str], module: str, skip_module: str, check: Check
) -> None:
    """The module notes: one line per module with its state, the fit warning, refresh."""
    text = notes_text(page)
    lines = {m: _note_line(text, m) for m in modules}
    missing = [m for m, line in lines.items() if line is None]
    check("notes: every module has a line", not missing, f"missing {missing}" if missing else "")
    stateless = [
        m
        for m, line in lines.items()
        if m != "Auto" and line is not None and not line.rstrip().endswith(MODULE_STATES)
    ]
    check(
        "notes: each module says whether it is on disk",
        not stateless,
        "; ".join(lines[m] or m for m in modules if m != "Auto"),
    )
    has_purpose = all(
        line is None or line.count(" - ") >= 2 or m == "Auto" for m, line in lines.items()
    )
    check("notes: each module says what it is for", has_purpose)
    if module != "Auto":
        line = lines.get(module) or ""
        check(f"notes: {module} is on disk", line.rstrip().endswith("on disk"), line)

    warned = choose_module(page, skip_module)
    check(
        f"notes: choosing {skip_module} warns before Generate",
        FIT_WARNING in warned,
        warned.splitlines()[0] if warned else "",
    )
    for fitting in dict.fromkeys([module, "Auto"]):
        calm = choose_module(page, fitting)
        check(
            f"notes: choosing {fitting} gives no warning",
            FIT_WARNING not in calm,
            calm.splitlines()[0] if calm else "",
        )

    choose_module(page, module)
    page.locator("#oms_refresh").click()
    redrawn(page, "#oms_module_notes")
    after = notes_text(page)
    kept = dropdown_value(page, "oms_module") == module and all(
        _note_line(after, m) is not None for m in modules
    )
    check("refresh keeps the module choice and the notes", kept, dropdown_value(page, "oms_module"))
    page.locator("#oms_module input").first.click()
    page.wait_for_timeout(300)
    listed = page.locator("#oms_module ul.options li").all_inner_texts()
    page.keyboard.press("Escape")
    page.locator("#oms_prompt textarea").click()  # close the list
    names = [re.sub(r"^\W*", "", t).strip() for t in listed]
    check("refresh keeps every module in the list", names == modules, str(names))


def wait_for_notes(page: Page, warned: bool, timeout_s: float = 60.0) -> str:
    """The module notes once they do (``warned``) or do not carry the fit warning, or as they
    are after ``timeout_s``: redrawn by an event that shows no progress overlay."""
    deadline = time.monotonic() + timeout_s
    text = notes_text(page)
    while (FIT_WARNING in text) != warned and time.monotonic() < deadline:
        page.wait_for_timeout(250)
        text = notes_text(page)
    return text


def check_checkpoint_switch(
    page: Page, skip_module: str, other: str, loaded: str, check: Check
) -> None:
    """Picking another checkpoint in the WebUI's list redraws the module notes, judged by the
    picked checkpoint: ``skip_module`` fits ``other`` (a checkpoint of the other family), so
    its warning goes, and comes back with the first checkpoint. A1111 loads each pick.
    ``loaded``: the loaded checkpoint's title (``sd_model_checkpoint``), for a list that shows
    none (Forge f2 started with ``--ckpt``: its list holds short names)."""
    checkpoint_list = next(s for s in CHECKPOINT_LIST if page.locator(s).count())
    shown = page.locator(checkpoint_list).first.locator("input").first.input_value()
    original = shown or loaded.split(" [", 1)[0]
    warned = choose_module(page, skip_module)
    check(f"notes: {skip_module} warned with {original}", FIT_WARNING in warned, original)
    choose_in(page, checkpoint_list, other)
    calm = wait_for_notes(page, warned=False)
    # A1111 loads the pick meanwhile; a user waits for that before picking again (a pick
    # during a load is lost there: the list shows it, the model stays the one loading)
    redrawn(page, checkpoint_list, timeout_ms=900_000)
    check(
        f"notes: picking {other} in the checkpoint list clears the warning",
        FIT_WARNING not in calm,
        calm.splitlines()[0] if calm else "",
    )
    choose_in(page, checkpoint_list, original)
    again = wait_for_notes(page, warned=True)
    redrawn(page, checkpoint_list, timeout_ms=900_000)
    check(
        f"notes: picking {original} again warns again",
        FIT_WARNING in again,
        again.splitlines()[0] if again else "",
    )


def _note_line(text: str, module: str) -> str | None:
    for line in text.splitlines():
        if line.strip().startswith(f"{module} - "):
            return line.strip()
    return None


def _union(*locators: Locator) -> dict[str, float]:
    """The viewport rectangle holding all ``locators`` (for a screenshot of them)."""
    boxes = [b for b in (loc.bounding_box() for loc in locators) if b is not None]
    left = min(b["x"] for b in boxes)
    top = min(b["y"] for b in boxes)
    right = max(b["x"] + b["width"] for b in boxes)
    bottom = max(b["y"] + b["height"] for b in boxes)
    return {"x": left, "y": top, "width": right - left, "height": bottom - top}


def gallery_thumbnails(page: Page) -> Locator:
    """The result gallery's thumbnails: the strip under the large image (the WebUI shows the
    gallery in preview mode; gradio 4 also keeps a grid of the same images behind it)."""
    strip = page.locator("#txt2img_gallery .thumbnails .thumbnail-item")
    return strip if strip.count() else page.locator("#txt2img_gallery .thumbnail-item")


def check_preview(
    page: Page, module: str, timeout_s: float, shots: Path | None, name: str, check: Check
) -> None:
    """Batch of 2 with "Show OMS preview": 2 images + 2 previews, and the previews' info."""
    open_accordion(page)
    set_enabled(page, True)
    choose(page, "oms_module", module)
    set_checkbox(page, "oms_preview", True)
    set_number(page, "txt2img_batch_size", "2")
    generate(page, timeout_s)
    thumbs = gallery_thumbnails(page)
    count = thumbs.count()
    check(
        "preview: gallery holds 2 images + 2 previews",
        count in (4, 5),
        f"{count} thumbnails" + (" (with the grid)" if count == 5 else ""),
    )
    info = ""
    if count >= 2:
        before = info_box(page).inner_text()
        thumbs.nth(count - 2).click()  # the preview of image 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            page.wait_for_timeout(300)
            info = info_box(page).inner_text().strip()
            if info != before:
                break
    check(
        f"preview: its info text starts '{PREVIEW_INFO}'", info.startswith(PREVIEW_INFO), info[:160]
    )
    if shots is not None:  # the gallery as a grid (Escape leaves the large view), its info
        page.keyboard.press("Escape")
        page.wait_for_timeout(800)
        shots.mkdir(parents=True, exist_ok=True)
        path = shots / f"preview-{name}.png"
        page.locator("#txt2img_gallery").scroll_into_view_if_needed()
        region = _union(page.locator("#txt2img_gallery"), info_box(page))
        page.screenshot(path=path, clip=region)
        check(f"screenshot {path.name}", path.stat().st_size > 0, str(path))
    set_checkbox(page, "oms_preview", False)
    set_number(page, "txt2img_batch_size", "1")


def check_settings(page: Page, shots: Path | None, name: str, check: Check) -> None:
    """The settings section: own category, help lines, found by the settings search."""
    # every registered option is in the page's ``opts`` (the settings JSON), set or not
    keys = sorted(page.evaluate("Object.keys(opts).filter(k => k.startsWith('oms_'))"))
    page.locator("#tabs > div > button", has_text=re.compile(r"^\s*Settings\s*$", re.I)).click()
    section = page.locator(
        "#settings > div > button", has_text=re.compile(r"^\s*One More Step\s*$")
    )
    section.wait_for(state="visible")
    category = section.evaluate(
        """b => { for (let e = b.previousElementSibling; e; e = e.previousElementSibling)
                    if (e.classList.contains('settings-category')) return e.textContent.trim();
                  return null; }"""
    )
    check(
        "settings: 'One More Step' has a category of its own",
        category == "One More Step",
        f"listed under {category!r}",
    )
    section.click()
    page.wait_for_timeout(500)

    def help_line(key: str) -> str:
        info = page.locator(f"#setting_{key} .settings-comment .info")
        return info.first.inner_text().strip(" ()") if info.count() else ""

    helpless = [
        key
        for key in keys
        if not page.locator(f"#setting_{key}").is_visible() or not help_line(key)
    ]
    if not keys:
        helpless = ["(no oms_ settings)"]
    check(
        f"settings: each of the {len(keys)} settings shows a help line",
        not helpless,
        f"without: {helpless}" if helpless else "",
    )
    screenshot(page.locator("#column_settings_one_more_step"), shots, f"settings-{name}.png", check)

    search = page.locator("#settings_search input, #settings_search textarea").first
    for query in SEARCHES:
        search.fill(query)
        search.press("End")
        page.wait_for_timeout(1500)
        hidden = [key for key in keys if not page.locator(f"#setting_{key}").is_visible()]
        unrelated = page.locator("#setting_samples_format").is_visible()
        check(
            f"settings search '{query}' finds all {len(keys)} settings",
            bool(keys) and not hidden and not unrelated,
            f"not shown: {hidden}"
            if hidden
            else ("the search did not filter" if unrelated else ""),
        )
    search.fill("")
    search.press("End")
    page.locator("#tabs > div > button", has_text=re.compile(r"^\s*txt2img\s*$", re.I)).click()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the WebUI's address, e.g. http://127.0.0.1:7860")
    parser.add_argument("--module", default="Auto", help="OMS module to generate with")
    parser.add_argument(
        "--skip-module",
        default="oms_b_openclip_xl",
        help="a module that cannot run with the loaded checkpoint (default: the SDXL one)",
    )
    parser.add_argument(
        "--other-checkpoint",
        help="title in the checkpoint list of a checkpoint that --skip-module fits (an SDXL "
        "one by default); checks that picking it redraws the module notes",
    )
    parser.add_argument("--screenshots", type=Path, help="folder for the PNG screenshots")
    parser.add_argument("--name", help="WebUI name in the screenshot names (forge/a1111)")
    parser.add_argument("--chromium", default=None, help="Chromium executable")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per generation")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    chromium = args.chromium or shutil.which("chromium")
    results: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        results.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}".rstrip(), flush=True)

    def guarded(what: str, step: Callable[[], None]) -> None:
        """Run a group of checks; an exception fails the group instead of ending the run."""
        try:
            step()
        except Exception as e:  # a missing element, a timeout: report it, go on
            check(what, False, f"{type(e).__name__}: {str(e).splitlines()[0]}")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        page = browser.new_page(viewport={"width": WIDTHS[0], "height": 1400})
        page.goto(url, timeout=180_000)
        page.locator("#txt2img_prompt textarea").wait_for(timeout=180_000)
        page.wait_for_timeout(2000)  # the WebUI's own scripts run after the page appears
        footer = page.locator("#footer").first
        footer_text = footer.inner_text() if footer.count() else ""
        name = args.name or ("forge" if re.search(r"version: \S*f\d", footer_text) else "a1111")
        modules = page.request.get(f"{url}/oms/v1/schema").json()["modules"]
        page.locator("#txt2img_prompt textarea").fill(IMAGE_PROMPT)
        set_number(page, "txt2img_width", "64")
        set_number(page, "txt2img_height", "64")
        set_number(page, "txt2img_steps", "4")

        open_accordion(page)
        set_enabled(page, True)
        page.locator("#oms_prompt textarea").fill(OMS_PROMPT)
        for width in WIDTHS:
            guarded(
                f"{width} px layout",
                lambda w=width: check_layout(page, w, args.screenshots, name, check),
            )
        page.set_viewport_size({"width": WIDTHS[0], "height": 1400})
        page.wait_for_timeout(500)
        guarded(
            "module notes", lambda: check_notes(page, modules, args.module, args.skip_module, check)
        )
        if args.other_checkpoint:
            guarded(
                "checkpoint switch",
                lambda: check_checkpoint_switch(
                    page,
                    args.skip_module,
                    args.other_checkpoint,
                    page.request.get(f"{url}/sdapi/v1/options").json()["sd_model_checkpoint"],
                    check,
                ),
            )

        def skipped_run() -> None:
            choose(page, "oms_module", args.skip_module)
            info = generate(page, args.timeout)
            comments = page.locator("#html_log_txt2img .comments").first
            shown = comments.count() > 0 and comments.is_visible()
            text = comments_text(page)
            line = next((t for t in text.splitlines() if SKIP_COMMENT in t), "")
            check(
                f"{args.skip_module}: '{SKIP_COMMENT} ...' shows under the result",
                shown and bool(line),
                line or text[:200],
            )
            check(f"{args.skip_module}: infotext says 'OMS skipped'", "OMS skipped: " in info)

        guarded("skipped generation", skipped_run)

        choose(page, "oms_module", args.module)
        set_number(page, "oms_cfg", OMS_CFG)
        on_info = generate(page, args.timeout)
        check("OMS on: infotext has 'OMS: True'", "OMS: True" in on_info, on_info[-300:])
        check(
            "OMS on: OMS prompt and CFG recorded",
            f"OMS prompt: {OMS_PROMPT}" in on_info and f"OMS CFG: {float(OMS_CFG)}" in on_info,
        )
        check("OMS on: module recorded", "OMS module: " in on_info)
        under = comments_text(page)
        check(
            "OMS on: nothing about OMS under the result",
            "OMS" not in under and "One More Step" not in under,
            under[:200],
        )

        # Reset the accordion, turn it off, generate, then paste the OMS-on infotext back.
        page.locator("#oms_prompt textarea").fill("")
        set_number(page, "oms_cfg", "7")
        choose(page, "oms_module", "Auto")
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

        page.locator("#txt2img_prompt textarea").fill(IMAGE_PROMPT)
        page.set_viewport_size({"width": PAGE_WIDTH, "height": 1400})
        guarded(
            "preview",
            lambda: check_preview(page, args.module, args.timeout, args.screenshots, name, check),
        )
        guarded("settings", lambda: check_settings(page, args.screenshots, name, check))
        browser.close()

    failed = [name for name, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
