"""Installs the Python packages One More Step needs that the WebUI does not already have.

Run by the WebUI at start-up (as a script, in a subprocess). Only ABSENT packages are
installed (an installed one is never upgraded or downgraded, so the WebUI's pins stay as they
are), torch is never installed, and ``--skip-install`` is honoured. Every supported WebUI
already ships all of them; this only matters for trimmed-down installs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

#: import name -> pip requirement used when the package is missing.
REQUIREMENTS = {
    "safetensors": "safetensors>=0.4",
    "huggingface_hub": "huggingface_hub<1",
    "transformers": "transformers>=4.30,<5",
    # transformers' CLIP tokenizer normalises a prompt's text (curly quotes, ligatures, HTML
    # entities) as CLIP and OpenCLIP were trained only when ftfy is installed.
    "ftfy": "ftfy",
}


def missing_requirements(is_installed: Callable[[str], bool]) -> list[str]:
    """The pip requirements of the packages ``is_installed`` reports absent."""
    return [req for name, req in REQUIREMENTS.items() if not is_installed(name)]


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def install(launch) -> list[str]:
    """Install what is missing with the WebUI's ``launch`` helpers; returns what was asked."""
    if getattr(getattr(launch, "args", None), "skip_install", False):
        return []
    if not _installed("torch"):
        print("[OMS] torch is missing; One More Step uses the WebUI's torch and never installs it")
    todo = missing_requirements(getattr(launch, "is_installed", _installed))
    for requirement in todo:
        launch.run_pip(f'install "{requirement}"', f"One More Step requirement: {requirement}")
    return todo


def main() -> None:
    """Run by the WebUI (its root on PYTHONPATH, so ``launch`` imports); run anywhere else
    (ComfyUI-Manager runs a node's install.py) it installs nothing: ComfyUI already has every
    package the nodes need."""
    try:
        import launch
    except ImportError:
        print("[OMS] install.py: not run by AUTOMATIC1111/Forge, nothing to install")
        return
    install(launch)


if __name__ == "__main__":
    main()
