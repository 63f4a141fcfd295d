"""Device and dtype resolution: what every command resolves the same way."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from nanogpt.device import cpu_has_native_bf16, device_name, device_type, resolve_device, resolve_dtype
from nanogpt.errors import NanoGPTError

# /proc/cpuinfo as these CPUs print it (the flags cut to what matters here)
ZEN4 = "model name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz\nflags\t\t: avx2 avx512f avx512cd avx512bw avx512_vnni\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16\n"


@pytest.mark.parametrize(
    "cpuinfo, native",
    [(ZEN4, True), (SAPPHIRE_RAPIDS, True), (SKYLAKE, False), (GRAVITON, False), ("", False)],
    ids=["zen4", "sapphire-rapids", "skylake", "arm", "no-cpuinfo"],
)
def test_auto_dtype_on_cpu_is_bf16_exactly_where_the_cpu_flags_say_native(monkeypatch, cpuinfo, native):
    """AVX512-BF16 or AMX: bf16; AVX-512 without them, another architecture or no /proc/cpuinfo: float32."""
    monkeypatch.setattr("nanogpt.device._cpuinfo", lambda: cpuinfo)
    assert cpu_has_native_bf16() is native
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_dtype("float32", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_the_cpu_is_named_by_its_model_name_line(monkeypatch):
    monkeypatch.setattr("nanogpt.device._cpuinfo", lambda: SAPPHIRE_RAPIDS)
    assert device_name("cpu") == "Intel(R) Xeon(R) Platinum 8488C"


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or platform.machine() != "x86_64", reason="x86 Linux")
def test_the_cpuinfo_reading_agrees_with_torchs_own_cpuid_check():
    """Two ways to ask this machine: the kernel's flags and PyTorch's CPUID query (what oneDNN uses)."""
    by_cpuid = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() == by_cpuid


def test_a_dtype_that_does_not_exist_is_a_clear_error():
    with pytest.raises(NanoGPTError, match="dtype must be"):
        resolve_dtype("float8", "cpu")


def test_unknown_or_absent_devices_are_clear_errors():
    with pytest.raises(NanoGPTError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(NanoGPTError, match="not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"


def test_device_type_names_the_kind_of_device():
    assert (
        device_type("cuda:1") == "cuda"
        and device_type("cpu") == "cpu"
        and device_type(torch.device("mps")) == "mps"
    )
