"""The "auto" precision choice: bf16 on the CPU only with bf16 matrix instructions, never fp16."""

import pytest
import torch

from oms_ext import precision

ZEN4_FLAGS = "fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
SKYLAKE_FLAGS = "fpu vme sse sse2 avx avx2 avx512f avx512bw avx512vl avx512_vnni"
CPUINFO_X86 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
    f"flags\t\t: {ZEN4_FLAGS}\n\nprocessor\t: 1\nflags\t\t: fpu\n"
)
CPUINFO_ARM = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd bf16 sve\n"


def test_cpuinfo_flags_reads_the_first_processor_x86_and_arm() -> None:
    assert precision.cpuinfo_flags(CPUINFO_X86) == frozenset(ZEN4_FLAGS.split())
    assert precision.cpuinfo_flags(CPUINFO_ARM) == {"fp", "asimd", "bf16", "sve"}
    assert precision.cpuinfo_flags("processor\t: 0\n") == frozenset()


@pytest.mark.parametrize(
    ("flags", "onednn", "fast"),
    [
        (ZEN4_FLAGS.split(), True, True),
        (["avx512f", "amx_tile", "amx_bf16"], True, True),
        (SKYLAKE_FLAGS.split(), True, False),  # AVX-512 without BF16: emulated, not faster
        (["fp", "asimd", "bf16"], True, False),  # arm64's bf16 flag is not one we trust
        (ZEN4_FLAGS.split(), False, False),  # no oneDNN, no fast bf16 kernels
    ],
)
def test_bf16_is_fast_needs_bf16_matrix_instructions_and_onednn(
    flags: list[str], onednn: bool, fast: bool
) -> None:
    assert precision.bf16_is_fast(flags, onednn=onednn) is fast


@pytest.fixture
def fresh_detection(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """cpu_bf16_is_fast re-detected from a fake /proc/cpuinfo and a fake torch probe."""
    precision.cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    yield tmp_path / "cpuinfo"
    precision.cpu_bf16_is_fast.cache_clear()


def test_detection_reads_proc_cpuinfo(fresh_detection, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_detection.write_text(CPUINFO_X86)
    monkeypatch.setattr(precision, "CPUINFO", fresh_detection)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert precision.cpu_bf16_is_fast() is True


def test_detection_uses_torch_where_there_is_no_proc_cpuinfo(
    fresh_detection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision, "CPUINFO", fresh_detection)  # does not exist
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert precision.cpu_bf16_is_fast() is True
    precision.cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert precision.cpu_bf16_is_fast() is False


def test_detection_result_is_cached(fresh_detection, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_detection.write_text(CPUINFO_X86)
    monkeypatch.setattr(precision, "CPUINFO", fresh_detection)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert precision.cpu_bf16_is_fast() is True
    fresh_detection.write_text(CPUINFO_ARM)
    assert precision.cpu_bf16_is_fast() is True


@pytest.mark.parametrize("fast", [True, False])
def test_auto_dtype_cpu_is_bf16_only_when_fast_and_never_fp16(
    monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: fast)
    expected = torch.bfloat16 if fast else torch.float32
    assert precision.auto_dtype("cpu") == expected
    assert precision.auto_dtype(torch.device("cpu")) == expected


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "xpu"])
def test_auto_dtype_is_fp16_on_gpus(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: True)
    assert precision.auto_dtype(device) == torch.float16


def test_convert_state_fp16_to_bf16_in_slices_equals_direct_conversion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "CONVERT_SLICE", 1000)  # several slices per tensor
    gen = torch.Generator().manual_seed(0)
    state = {
        "w": (torch.randn(7, 300, generator=gen) * 100).half(),  # 2100 elements: 3 slices
        "b": torch.randn(5, generator=gen).half(),
        "ids": torch.arange(77)[None],
    }
    state["w"][0, :4] = torch.tensor([65504.0, -0.0, 6e-8, float("inf")]).half()
    out = precision.convert_state(state, torch.bfloat16)
    for name in ("w", "b"):
        assert out[name].dtype == torch.bfloat16 and out[name].shape == state[name].shape
        assert torch.equal(out[name], state[name].to(torch.bfloat16))
    assert out["ids"].dtype == torch.int64 and torch.equal(out["ids"], state["ids"])


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float16])
def test_convert_state_always_copies(dtype: torch.dtype | None) -> None:
    state = {"w": torch.randn(3, 4).half(), "ids": torch.arange(3)}
    out = precision.convert_state(state, dtype)
    for name, tensor in state.items():
        assert out[name].data_ptr() != tensor.data_ptr()
        expected = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert out[name].dtype == expected.dtype and torch.equal(out[name], expected)
