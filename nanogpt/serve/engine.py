"""The server's decoding loop: one thread owns the model and a BatchDecoder. Requests wait in a queue;
at every step the free rows take waiting completions (continuous batching), one batched step gives each
running completion its next token, and finished or cancelled completions leave. Text goes back to each
request's asyncio queue, piece by piece, never half a character and never past a stop string.

No FastAPI here: the loop is plain threads and torch, tested on its own."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from nanogpt.generate import BatchDecoder, Sampling, TextPieces
from nanogpt.model import GPT


class Piece(NamedTuple):
    """New text of completion `index`; `finish` ("stop", "length", or "error" with text the message)
    and `tokens` (how many it generated) come with its last piece."""

    index: int
    text: str
    finish: str | None = None
    tokens: int = 0


class Busy(Exception):
    """More completions are waiting than the server queues."""


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, str, bool]:
    """text -> (what may be sent, what to hold back, stopped). Cut before the first stop string; hold
    back a tail that could be the start of one (the next tokens decide)."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    if found:
        return text[: min(found)], "", True
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], text[len(text) - hold :], False


@dataclass(eq=False)  # a completion is its own key in the decoder (by identity)
class Completion:
    """One sequence to decode: a choice of a request."""

    index: int
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    generator: torch.Generator
    stop: tuple[str, ...]
    job: Job | None = None
    tokens: int = 0  # generated so far
    held: str = ""  # decoded text not sent yet: it may begin a stop string
    text: TextPieces | None = None


class Job:
    """One HTTP request's completions and the asyncio queue their pieces go back through."""

    def __init__(self, completions: list[Completion], loop: asyncio.AbstractEventLoop):
        self.completions = completions
        self.loop = loop
        self.queue: asyncio.Queue[list[Piece]] = asyncio.Queue()
        self.cancelled = False  # set by the request's side (client gone); the loop drops it next step
        for c in completions:
            c.job = self

    def send(self, pieces: list[Piece]) -> None:
        """From the decoding thread: hand pieces to the request's event loop."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, pieces)


class Scheduler:
    """The decoding thread. `submit` a Job; its completions join the batch as rows free up."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Any,
        rows: int,
        max_waiting: int,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.decoder = BatchDecoder(model, rows)
        self.tokenizer = tokenizer
        self.eot = getattr(tokenizer, "eot", None)
        self.max_waiting = max_waiting
        self.context = context  # entered by the decoding thread: autocast is per thread
        self.waiting: deque[Completion] = deque()
        self.running: list[Completion] = []
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="nanogpt-decoder", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout)

    def load(self) -> tuple[int, int]:
        """(running, waiting) completions."""
        return len(self.running), len(self.waiting)

    def submit(self, job: Job) -> None:
        with self.wake:
            if self.stopping:
                raise Busy("the server is shutting down")
            if len(self.waiting) + len(job.completions) > self.max_waiting:
                raise Busy(
                    f"{len(self.waiting)} completions are waiting already (at most {self.max_waiting})"
                )
            self.waiting.extend(job.completions)
            self.wake.notify()

    def _run(self) -> None:
        with torch.inference_mode(), self.context():
            while self._next_step():
                pass
        for c in [*self.running, *self.waiting]:  # stopped: nobody decodes them any more
            c.job.send([Piece(c.index, "the server is shutting down", "error", c.tokens)])

    def _admit(self) -> list[Completion]:
        """Wait for work; take as many waiting completions as rows are free (None: stop)."""
        with self.wake:
            while not self.waiting and not self.running and not self.stopping:
                self.wake.wait()
            if self.stopping:
                return None
            joining = []
            while self.waiting and len(joining) < self.decoder.free:
                c = self.waiting.popleft()
                if not c.job.cancelled:
                    joining.append(c)
            return joining

    def _next_step(self) -> bool:
        joining = self._admit()
        if joining is None:
            return False
        out: dict[Job, list[Piece]] = {}
        try:
            for c in [c for c in self.running if c.job.cancelled]:
                self._leave(c)
            for c in joining:
                c.text = TextPieces(self.tokenizer)
                self.running.append(c)
                self._take(c, self.decoder.join(c, c.prompt, c.sampling, c.generator), out)
            if self.running:
                for c, token in zip(list(self.decoder.keys), self.decoder.step(), strict=True):
                    self._take(c, token, out)
        except Exception as e:  # a bug or out of memory: fail these requests, keep serving others
            traceback.print_exc(file=sys.stderr)
            for c in list(self.running):
                out.setdefault(c.job, []).append(Piece(c.index, f"decoding failed: {e}", "error", c.tokens))
                self._leave(c)
        for job, pieces in out.items():
            job.send(pieces)
        return True

    def _take(self, c: Completion, token: int, out: dict[Job, list[Piece]]) -> None:
        """Completion c drew `token`: its text so far up to any stop string goes out; it leaves when done."""
        c.tokens += 1
        if token == self.eot:
            text, finish = c.held + c.text.flush(), "stop"
        else:
            done = c.tokens >= c.max_tokens
            text = c.held + c.text.add(token) + (c.text.flush() if done else "")
            text, c.held, stopped = cut_at_stop(text, c.stop)
            finish = "stop" if stopped else "length" if done else None
            if finish == "length":
                text += c.held
        if finish is not None:
            self._leave(c)
        if text or finish is not None:
            out.setdefault(c.job, []).append(Piece(c.index, text, finish, c.tokens))

    def _leave(self, c: Completion) -> None:
        if c in self.decoder.keys:
            self.decoder.leave(c)
        self.running.remove(c)
