"""Where and in what precision a model runs: the device ("auto": cuda > mps > cpu), the dtype ("auto": the
fastest one that changes results only by bf16 rounding) and the autocast context. Every command resolves
these here, the same way. (What makes a device fast, and how fast it is: nanogpt/perf.py.)"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path
from typing import Literal

import torch

from nanogpt.errors import NanoGPTError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# how every config spells a precision: "auto" or a DTYPES name
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]


def device_type(device: str | torch.device) -> str:
    """ "cuda:1" -> "cuda": the kind of device, which decides kernels, autocast and the gradient scaler."""
    return torch.device(device).type


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
    if device_type(device) == "cuda":
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
    kind = device_type(device)
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """The precision context for forward passes: plain float32, or mixed precision via torch.autocast."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=DTYPES[dtype])


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a timer measures it (a no-op on the CPU)."""
    if device_type(device) == "cuda":
        torch.cuda.synchronize(device)
