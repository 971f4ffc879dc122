"""install.py run outside A1111/Forge (ComfyUI-Manager runs a node's install.py) is harmless."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_py_outside_the_webui_installs_nothing_and_exits_cleanly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "install.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "nothing to install" in result.stdout
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == []
