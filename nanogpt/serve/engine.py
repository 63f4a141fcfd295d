"""The server's decoding loop: one thread owns the model and a BatchDecoder. Requests wait in a queue;
at every step the free rows take waiting completions (continuous batching), one batched step gives each
running completion its next token, and finished or cancelled completions leave. Text goes back to each
request's asyncio queue, piece by piece, never half a character and never past a stop string.

One completion's failure (NaN logits, an error while it joins) ends that completion with an error piece;
the others go on. No FastAPI here: the loop is plain threads and torch, tested on its own."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from nanogpt.generate import BatchDecoder, Draw, Penalties, Sampling, TextPieces, prompt_logprobs
from nanogpt.model import GPT
from nanogpt.serve.metrics import Metrics


class Piece(NamedTuple):
    """New text of completion `index` and the Draws of the tokens it came from; `finish` ("stop",
    "length", "error" or "shutdown", with text the message) and `tokens` (how many it generated) come with
    its last piece; `echo` (its first piece, if asked): the prompt's tokens with their log-probs."""

    index: int
    text: str
    finish: str | None = None
    tokens: int = 0
    draws: tuple[Draw, ...] = ()
    echo: tuple[Draw, ...] = ()


class Busy(Exception):
    """The server cannot take a job now: `code` says why (server_busy: retry later)."""

    def __init__(self, message: str, code: str = "server_busy"):
        super().__init__(message)
        self.code = code


class StopMatcher:
    """Where the first of some stop strings ends in a text that arrives piece by piece (Knuth-Morris-
    Pratt, one automaton per stop string): each new character costs amortised O(stop strings), however
    long they are, and the text that may still begin a stop string is held back until the next piece."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.tables = [self._failure(s) for s in stops]
        self.matched = [0] * len(stops)  # the longest prefix of each stop string the text ends with
        self.held: deque[str] = deque()  # the text's last max(matched) characters, in pieces
        self.held_len = 0

    @staticmethod
    def _failure(s: str) -> list[int]:
        """table[i]: the longest proper prefix of s[: i + 1] that is also its suffix."""
        table, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = table[k - 1]
            k += s[i] == s[k]
            table[i] = k
        return table

    def feed(self, text: str) -> tuple[str, bool]:
        """New text -> (what may be sent now, stopped): when stopped, the text before the stop string."""
        for i, ch in enumerate(text):
            for j, s in enumerate(self.stops):
                k, table = self.matched[j], self.tables[j]
                while k and s[k] != ch:
                    k = table[k - 1]
                k += s[k] == ch
                if k == len(s):  # s ends at text[i]: everything before it goes, the rest never
                    self.held.append(text[: i + 1])
                    self.held_len += i + 1
                    sent = self._take(self.held_len - len(s))
                    self.held.clear()
                    self.held_len = 0
                    return sent, True
                self.matched[j] = k
        self.held.append(text)
        self.held_len += len(text)
        return self._take(self.held_len - max(self.matched, default=0)), False

    def flush(self) -> str:
        """The text held back, at the end of the completion."""
        return self._take(self.held_len)

    def _take(self, n: int) -> str:
        """The first n held characters, no longer held."""
        out = []
        while n > 0:
            piece = self.held.popleft()
            if len(piece) > n:
                self.held.appendleft(piece[n:])
                piece = piece[:n]
            out.append(piece)
            n -= len(piece)
            self.held_len -= len(piece)
        return "".join(out)


@dataclass(eq=False)  # a completion is its own key in the decoder (by identity)
class Completion:
    """One sequence to decode: a choice of a request. top: top log-probs per token (None: none);
    echo_top: the prompt's log-probs are asked too, with this many top ones. max_tokens 0: the prompt is
    scored (echo_top) and nothing generated."""

    index: int
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    generator: torch.Generator
    stop: tuple[str, ...]
    penalties: Penalties = Penalties()
    top: int | None = None
    echo_top: int | None = None
    job: Job | None = None
    tokens: int = 0  # generated so far
    stops: StopMatcher | None = None
    text: TextPieces | None = None
    submitted: float = field(default_factory=time.monotonic)
    last_token_at: float = 0.0


class Job:
    """One HTTP request: its completions' indices and the asyncio queue their pieces go back through.
    Completions point to their job but not the other way round: with no cycle, a finished request
    (stop-string tables of megabytes among it) is freed at once, not at the next full garbage collection."""

    def __init__(self, completions: list[Completion], loop: asyncio.AbstractEventLoop):
        self.indices = [c.index for c in completions]
        self.loop = loop
        self.queue: asyncio.Queue[list[Piece]] = asyncio.Queue()
        self.cancelled = False  # set by the request's side (client gone); the loop drops it next step
        for c in completions:
            c.job = self


def deliver(out: dict[Job, list[Piece]]) -> None:
    """From the decoding thread: hand each job its pieces, waking each event loop once per step for all
    its jobs (not once per job)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, list[Piece]]]] = {}
    for job, pieces in out.items():
        by_loop.setdefault(job.loop, []).append((job, pieces))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[Job, list[Piece]]]) -> None:
    for job, pieces in batch:
        job.queue.put_nowait(pieces)


