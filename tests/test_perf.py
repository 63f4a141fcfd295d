"""What makes a device fast and how fast it is (nanogpt/perf.py): compile settings, the allocator, the
measured matmul peak, the generation timer."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from nanogpt import GPT, GPTConfig
from nanogpt.perf import (
    generation_tokens_per_second,
    keep_freed_memory,
    matmul_peak_flops,
    wants_compile,
)


@pytest.mark.parametrize(
    "asked, device, max_seconds, compiles",
    [
        (None, "cpu", 0, False),  # no budget: the run may be too short to pay a cold compile back
        (None, "cpu", 120, False),
        (None, "cpu", 600, True),
        (None, "cuda:1", 0, True),
        (True, "cpu", 0, True),
        (False, "cuda", 600, False),
        (False, "cpu", 600, False),
    ],
)
def test_compile_is_as_asked_else_on_cuda_and_long_cpu_budgets(asked, device, max_seconds, compiles):
    """(compile_options reaches torch.compile in test_trainer's compiled run, which fails on an option
    inductor does not know.)"""
    assert wants_compile(asked, device, max_seconds) is compiles


class FakeLibc:
    """ctypes.CDLL("libc.so.6") as keep_freed_memory sees it: records mallopt(param, value) calls."""

    def __init__(self, ok: int = 1):
        self.calls, self.ok = [], ok

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.ok


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_malloc_keeps_freed_memory_for_cpu_runs_and_is_left_alone_for_gpu_runs(monkeypatch):
    """M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1) of <malloc.h> raised to 1 GiB for a CPU run; a GPU
    run never touches libc; a failing mallopt or another C library (no libc.so.6) reports False."""
    keep = keep_freed_memory.__wrapped__  # uncached
    libc = FakeLibc()
    monkeypatch.setattr("nanogpt.perf.ctypes.CDLL", lambda name: libc)
    assert keep("cuda:0") is False and libc.calls == []
    assert keep("cpu") is True and libc.calls == [(-3, 1 << 30), (-1, 1 << 30)]
    monkeypatch.setattr("nanogpt.perf.ctypes.CDLL", lambda name: FakeLibc(ok=0))
    assert keep("cpu") is False

    def musl(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr("nanogpt.perf.ctypes.CDLL", musl)
    assert keep("cpu") is False


ALLOCATION_FAULTS = """
import resource, statistics, sys, torch
from nanogpt.perf import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory("cpu")
def faults_of_one_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)  # 64 MiB: above 32 MiB glibc always maps a block afresh and unmaps it on free
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# kept, the heap grows for the first few blocks (where each lands varies) until freed ones coalesce
# into one that fits the next: the median of 9 after 8 is that settled state
[faults_of_one_block() for _ in range(8)]
print(statistics.median(faults_of_one_block() for _ in range(9)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_kept_freed_memory_is_reused_without_page_faults():
    """By default glibc hands a large freed block back to the OS, and the next one is faulted in page
    by page (16,384 faults for 64 MiB); kept, it is reused (a fresh process each: the setting is
    process-wide). Activations of a GPT-2-sized model are such blocks; for small models glibc's
    adaptive threshold decides, which varies with the machine's kernels (benchmarks/bench_train.py
    --glibc-default shows the effect on a step)."""
    faults = {
        mode: float(
            subprocess.run(
                [sys.executable, "-c", ALLOCATION_FAULTS, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "keep")
    }
    assert faults["keep"] < faults["default"] / 100, faults


@pytest.fixture
def fake_matmuls(monkeypatch):
    """The sizes matmul_peak_flops asks for, with 1 x 1 stand-ins so that nothing large is multiplied;
    each product "takes" the next of the seconds given to set()."""
    sizes, seconds = [], []
    monkeypatch.setattr("nanogpt.perf.torch.randn", lambda n, m, **kw: sizes.append(n) or torch.zeros(1, 1))
    monkeypatch.setattr("nanogpt.perf._time_matmul", lambda a, b, device: seconds.pop(0))
    return sizes, seconds


def test_matmul_peak_grows_the_size_only_while_a_matmul_is_quick(fake_matmuls):
    """The size doubles from 256 to 2048 on a CPU, unless a dtype is so slow (emulated float16: ~2
    GFLOP/s, over a minute at 2048) that a small size already takes max_matmul_seconds."""
    sizes, seconds = fake_matmuls
    measure = matmul_peak_flops.__wrapped__  # uncached
    seconds += [0.5, 0.5]  # 256 already too slow: measured there
    assert measure("cpu", torch.float16, repeats=1, max_matmul_seconds=0.05) == 2 * 256**3 / 0.5
    assert sizes == [256, 256]  # a and b, once
    sizes.clear()
    seconds += [0.001, 0.008, 0.06, 0.06]  # 1024 takes over 0.05 s: stops there
    measure("cpu", torch.float32, repeats=1, max_matmul_seconds=0.05)
    assert sizes[::2] == [256, 512, 1024]
    sizes.clear()
    seconds += [0.0] * 4 + [1e-3]
    measure("cpu", torch.float32, repeats=1, max_matmul_seconds=math.inf)
    assert sizes[::2] == [256, 512, 1024, 2048]  # the CPU's largest


def test_matmul_peak_is_2_n_cubed_over_the_fastest_run(fake_matmuls):
    """An n x n by n x n product is n^3 multiply-adds; the peak is the fastest of the repeats."""
    _, seconds = fake_matmuls
    seconds += [0.001, 0.002, 0.004, 0.008, 0.009, 0.007, 0.012]  # sizes 256..2048, then 3 repeats
    assert matmul_peak_flops.__wrapped__("cpu", torch.float32, repeats=3) == 2 * 2048**3 / 0.007


def test_matmul_peak_repeats_stop_once_they_have_taken_long_enough(fake_matmuls):
    """A CPU's 2048 matmul takes ~0.2 s: 3 repeats, not 10; a GPU's take ~1 ms: all 10."""
    _, seconds = fake_matmuls
    measure = matmul_peak_flops.__wrapped__
    seconds += [0.0] * 4 + [0.3, 0.2, 0.25] + [9.0]  # the sizes, then 3 repeats reach 0.5 s: 9.0 not used
    assert measure("cpu", torch.float32) == 2 * 2048**3 / 0.2
    assert seconds == [9.0]
    seconds.clear()
    seconds += [0.0] * 4 + [0.001] * 9 + [0.0005]  # all 10 repeats: the last is the fastest
    assert measure("cpu", torch.float32) == 2 * 2048**3 / 0.0005 and seconds == []


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_timer_counts_all_sequences(use_cache, monkeypatch):
    """tokens/s = batch x new tokens / the median wall time of the generate() runs."""
    model = GPT(GPTConfig(block_size=16, vocab_size=10, n_layer=1, n_head=1, n_embd=8)).eval()
    calls = []

    def generate(model, idx, max_new_tokens, **kwargs):
        calls.append((idx.shape, max_new_tokens, kwargs["use_cache"]))
        return model.generate(idx, max_new_tokens)

    monkeypatch.setattr("nanogpt.perf.generate", generate)
    clock = iter([0.0, 2.0, 10.0, 11.0, 20.0, 24.0])  # three timed runs: 2 s, 1 s, 4 s -> median 2 s
    monkeypatch.setattr("nanogpt.perf.time.perf_counter", lambda: next(clock))
    assert generation_tokens_per_second(model, 4, 12, use_cache, repeats=3) == pytest.approx(4 * 12 / 2.0)
    assert calls[0] == (torch.Size([4, 1]), 8, use_cache)  # the untimed warm-up
    assert calls[1:] == [(torch.Size([4, 1]), 12, use_cache)] * 3
