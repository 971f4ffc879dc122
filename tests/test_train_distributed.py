"""The trainer under ``accelerate launch`` with two CPU processes (gloo) makes the module one
process makes with the same global batch (there: two accumulated micro-batches), with square
crops and with aspect-ratio buckets (both processes take each step's batch from one bucket)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oms_ext.train import module_config
from oms_ext.train.cli import main
from oms_ext.unet import build_unet
from tests.train_helpers import (  # noqa: F401
    RESOLUTION,
    TINY_ENCODER,
    one_thread,
    tiny_vae_folder,
    write_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = {"a": "a dark room", "b": "a bright beach", "c": "a red car", "d": "a blue sky"}
WEIGHTS = Path("mine") / "oms_module" / "diffusion_pytorch_model.safetensors"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tmp_path: Path, out: Path) -> list[str]:
    return [
        "--data", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "vae"),
        "--encoder", str(TINY_ENCODER), "--size", "tiny", "--output-dir", str(out),
        "--name", "mine", "--cache-dir", str(tmp_path / "cache"), "--resolution",
        str(RESOLUTION), "--steps", "3", "--batch-size", "4", "--learning-rate", "1e-3",
        "--preview-every", "0", "--save-every", "0", "--cpu",
    ]  # fmt: skip


def _one_and_two_processes(tmp_path: Path, *extra: str) -> str:
    """Train with one process (two accumulated micro-batches) into one/ and with two under
    accelerate launch into two/; returns the two-process run's stdout."""
    assert main([*_args(tmp_path, tmp_path / "one"), *extra, "--grad-accum", "2"]) == 0
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "oms_ext.train", *_args(tmp_path, tmp_path / "two"), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es) x 2 x 1 accumulation" in run.stdout
    return run.stdout


def _assert_same_trained_module(tmp_path: Path) -> None:
    one = load_file(str(tmp_path / "one" / WEIGHTS))
    two = load_file(str(tmp_path / "two" / WEIGHTS))
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
    torch.manual_seed(0)  # the run's seed: the weights both started from
    start = build_unet(module_config("tiny", 32)).state_dict()
    assert max(float((start[k] - two[k]).abs().max()) for k in start) > 1e-4  # they trained


def test_two_processes_train_what_one_does_with_the_same_global_batch(tmp_path: Path) -> None:
    write_images(tmp_path / "data", CAPTIONS)
    tiny_vae_folder(tmp_path / "vae")
    _one_and_two_processes(tmp_path)
    _assert_same_trained_module(tmp_path)


def test_with_buckets_two_processes_agree_on_each_steps_bucket(tmp_path: Path) -> None:
    write_images(tmp_path / "data", CAPTIONS, size=(200, 200))
    write_images(tmp_path / "data" / "wide", CAPTIONS, size=(300, 150))
    tiny_vae_folder(tmp_path / "vae")
    out = _one_and_two_processes(tmp_path, "--buckets", "--resolution", "192")
    assert "buckets: 192x192 x 4, 256x128 x 4 (2 steps an epoch" in out
    _assert_same_trained_module(tmp_path)
