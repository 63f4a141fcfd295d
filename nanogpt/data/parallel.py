"""Encode a stream of text pieces with a pool of processes, results in input order, memory bounded.

Only 2 x num_proc pieces are in flight at a time (read ahead, being encoded, or waiting to be written), so
memory stays flat however large the corpus; each worker encodes on one thread. Workers are forked where
the platform allows it (they inherit the tokenizer already built, GPT-2's ranks included), and end with
their parent however it ends (nanogpt/processes.py).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import numpy as np

from nanogpt.data.tokenizers import Tokenizer, token_dtype, tokenizer_from_meta
from nanogpt.processes import die_with_parent

Tag = TypeVar("Tag")
_worker_tokenizer: Tokenizer | None = None


def encode_piece(tok: Tokenizer, piece: str | bytes) -> np.ndarray:
    """One piece's ids, on this thread only (dtype token_dtype(tok.vocab_size))."""
    if isinstance(piece, bytes) or tok.name == "char":
        return tok.encode_array(piece)  # vectorised, single-threaded
    return np.array(tok.encode(piece), dtype=token_dtype(tok.vocab_size))


def _start_worker(meta: dict, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a parent ended by SIGTERM or kill -9 takes its workers with it
    # Ctrl-C reaches the whole process group: the parent alone handles it (it cancels what is queued and
    # waits for the pieces in hand); an idle worker interrupted in its queue read printed a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_meta(meta)


def _encode_in_worker(piece: str | bytes) -> np.ndarray:
    return encode_piece(_worker_tokenizer, piece)


def encode_in_order(
    tok: Tokenizer, items: Iterable[tuple[Tag, str | bytes]], num_proc: int
) -> Iterator[tuple[Tag, np.ndarray]]:
    """(tag, ids of piece) for each (tag, piece) of `items`, in order, encoded by `num_proc` processes."""
    if num_proc <= 1:
        yield from ((tag, encode_piece(tok, piece)) for tag, piece in items)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(
        num_proc, context, initializer=_start_worker, initargs=(tok.to_meta(), os.getpid())
    )
    window: collections.deque = collections.deque()
    try:
        for tag, piece in items:
            window.append((tag, pool.submit(_encode_in_worker, piece)))
            if len(window) >= 2 * num_proc:
                tag, future = window.popleft()
                yield tag, future.result()
        while window:
            tag, future = window.popleft()
            yield tag, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
