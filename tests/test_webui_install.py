"""install.py installs only absent packages, never torch, and honours --skip-install."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installer():
    spec = importlib.util.spec_from_file_location("oms_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_launch(present: set[str], skip: bool = False):
    calls: list[str] = []
    return SimpleNamespace(
        args=SimpleNamespace(skip_install=skip),
        is_installed=lambda name: name in present,
        run_pip=lambda command, desc: calls.append(command),
        calls=calls,
    )


def test_only_absent_packages_are_installed(installer):
    launch = fake_launch({"safetensors", "transformers", "ftfy"})
    installer.install(launch)
    assert launch.calls == ['install "huggingface_hub<1"']


def test_nothing_is_installed_when_everything_is_present(installer):
    launch = fake_launch({"safetensors", "transformers", "huggingface_hub", "ftfy"})
    assert installer.install(launch) == [] and launch.calls == []


def test_skip_install_is_honoured(installer):
    launch = fake_launch(set(), skip=True)
    assert installer.install(launch) == [] and launch.calls == []


def test_torch_is_never_installed(installer):
    launch = fake_launch(set())
    installer.install(launch)
    assert not any("torch" in call for call in launch.calls)
