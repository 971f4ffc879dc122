"""tools/webui_api_check.py tells a working OMS from one that is off, and brings the module its
checks choose by name."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("api_check", ROOT / "tools" / "webui_api_check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


class _WebUI:
    """Answers txt2img like a WebUI: one seed for the batch under a variation strength, an image
    per variation seed; OMS changes the images and says so in the infotext when it works."""

    def __init__(self, oms_works: bool) -> None:
        self.oms_works = oms_works

    def txt2img(self, oms, batch_size=1, subseed=0, subseed_strength=0.0, **_):
        on = self.oms_works and bool(oms and oms.get("enabled"))
        images = [f"{on}-{subseed + i}".encode() for i in range(batch_size)]
        text = "a candle\nSteps: 4, Seed: 1" + (", OMS alpha_bar0: 0.0047" if on else "")
        return {
            "images": [base64.b64encode(image).decode() for image in images],
            "info": {"all_seeds": [1] * batch_size, "infotexts": [text] * batch_size},
        }


def test_the_variation_check_passes_only_when_oms_applies():
    assert check.check_variation_seeds(_WebUI(oms_works=True)).startswith("PASS")
    assert check.check_variation_seeds(_WebUI(oms_works=False)).startswith("FAIL")


def test_the_checks_bring_the_module_they_choose_and_take_it_away(tmp_path):
    made = check.prepare(tmp_path)
    assert (tmp_path / check.MODULE / "oms_module" / "config.json").is_file()
    check.clean_up(made)
    assert list(tmp_path.iterdir()) == []
