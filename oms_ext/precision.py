"""Which precision OMS computes in when the user leaves it on "auto".

What "auto" should do (:func:`auto_dtype`):

* on a GPU (CUDA, ROCm, MPS, XPU, ...): float16, as the WebUIs run their own models;
* on the CPU: bfloat16 where :func:`cpu_bf16_is_fast` says the CPU multiplies bf16 matrices
  in hardware (x86 with AVX512-BF16 or AMX-BF16), else float32. float16 is never used on the
  CPU: PyTorch's CPU kernels have no fast fp16 path on common processors, so it is slower than
  fp32 there.

The text encoder OMS loads runs on the module's device in the module's dtype.

Why bf16 only with those instructions: OMS is almost all convolutions and matrix products,
which oneDNN runs about twice as fast in bf16 as in fp32 when the CPU has bf16 dot-product
instructions; the OMS-B module took 0.56-0.58x its fp32 time on a Zen 4 CPU
(``tools/benchmark.py`` measures it). Without them (AVX2, or AVX-512 without BF16) bf16
products are emulated through fp32 conversions: no faster, and less precise. Accuracy: the
normalisations and the attention softmax accumulate in fp32 inside PyTorch's bf16 CPU kernels;
on the test fixture the bf16 start latent lies 6e-4 (relative) from the fp32 one, the module's
prediction 2e-2.

Also here: :func:`convert_state`, the one conversion pass the loaders make over weights.

Pure PyTorch and standard library; no WebUI import.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

#: /proc/cpuinfo flags of x86 instructions that multiply bf16 matrices natively. Every CPU
#: with AMX-BF16 also has AVX512-BF16; both are listed in case a hypervisor hides one.
BF16_MATMUL_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_flags(text: str) -> frozenset[str]:
    """The feature flags of the first processor in the text of ``/proc/cpuinfo``.

    x86 kernels name the line ``flags``, arm64 kernels ``Features``; an empty set when neither
    is present.
    """
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def bf16_is_fast(flags: Iterable[str], *, onednn: bool) -> bool:
    """Whether bf16 beats fp32 on a CPU with these feature ``flags``.

    ``onednn``: PyTorch was built with oneDNN (``torch.backends.mkldnn.is_available()``), the
    library whose bf16 convolution and matrix kernels use those instructions.
    """
    return onednn and not BF16_MATMUL_FLAGS.isdisjoint(flags)


def _detected_flags() -> frozenset[str]:
    """bf16-related CPU flags from PyTorch's own CPU detection and from ``/proc/cpuinfo``.

    PyTorch's detection works on every OS but is private API (absent in older releases);
    ``/proc/cpuinfo`` exists on Linux only. The union of what either finds is returned.
    """
    found: set[str] = set()
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if callable(probe):
        with contextlib.suppress(RuntimeError):
            if probe():
                found.add("avx512_bf16")
    with contextlib.suppress(OSError):
        found |= cpuinfo_flags(CPUINFO.read_text(encoding="utf-8", errors="replace"))
    return frozenset(found)


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """True when OMS runs faster in bf16 than in fp32 on this machine's CPU.

    That is: PyTorch has oneDNN and the CPU has AVX512-BF16 or AMX-BF16 (e.g. Intel Xeon
    Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later). False on every other CPU,
    arm64 included, where fp32 stays the safe choice. Detected once per process, then cached.
    """
    return bf16_is_fast(_detected_flags(), onednn=torch.backends.mkldnn.is_available())


#: fp32 elements per slice when :func:`convert_state` turns fp16 into bf16 (16 MiB scratch).
CONVERT_SLICE = 1 << 22


def convert_state(
    state: Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Copies of the tensors in ``state``, floating-point ones converted to ``dtype`` (None:
    kept), on their own devices; for filling a model from a (memory-mapped) weight file.

    On the CPU, fp16 -> bf16 goes through fp32 in slices of :data:`CONVERT_SLICE` elements:
    PyTorch's direct fp16 -> bf16 copy is not vectorised, and the detour made loading the
    ViT-H text encoder in bf16 about 0.3 s faster (0.69 -> 0.41 s, one thread).
    """
    out: dict[str, torch.Tensor] = {}
    scratch: torch.Tensor | None = None
    for name, tensor in state.items():
        to = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        detour = tensor.device.type == "cpu" and (tensor.dtype, to) == (
            torch.float16,
            torch.bfloat16,
        )
        if not detour:
            out[name] = tensor.to(dtype=to, copy=True)
            continue
        if scratch is None:
            scratch = torch.empty(CONVERT_SLICE, dtype=torch.float32)
        result = torch.empty(tensor.shape, dtype=to)
        source, target = tensor.reshape(-1), result.view(-1)
        for start in range(0, source.numel(), CONVERT_SLICE):
            stop = min(start + CONVERT_SLICE, source.numel())
            part = scratch[: stop - start]
            part.copy_(source[start:stop])
            target[start:stop].copy_(part)
        out[name] = result
    return out


def load_state_assigned(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool
) -> tuple[list[str], list[str]]:
    """Fill ``module`` (built on the meta device) by taking the tensors of ``state`` as its
    parameters and buffers, without copies; returns its (missing, unexpected) keys.

    That is ``load_state_dict(..., assign=True)`` where torch has it (2.1+). AUTOMATIC1111 1.6
    and 1.7 ship torch 2.0.1, whose ``load_state_dict`` has no ``assign``: there each tensor is
    set on its submodule directly, with the same key and shape checks.
    """
    if "assign" in inspect.signature(module.load_state_dict).parameters:
        result = module.load_state_dict(state, strict=strict, assign=True)
        return list(result.missing_keys), list(result.unexpected_keys)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if wrong or (strict and (missing or unexpected)):
        raise RuntimeError(
            f"cannot load the state into {type(module).__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )
    for key, tensor in state.items():
        if key not in expected:
            continue
        owner, _, name = key.rpartition(".")
        sub = module.get_submodule(owner)
        if name in sub._parameters:
            old = sub._parameters[name]
            grad = old.requires_grad if old is not None else False
            sub._parameters[name] = torch.nn.Parameter(tensor, requires_grad=grad)
        else:
            sub._buffers[name] = tensor
    return missing, unexpected


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """The precision "auto" picks for OMS on ``device`` (see the module docstring).

    float16 on any non-CPU device; on the CPU bfloat16 if :func:`cpu_bf16_is_fast`, else
    float32. Never float16 on the CPU.
    """
    if torch.device(device).type != "cpu":
        return torch.float16
    return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32


__all__ = [
    "BF16_MATMUL_FLAGS",
    "auto_dtype",
    "bf16_is_fast",
    "convert_state",
    "cpu_bf16_is_fast",
    "cpuinfo_flags",
]
