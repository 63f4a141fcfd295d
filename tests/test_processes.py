"""nanogpt/processes.py: a child that calls die_with_parent ends when its parent is killed with -9, by the
kernel's parent-death signal and by the fallback parent-pid watch alike."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import process_running

# the parent: starts a forked child that arms die_with_parent (FALLBACK=1: the pid watch only), prints the
# child's pid once armed, then waits to be killed
PARENT = """
import os, sys, time
from nanogpt import processes
if os.environ.get("FALLBACK") == "1":
    processes._kernel_kills_on_parent_death = lambda: False
parent = os.getpid()
read, write = os.pipe()
child = os.fork()
if child == 0:
    processes.die_with_parent(parent)
    os.write(write, b"armed")
    while True:
        time.sleep(1)
os.read(read, 5)
print(child, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fallback", ["0", "1"])
def test_a_child_ends_within_5_s_of_its_parent_killed_with_9(fallback):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "FALLBACK": fallback},
    )
    child = int(parent.stdout.readline())  # printed once the child is armed
    assert process_running(child)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 5
    while process_running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = process_running(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, f"the child outlived its parent (fallback={fallback})"


def test_a_datasets_worker_arms_the_parent_death_signal():
    """hf_corpus's encode function, run in a forked process (as datasets' map(num_proc) runs it), asks
    the kernel for SIGKILL at its parent's death (PR_GET_PDEATHSIG reads it back)."""
    import ctypes
    import multiprocessing

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_GET_PDEATHSIG is Linux's")
    pytest.importorskip("tiktoken")
    from nanogpt.data import hf_corpus  # imported by the parent, as prepare imports it before map forks

    def child(queue):
        hf_corpus._encode({"text": ["a b"]}, num_threads=1)
        signal_number = ctypes.c_int()
        libc = ctypes.CDLL(None)
        libc.prctl(2, ctypes.byref(signal_number), 0, 0, 0)  # PR_GET_PDEATHSIG
        queue.put(signal_number.value)

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    assert queue.get(timeout=60) == signal.SIGKILL
    process.join(timeout=10)
