"""tools/gpu_check.py: without a GPU it skips cleanly; its CPU-runnable checks pass here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the checks run")
def test_without_cuda_every_check_is_skipped_and_it_exits_0(capsys):
    assert gpu_check.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("SKIP") for line in lines)


def test_the_cpu_runnable_checks_pass_on_the_test_module(capsys):
    assert gpu_check.main(["--device", "cpu", "--tiny"]) == 0
    out = capsys.readouterr().out
    for name in (
        "precision bfloat16",
        "autocast around OMS in fp32",
        "manual_cast fp16 around OMS in fp32",
        "out of memory",
    ):
        assert f"PASS {name}:" in out
    assert "FAIL" not in out