class Scheduler:
    """The decoding thread. `submit` a Job's completions; they join the batch as rows free up."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Any,
        rows: int,
        max_waiting: int,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        metrics: Metrics | None = None,
    ):
        self.decoder = BatchDecoder(model, rows)
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size  # ids past it (the model's padding) have no text: never drawn
        self.eot = getattr(tokenizer, "eot", None)
        self.max_waiting = max_waiting
        self.context = context  # entered by the decoding thread: autocast is per thread
        self.metrics = metrics or Metrics()
        self.waiting: deque[Completion] = deque()
        self.running: list[Completion] = []
        self.wake = threading.Condition()
        self.stopping = False
        self.failure: str | None = None  # why the decoding thread ended, if not asked to
        self.thread = threading.Thread(target=self._run, name="nanogpt-decoder", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop decoding (after the step in progress): every running or waiting completion gets a
        "shutdown" error piece."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def problem(self) -> str | None:
        """Why this scheduler takes no work (None: it does)."""
        if self.failure:
            return f"the decoding thread failed: {self.failure}"
        if self.stopping or not self.thread.is_alive():
            return "the server is shutting down"
        return None

    def load(self) -> tuple[int, int]:
        """(running, waiting) completions."""
        return len(self.running), len(self.waiting)

    def submit(self, completions: list[Completion]) -> None:
        """Queue a job's completions (Job(completions, loop) made them its own)."""
        with self.wake:
            problem = self.problem()
            if problem:
                raise Busy(problem, "decoder_failed" if self.failure else "server_shutting_down")
            if len(self.waiting) + len(completions) > self.max_waiting:
                raise Busy(
                    f"{len(self.waiting)} completions are waiting already (at most {self.max_waiting})"
                )
            self.waiting.extend(completions)
            self.wake.notify()

    def _run(self) -> None:
        try:
            with torch.inference_mode(), self.context():
                while self._next_step():
                    pass
        except BaseException as e:  # a bug in the loop itself: say so in /health, fail everything held
            traceback.print_exc(file=sys.stderr)
            self.failure = f"{type(e).__name__}: {e}"
        finish, message = (
            ("error", self.problem()) if self.failure else ("shutdown", "the server is shutting down")
        )
        with self.wake:
            self.stopping = True
            held = [*self.running, *self.waiting]
        out: dict[Job, list[Piece]] = {}
        for c in held:  # nobody decodes them any more
            out.setdefault(c.job, []).append(Piece(c.index, message, finish, c.tokens))
        deliver(out)

    def _admit(self) -> list[Completion] | None:
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
        for c in [c for c in self.running if c.job.cancelled]:
            self._leave(c)
        for c in joining:
            try:
                self._start(c, out)
            except Exception as e:  # a bug or out of memory in this one's prompt: fail it alone
                traceback.print_exc(file=sys.stderr)
                self._fail(c, f"decoding failed: {e}", out)
        if self.running:
            try:
                draws = zip(list(self.decoder.keys), self.decoder.step(), strict=True)
                self.metrics.observe_batch(len(self.running))
                for c, draw in draws:
                    self._take(c, draw, out)
            except Exception as e:  # a bug or out of memory in the batched step: fail the batch
                traceback.print_exc(file=sys.stderr)
                for c in list(self.running):
                    self._fail(c, f"decoding failed: {e}", out)
        deliver(out)
        return True

    def _start(self, c: Completion, out: dict[Job, list[Piece]]) -> None:
        """c's prompt is read (and scored, if asked); it joins the batch unless it only scores."""
        c.text, c.stops = TextPieces(self.tokenizer), StopMatcher(c.stop)
        echo: tuple[Draw, ...] = ()
        if c.echo_top is not None:
            echo = tuple(prompt_logprobs(self.decoder.model, c.prompt, c.echo_top, self.vocab_size))
        if echo and echo[0].error:
            return self._fail(c, f"decoding failed: {echo[0].error}", out)
        if c.max_tokens == 0:
            out.setdefault(c.job, []).append(Piece(c.index, "", "length", 0, echo=echo))
            return
        sampling = replace(c.sampling, vocab_size=self.vocab_size)
        draw = self.decoder.join(c, c.prompt, sampling, c.generator, c.penalties, c.top)
        if draw.error:
            return self._fail(c, f"decoding failed: {draw.error}", out)
        self.running.append(c)
        self._take(c, draw, out, echo)

    def _take(self, c: Completion, draw: Draw, out: dict[Job, list[Piece]], echo: tuple = ()) -> None:
        """Completion c drew a token: its text so far up to any stop string goes out; it leaves when done."""
        if draw.error:
            return self._fail(c, f"decoding failed: {draw.error}", out)
        now = time.monotonic()
        self.metrics.observe_token(now - (c.last_token_at or c.submitted), first=not c.last_token_at)
        c.tokens, c.last_token_at = c.tokens + 1, now
        if draw.token == self.eot:
            text, finish = c.stops.feed(c.text.flush())[0] + c.stops.flush(), "stop"
        else:
            done = c.tokens >= c.max_tokens
            text, stopped = c.stops.feed(c.text.add(draw.token) + (c.text.flush() if done else ""))
            finish = "stop" if stopped else "length" if done else None
            if finish == "length":
                text += c.stops.flush()
        if finish is not None:
            self._leave(c)
        if text or finish is not None or c.top is not None or echo:
            draws = (draw,) if c.top is not None else ()
            out.setdefault(c.job, []).append(Piece(c.index, text, finish, c.tokens, draws, echo))

    def _fail(self, c: Completion, message: str, out: dict[Job, list[Piece]]) -> None:
        if c in self.running:
            self._leave(c)
        out.setdefault(c.job, []).append(Piece(c.index, message, "error", c.tokens))

    def _leave(self, c: Completion) -> None:
        if c in self.decoder.keys:
            self.decoder.leave(c)
        self.running.remove(c)
