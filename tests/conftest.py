"""Shared test set-up: offline, CPU, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


import pytest


@pytest.fixture
def forge_backend(monkeypatch):
    """Forge's memory manager (stand-in, see tests/webui_standins.py) as ``backend``."""
    from tests import webui_standins as wi

    manager = wi.ForgeMemoryManagement()
    manager.install(monkeypatch)
    return manager


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A WebUI models folder holding the tiny test module as models/oms/oms_tiny."""
    from tests import webui_standins as wi

    root = tmp_path_factory.mktemp("models")
    wi.install_tiny_module(root / "oms")
    return root
