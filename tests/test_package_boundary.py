"""The core package stays free of WebUI imports."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_oms_ext_loads_no_webui_or_gradio_module() -> None:
    code = (
        "import sys, importlib, pkgutil, oms_ext\n"
        "for m in pkgutil.walk_packages(oms_ext.__path__, 'oms_ext.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in "
        "('modules', 'backend', 'gradio', 'launch', 'ldm_patched')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
