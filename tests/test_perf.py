"""What makes a device fast and how fast it is (nanogpt/perf.py): compile settings, the allocator, the
measured matmul peak."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from nanogpt.perf import compile_options, keep_freed_memory, matmul_peak_flops, wants_compile


def test_compile_is_opt_in_on_cpu_and_uses_the_cpp_wrapper_there_only():
    assert not wants_compile(None, "cpu") and wants_compile(True, "cpu")
    assert wants_compile(None, "cuda:1") and not wants_compile(False, "cuda")
    assert compile_options("cpu") == {"cpp_wrapper": True}
    assert compile_options("cuda") == {}


def test_malloc_is_left_alone_for_gpu_runs():
    assert not keep_freed_memory("cuda")


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


def test_matmul_peak_grows_the_size_only_while_a_matmul_is_quick(monkeypatch):
    """The peak is measured at 2048 on a CPU, unless a dtype is so slow (emulated float16: ~2 GFLOP/s,
    over a minute at 2048) that a small size already takes max_seconds."""
    sizes = []
    randn = torch.randn

    def recording_randn(*shape, **kwargs):
        sizes.append(shape[0])
        return randn(*shape, **kwargs)

    monkeypatch.setattr("nanogpt.perf.torch.randn", recording_randn)
    measure = matmul_peak_flops.__wrapped__  # uncached
    assert measure("cpu", torch.float32, repeats=1, max_seconds=0.0) > 0
    assert sizes == [256, 256]  # a and b, once
    sizes.clear()
    assert measure("cpu", torch.float32, repeats=1, max_seconds=math.inf) > 0
    assert sizes[::2] == [256, 512, 1024, 2048]
