"""Where and in what precision a model runs: the device ("auto": cuda > mps > cpu), the dtype ("auto": the
fastest one that changes results only by bf16 rounding), the autocast context, and the device's measured
matmul peak (for MFU). Every command resolves these here, the same way."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from nanogpt.errors import NanoGPTError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """ "auto" -> cuda, else mps, else cpu; under torchrun a bare "cuda" is this process's LOCAL_RANK GPU.
    A device that is not on this machine is an error."""
    if device == "auto":
        device = (
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise NanoGPTError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto") from None
    if (kind == "cuda" and not torch.cuda.is_available()) or (
        kind == "mps" and not torch.backends.mps.is_available()
    ):
        raise NanoGPTError(f"device {device!r} is not available on this machine: use --device=cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run ~2x (AVX512-BF16 on Zen 4) to 3x+ (AMX) float32. Without
    them bf16 is emulated and slower. Without /proc/cpuinfo there is no cheap way to tell: float32 then."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_name(device: str) -> str:
    """What benchmarks report the hardware as: the GPU's name, or the CPU's model name (Linux), else its
    architecture."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or device


def check_dtype(dtype: str) -> None:
    if dtype != "auto" and dtype not in DTYPES:
        raise NanoGPTError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")


def resolve_dtype(dtype: str, device: str) -> str:
    """ "auto" -> bfloat16 on a GPU that has it (float16 + a gradient scaler on older ones) and on a CPU
    with native bf16 (1.6x the float32 training step of the shakespeare_char_cpu model, 1.8x at n_embd
    256 on a Zen 4: benchmarks/bench_train.py); float32 elsewhere."""
    check_dtype(dtype)
    if dtype != "auto":
        return dtype
    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """The precision context for forward passes: plain float32, or mixed precision via torch.autocast."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


@functools.cache
def keep_freed_memory(device: str) -> bool:
    """On a CPU device, tell glibc's malloc to keep freed memory for reuse instead of handing it back
    to the OS (GPU activations live in PyTorch's own caching allocator already).

    By default, blocks above a threshold (128 KiB, raised adaptively up to 32 MiB) are mapped afresh
    and trimmed back on free. A CPU training step frees and re-allocates megabytes of activations, so
    each step can cost thousands of page faults: always for blocks over 32 MiB (a GPT-2-sized model's
    activations), and for smaller ones as the adaptive threshold falls out on the machine (2,900 per
    step for the shakespeare_char_cpu model on an AMD Zen 4, 7 with this: 10-20% of a bf16 step).
    Returns whether it applied (Linux with glibc only; once per process)."""
    if torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): leave it alone
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def one_position_kernels(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The context for one decoding step (one position per sequence: many tiny ops). On a CPU in float32
    it switches PyTorch from oneDNN's kernels to its own, process-wide while inside: oneDNN's per-call
    setup costs more than such small work (a GELU of 512 values takes 8-24 us through oneDNN, 1.5 us
    without; the cached decoding step of the shakespeare_char_cpu model is 15% faster). float32 matmuls
    use BLAS either way; bf16 (weights or autocast) keeps oneDNN, which its matmuls need."""
    if device.type != "cpu" or dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return contextlib.nullcontext()
    return _onednn_disabled()


@contextlib.contextmanager
def _onednn_disabled() -> Iterator[None]:
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def wants_compile(compile: bool | None, device: str) -> bool:
    """Whether to torch.compile: as asked, else (None) on CUDA only. A CPU compile takes ~60 s cold (7 s
    from inductor's cache) and pays back only over long runs."""
    return compile if compile is not None else torch.device(device).type == "cuda"


def compile_options(device: str) -> dict[str, bool]:
    """Inductor options for torch.compile(..., options=...). On a CPU its C++ wrapper calls the generated
    kernels without a Python frame each: the shakespeare_char_cpu training step ~10% faster
    (benchmarks/bench_train.py). Untested on GPUs here, so they keep inductor's defaults."""
    return {"cpp_wrapper": True} if torch.device(device).type == "cpu" else {}


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a timer measures it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def matmul_peak_flops(device: str, dtype: torch.dtype, repeats: int = 10, max_seconds: float = 0.05) -> float:
    """FLOP/s of the fastest of `repeats` square matmuls, large enough to reach the device's peak: what
    MFU is measured against on this machine (once per process). The size doubles from 256 up to 8192 on
    a GPU (2048 on a CPU), or until one matmul takes max_seconds: a dtype the device only emulates
    (float16 on most CPUs, ~2 GFLOP/s) is measured in a second instead of minutes."""
    largest = 8192 if torch.device(device).type == "cuda" else 2048
    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm up: library dispatch, thread pool, clocks
        seconds = _time_matmul(a, b, device)
        if n >= largest or seconds > max_seconds:
            break
        n *= 2
    best = min(_time_matmul(a, b, device) for _ in range(repeats))
    return 2 * n**3 / best


def _time_matmul(a: torch.Tensor, b: torch.Tensor, device: str) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    a @ b
    synchronize(device)
    return time.perf_counter() - t0
