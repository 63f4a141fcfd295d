"""Process lifetime: no process this project starts outlives its parent, and SIGTERM ends a command cleanly.

A child calls `die_with_parent(parent_pid)` first thing (a pool's initializer, a forked helper). On Linux the
kernel then sends it SIGKILL the moment its parent ends, however the parent ends (SIGTERM, SIGINT, kill -9);
elsewhere a daemon thread watches the parent's pid and ends the child within a second of the parent's end.

A command's `main` wrapped in `exits_on_sigterm` turns SIGTERM into an exception, so its cleanup runs
(temporary folders removed, pools shut down), then prints one line, "terminated", and returns 143 (128 +
SIGTERM, the shell's code for it), as Ctrl-C prints "interrupted" and returns 130.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_WATCH_SECONDS = 0.5  # how often the fallback watcher looks at the parent's pid
_armed_in: int | None = None  # the pid of the process die_with_parent armed (a fork's child is another)


class Terminated(BaseException):
    """SIGTERM arrived (raised in the main thread by exits_on_sigterm's handler). A BaseException, as
    KeyboardInterrupt is: `except Exception` does not swallow it."""


def _kernel_kills_on_parent_death() -> bool:
    """Ask Linux to SIGKILL this process when its parent ends; False where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_WATCH_SECONDS)
    os._exit(1)  # the parent is gone (this process was re-parented): end without cleanup, as SIGKILL would


def die_with_parent(parent_pid: int) -> None:
    """Make this (child) process end when the process `parent_pid` ends. Call it first in the child; the
    parent passes its own os.getpid(), so a parent that died before this call is noticed too. Calling it
    again in the same process does nothing more."""
    global _armed_in
    if _armed_in == os.getpid():
        return
    _armed_in = os.getpid()
    if not _kernel_kills_on_parent_death():
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="watch-parent").start()
    if os.getppid() != parent_pid:  # it ended between fork and here: the kernel did not see it end
        os._exit(1)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def exits_on_sigterm(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """`main` with SIGTERM as Terminated while it runs: its cleanup runs, then one line on stderr and 143.
    Off the main thread (where Python cannot take signals) `main` runs as it is."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> int:
        if threading.current_thread() is not threading.main_thread():
            return main(argv)
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return main(argv)
        except Terminated:
            print("\nterminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        finally:
            if previous is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signal.SIGTERM, previous)

    return wrapped
