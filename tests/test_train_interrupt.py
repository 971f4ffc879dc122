"""Ctrl-C through the command line: ``python -m oms_ext.train`` stopped by SIGINT mid-run says
where its checkpoint is, without a traceback, exits with 130, and ``--resume`` from that
checkpoint finishes the run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oms_ext.loading import training_facts
from oms_ext.train.cli import EXIT_INTERRUPTED, main
from oms_ext.train.trainer import latest_checkpoint
from tests.train_helpers import (  # noqa: F401
    RESOLUTION,
    TINY_ENCODER,
    one_thread,
    tiny_vae_folder,
    write_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = {"dark": "a dark room", "bright": "a bright beach", "red": "a red car"}
#: More steps than the run can make before it is interrupted.
STEPS = 100_000
INTERRUPTED = re.compile(
    r"^Interrupted after step (\d+): checkpoint (\S+); continue with --resume (\S+)$", re.M
)


def _args(tmp_path: Path, steps: int) -> list[str]:
    return [
        "--data", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "vae"),
        "--encoder", str(TINY_ENCODER), "--size", "tiny", "--output-dir", str(tmp_path / "out"),
        "--name", "mine", "--cache-dir", str(tmp_path / "cache"), "--resolution",
        str(RESOLUTION), "--steps", str(steps), "--batch-size", "2", "--learning-rate", "1e-3",
        "--preview-every", "2", "--save-every", "0", "--cpu",
    ]  # fmt: skip


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def test_ctrl_c_leaves_a_checkpoint_that_resume_finishes(tmp_path: Path) -> None:
    write_images(tmp_path / "data", CAPTIONS)
    tiny_vae_folder(tmp_path / "vae")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "oms_ext.train", *_args(tmp_path, STEPS)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(tmp_path / "out" / "previews" / "step-000002.png", process, timeout=120)
        process.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    found = INTERRUPTED.search(stdout)
    assert found, stdout[-2000:]
    step, checkpoint, resume = int(found[1]), Path(found[2]), found[3]
    assert 2 <= step < STEPS and str(checkpoint) == resume
    assert checkpoint == latest_checkpoint(tmp_path / "out")
    assert checkpoint.name == f"step-{step:06d}.safetensors"
    assert not (tmp_path / "out" / "mine").exists()  # no module from an interrupted run
    assert main([*_args(tmp_path, step + 2), "--resume", resume]) == 0
    assert training_facts(tmp_path / "out" / "mine")["steps"] == step + 2


def test_ctrl_c_before_the_first_step_says_so_in_one_line(tmp_path: Path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("oms_ext.train.data.scan_folder", interrupted)
    write_images(tmp_path / "data", CAPTIONS)
    assert main(_args(tmp_path, 2)) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err == "oms_ext.train: interrupted before training started\n"
