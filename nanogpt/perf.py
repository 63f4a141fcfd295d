"""What makes training and decoding fast on this machine, and how fast it is: glibc's allocator kept from
unmapping freed memory (CPU), torch.compile's settings per device, and the measured matmul peak that MFU is
reported against (on every device: the fraction of what this device actually does, not of a datasheet), and
the generation throughput every benchmark and the experiment runner time."""

from __future__ import annotations

import ctypes
import functools
import statistics
import sys
import time

import torch

from nanogpt.device import autocast, device_type, synchronize
from nanogpt.generate import generate
from nanogpt.model import GPT


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
    if device_type(device) != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): leave it alone
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


# seconds of wall clock from which a CPU run with a budget compiles by default. Measured on a 2-core Zen 4
# (shakespeare_char_cpu_modern): a cold compile costs ~45 s (1.5 s from inductor's cache) and makes each
# step 1.49x faster (225 vs 336 ms), so it pays back from ~140 s cold; 300 leaves room for slower CPUs.
CPU_COMPILE_BUDGET_S = 300.0


def wants_compile(compile: bool | None, device: str, max_seconds: float = 0.0) -> bool:
    """Whether to torch.compile: as asked, else (None) on CUDA, and on a CPU for a run with a wall-clock
    budget of at least CPU_COMPILE_BUDGET_S. A CPU run without a budget stays eager: its length is unknown
    and a short one would spend most of its time compiling."""
    if compile is not None:
        return compile
    return device_type(device) == "cuda" or max_seconds >= CPU_COMPILE_BUDGET_S


def compile_options(device: str) -> dict[str, bool]:
    """Inductor options for torch.compile(..., options=...). On a CPU its C++ wrapper calls the generated
    kernels without a Python frame each: the shakespeare_char_cpu training step ~10% faster
    (benchmarks/bench_train.py). Untested on GPUs here, so they keep inductor's defaults."""
    return {"cpp_wrapper": True} if device_type(device) == "cpu" else {}


@functools.cache
def matmul_peak_flops(
    device: str,
    dtype: torch.dtype,
    repeats: int = 10,
    max_matmul_seconds: float = 0.05,
    max_repeat_seconds: float = 0.5,
) -> float:
    """FLOP/s of the fastest of `repeats` square matmuls, large enough to reach the device's peak: what
    MFU is measured against on this machine (once per process). The size doubles from 256 up to 8192 on
    a GPU (2048 on a CPU), or until one matmul takes max_matmul_seconds: a dtype the device only emulates
    (float16 on most CPUs, ~2 GFLOP/s) is measured in a second instead of minutes. The repeats stop early
    once they have taken max_repeat_seconds (after 3): a CPU's 2048 matmul takes ~0.1-0.2 s, a GPU's 8192
    one ~1 ms, so a GPU runs all of them (its clocks ramp up) and a CPU's start-up stays short."""
    largest = 8192 if device_type(device) == "cuda" else 2048
    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm up: library dispatch, thread pool, clocks
        seconds = _time_matmul(a, b, device)
        if n >= largest or seconds > max_matmul_seconds:
            break
        n *= 2
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < max_repeat_seconds):
        times.append(_time_matmul(a, b, device))
    return 2 * n**3 / min(times)


def _time_matmul(a: torch.Tensor, b: torch.Tensor, device: str) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    a @ b
    synchronize(device)
    return time.perf_counter() - t0


@torch.no_grad()
def generation_tokens_per_second(
    model: GPT,
    batch_size: int,
    new_tokens: int,
    use_cache: bool = True,
    dtype: str = "float32",
    repeats: int = 3,
) -> float:
    """New tokens per second (all sequences together) of nanogpt.generate.generate after a 1-token
    prompt, plain sampling at temperature 1: the median of `repeats` runs, after a short untimed warm-up."""
    device = str(next(model.parameters()).device)
    gen = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (batch_size, 1), device=device, generator=gen)
    times = []
    with autocast(device, dtype):
        generate(model, prompt, min(new_tokens, 8), use_cache=use_cache, generator=gen)
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            generate(model, prompt, new_tokens, use_cache=use_cache, generator=gen)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return batch_size * new_tokens / statistics.median(times)
