"""The decoding engine: what `sample`, `eval`, `bench` and the server call to continue token sequences fast.

model.py keeps the readable reference (GPT.generate: a plain KV cache, one loop). Everything here exists
for speed, and is tested to produce the same tokens as that reference:
- the prompt is read once, then each new token costs one position's forward pass (KV cache);
- on a CPU in float32 a decoding step runs on PyTorch's own kernels instead of oneDNN's
  (one_position_kernels: oneDNN's per-call setup costs more than one position's work);
- on a GPU the cache has fixed shapes (StaticKVCache) and the one-token step is recorded once as a CUDA
  graph and replayed (CUDAGraphStep: a small model's step is all kernel launches).
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.nn import functional as F

from nanogpt.errors import NanoGPTError
from nanogpt.model import GPT, KVCache, decodable_logits, validate_prompt
from nanogpt.model import Sampling as Sampling  # defined beside sample_next_token; callers import it here
from nanogpt.model import SamplingError as SamplingError

PLAIN_SAMPLING = Sampling()  # the model's own distribution: temperature 1, no top-k or top-p


class StaticKVCache(KVCache):
    """KVCache with fixed shapes: attention reads all max_len slots, the unfilled ones masked out, and
    the next position is a (1,) device tensor that the caller sets (shared by all layers). A decoding
    step then reads no host value, so a CUDA graph can replay it; `len` stays 0. Position p goes to slot
    p % max_len: a rotary model's cache rolls past max_len (one position at a time; then every slot is
    visible); a learned-position one (rolling=False) refuses a position past max_len, checked on the
    host outside a graph's capture (a replay runs no Python; generate recomputes before it gets there)."""

    def __init__(self, max_len: int, pos: torch.Tensor, rolling: bool = True):
        super().__init__(max_len, rolling)
        self.pos = pos

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        return self.pos + torch.arange(T, dtype=torch.long, device=device)

    def append(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        positions = self.positions(kv.size(3), kv.device)  # (T,)
        capturing = kv.is_cuda and torch.cuda.is_current_stream_capturing()
        if not self.rolling and not capturing and int(positions[-1]) >= self.max_len:
            raise NanoGPTError(
                f"the KV cache holds {self.max_len} positions: it cannot take position {int(positions[-1])}"
            )
        k, v = self.storage(kv).index_copy_(3, positions % self.max_len, kv).unbind(0)
        visible = torch.arange(self.max_len, device=kv.device) <= positions[:, None]  # (T, max_len)
        return k, v, visible


def new_kv_cache(model: GPT, max_len: int, device: torch.device) -> list[KVCache]:
    """One empty cache per layer for up to max_len positions: static on a GPU (for CUDA graphs); rolling
    past max_len for a rotary model."""
    if device.type != "cuda":
        return [KVCache(max_len, rolling=model.config.position == "rope") for _ in model.transformer.h]
    pos = torch.zeros(1, dtype=torch.long, device=device)
    return [StaticKVCache(max_len, pos, rolling=model.config.position == "rope") for _ in model.transformer.h]


class CUDAGraphStep:
    """model(token, kv_cache=cache) for one new token per sequence, as a CUDA graph replay. The returned
    logits (B, 1, V) live in the graph's memory: the next call overwrites them.

    On a GPU a small model's decoding step is launch-bound: the shakespeare_char model (10.7M parameters)
    took ~1.5 ms per token, cache or not, in ~100 kernel launches of a few microseconds' work each; the
    graph launches them all with one call (2.3-5x faster per token on an H100)."""

    def __init__(self, model: GPT, cache: list[StaticKVCache], token: torch.Tensor, position: int):
        self.token = token.clone()  # (B, 1): the graph's input, refilled on every call
        self.pos = cache[0].pos  # (1,): shared by all layers' caches
        self.pos.fill_(position)
        # warm up outside the graph (lazy initialisation must not be recorded), on a side stream as
        # PyTorch asks; each run rewrites the same cache slot with the same keys and values
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(self.token, kv_cache=cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, _ = model(self.token, kv_cache=cache)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (B, 1, V) after token (B, 1) at position, its keys and values added to the cache."""
        self.token.copy_(token)
        self.pos.fill_(position)
        self.graph.replay()
        return self.logits


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


class CachedDecoder:
    """The forward passes of one batch of sequences that grow together: `prefill` reads the prompts
    (B, T) once, then `step` adds one token per sequence at a time, each the fastest way this device has."""

    def __init__(self, model: GPT, max_len: int, device: torch.device):
        self.model = model
        self.cache = new_kv_cache(model, max_len, device)
        self.graphed_step: CUDAGraphStep | None = None
        self.length = 0  # positions read so far

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) of the next token after the prompts idx (B, T): GPT.prefill, a rotary model's
        prompt longer than the cache rolling in through `step` (this device's fastest)."""
        self.length = min(self.cache[0].max_len, idx.size(1))  # after the first chunk: where `step` goes on
        return self.model.prefill(idx, self.cache, self.step)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) of the next token after token (B, 1)."""
        if token.is_cuda:  # one launch of the recorded step
            if self.graphed_step is None:
                self.graphed_step = CUDAGraphStep(self.model, self.cache, token, self.length)
            logits = self.graphed_step(token, self.length)
        else:
            with one_position_kernels(token.device, self.model.lm_head.weight.dtype):
                logits, _ = self.model(token, kv_cache=self.cache)
        self.length += 1
        return logits


@torch.inference_mode()  # no autograd bookkeeping at all: ~9% less time per cached token on a CPU
def generate_stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = PLAIN_SAMPLING,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of each sequence of idx (B, T), as (B, 1), max_new_tokens times.

    The tokens are GPT.generate's for the same generator (tested). Once the sequence outgrows block_size
    a learned-position model conditions on the last block_size tokens at positions 0..block_size-1 (as
    nanoGPT does): those keys all change, so that phase recomputes. A rotary model's cache rolls and serves
    every step (each query sees the last block_size keys). use_cache=False recomputes every step. The yielded
    tensors are inference tensors: clone one outside inference mode to use it where autograd saves it
    (generate's result, made by torch.cat, is a normal tensor)."""
    validate_prompt(idx, max_new_tokens, model.config.vocab_size)
    block_size = model.config.block_size
    rolling = model.config.position == "rope"
    decoder: CachedDecoder | None = None
    for _ in range(max_new_tokens):
        if not use_cache or (idx.size(1) > block_size and not rolling):
            logits, _ = model(model.context(idx))
        elif decoder is None:
            decoder = CachedDecoder(model, min(block_size, idx.size(1) + max_new_tokens), idx.device)
            logits = decoder.prefill(idx)
        else:
            logits = decoder.step(idx[:, -1:])
        idx_next = sampling.draw(logits[:, -1, :], generator)
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **options: Any) -> torch.Tensor:
    """Continue idx (B, T) by max_new_tokens tokens -> (B, T + max_new_tokens); options as generate_stream's."""
    return torch.cat([idx, *generate_stream(model, idx, max_new_tokens, **options)], dim=1)


def decode_stream(tokenizer: Any, token_ids: Iterable[int], stop_at: int | None = None) -> Iterator[str]:
    """The text of a stream of token ids, piece by piece as they arrive, ending before the token `stop_at`.
    A BPE token can hold part of a multi-byte character: its bytes are held back until the character is
    complete, so no piece ever holds half a character (U+FFFD only where the bytes are truly invalid)."""
    text = TextPieces(tokenizer)
    for token_id in token_ids:
        if token_id == stop_at:
            break
        piece = text.add(token_id)
        if piece:
            yield piece
    tail = text.flush()
    if tail:
        yield tail


class TextPieces:
    """decode_stream's decoder, fed one token at a time (the server's sequences each have one): `add`
    returns the new text, holding back the bytes of a character that is not complete yet."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self.decoder.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """The held bytes at the end of the stream: U+FFFD where they never made a character."""
        return self.decoder.decode(b"", final=True)


@dataclass(frozen=True)
class Penalties:
    """OpenAI's changes to the logits before a draw: logit_bias adds its value to its tokens' logits, and
    a token the sequence has generated c > 0 times loses c * frequency + presence (OpenAI's formula)."""

    presence: float = 0.0
    frequency: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])

    def __post_init__(self):
        for param, value in (("presence_penalty", self.presence), ("frequency_penalty", self.frequency)):
            if not -2 <= value <= 2:
                raise SamplingError(param, f"{param} must be in [-2, 2], got {value}")
        for token, bias in self.logit_bias:
            if token < 0 or not -100 <= bias <= 100:
                raise SamplingError(
                    "logit_bias", f"logit_bias maps token ids >= 0 to [-100, 100], got {token}: {bias}"
                )

    @property
    def counted(self) -> bool:
        """Whether drawing needs the counts of the tokens generated so far."""
        return bool(self.presence or self.frequency)

    def apply(self, logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        """logits (1, V) float, counts (V,) of the generated tokens -> the logits to draw from."""
        if self.logit_bias:
            tokens, bias = zip(*self.logit_bias, strict=True)
            logits = logits.index_add(
                1, torch.tensor(tokens, device=logits.device), logits.new_tensor([bias])
            )
        if counts is not None:
            logits = logits - counts * self.frequency - (counts > 0) * self.presence
        return logits


class Draw(NamedTuple):
    """A sequence's next token; with log-probs asked, its log-probability under the model's own
    distribution (the log-softmax of its logits: before temperature, penalties and bias, as vLLM reports
    them; over the ids the tokenizer can decode) and the `top` likeliest (token, log-prob) pairs. error:
    why no token could be drawn (token -1)."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    error: str | None = None


NOT_FINITE = "the model's logits are not finite (NaN or inf): its weights may be broken"


def logprobs_of(
    logits: torch.Tensor, token: int, top: int, vocab_size: int | None = None
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """logits (V,) -> the log-prob of token and the `top` likeliest (token, log-prob) pairs, over the
    ids below vocab_size (the tokenizer's: padded ids are never listed; None: all V)."""
    logprobs = F.log_softmax(decodable_logits(logits.float(), vocab_size), dim=-1)
    top = min(top, logprobs.size(-1), vocab_size or logprobs.size(-1))
    values, ids = torch.topk(logprobs, top) if top else (logprobs[:0], logprobs[:0])
    return float(logprobs[token]), tuple(zip(ids.tolist(), values.tolist(), strict=True))


@torch.inference_mode()
def prompt_logprobs(model: GPT, prompt: list[int], top: int, vocab_size: int | None = None) -> list[Draw]:
    """Each prompt token with its log-prob given the tokens before it, and the `top` likeliest there
    (the first token has none), over the ids below vocab_size (logprobs_of): one forward pass."""
    idx = torch.tensor([prompt], device=model.lm_head.weight.device)  # (1, T)
    targets = torch.cat(
        (idx[:, 1:], idx.new_full((1, 1), -1)), dim=1
    )  # with targets: every position's logits
    logits, _ = model(idx, targets)  # (1, T, V)
    if not bool(torch.isfinite(logits).all()):
        return [Draw(-1, error=NOT_FINITE)]
    draws = [Draw(t, *logprobs_of(logits[0, i], t, top, vocab_size)) for i, t in enumerate(prompt[1:])]
    return [Draw(prompt[0]), *draws]


class BatchKVCache(KVCache):
    """One layer's keys and values for up to `rows` sequences of different lengths decoding together
    (continuous batching): rows 0..B-1 are the batch's B sequences. Before each forward the BatchDecoder
    sets `lengths` (B,), the positions each row holds, and `len`, the longest (forward's context check).
    Position p of a row is in slot p % max_len: a rotary model's rows roll past max_len as KVCache's do
    (then every slot holds one of the last max_len positions, all visible); a learned-position model's
    rows never get there (the caller stops them)."""

    def __init__(self, max_len: int, rows: int):
        super().__init__(max_len)
        self.rows = rows
        self.lengths = torch.zeros(0, dtype=torch.long)

    def storage(self, kv: torch.Tensor) -> torch.Tensor:
        """The (2, rows, nh, max_len, hs) buffer of every row, whatever the batch's size now, allocated
        (zeros) at the first use in kv's (2, B, nh, T, hs) dtype."""
        if self.kv is None:
            _, _, nh, _, hs = kv.shape
            self.kv = kv.new_zeros(2, self.rows, nh, self.max_len, hs)
        return self.kv

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """The positions of each row's next T tokens, (B, T)."""
        return self.lengths[:, None] + torch.arange(T, dtype=torch.long, device=device)

    def append(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Add (2, B, nh, T, hs) keys and values, each row at its own positions; return the first
        S = min(longest + T, max_len) slots of every row, (B, nh, S, hs) each, and which keys each row's
        queries may see, (B, 1, T, S): the row's own positions so far (a shorter row's tail is masked out)."""
        B, T = kv.size(1), kv.size(3)
        pos = self.positions(T, kv.device)  # (B, T)
        rows = torch.arange(B, device=kv.device)[:, None]  # (B, 1)
        storage = self.storage(kv)
        storage[:, rows, :, pos % self.max_len] = kv.permute(1, 3, 0, 2, 4)  # indexed as (B, T, 2, nh, hs)
        S = min(self.len + T, self.max_len)
        k, v = storage[:, :B, :, :S].unbind(0)
        seen = pos[:, None, :, None]  # (B, 1, T, 1)
        visible = (torch.arange(S, device=kv.device) <= seen) | (seen >= self.max_len)  # (B, 1, T, S)
        return k, v, visible


@dataclass
class Row:
    """How one sequence of a BatchDecoder draws: counts (V,) of its generated tokens when its penalties
    need them; top: how many top log-probs each Draw carries (None: no log-probs)."""

    sampling: Sampling
    generator: torch.Generator | None
    penalties: Penalties
    top: int | None
    counts: torch.Tensor | None = None


class BatchDecoder:
    """Continuous batching: sequences of different lengths decode together, one token each per `step`.
    A sequence joins at any step (its prompt read alone, its keys and values then copied into a free
    row) and leaves at any step (the last row moves into its place: rows 0..B-1 stay the batch).
    Each draws with its own Sampling, Penalties and generator, row by row, so its tokens are those it gets
    decoded alone (tested), and a row whose draw fails (NaN logits) fails alone. A learned-position
    sequence cannot outgrow max_len (at most block_size): the caller stops it before; a rotary one rolls."""

    def __init__(self, model: GPT, rows: int, max_len: int | None = None):
        self.model = model
        self.device = model.lm_head.weight.device
        self.max_len = min(max_len or model.config.block_size, model.config.block_size)
        self.rolling = model.config.position == "rope"
        self.cache = [BatchKVCache(self.max_len, rows) for _ in model.transformer.h]
        self.rows = rows
        self.keys: list[Hashable] = []  # row i decodes sequence keys[i]
        self.lengths: list[int] = []  # positions row i holds
        self.draws: list[Row] = []
        self.last: list[int] = []  # the token row i reads next

    @property
    def free(self) -> int:
        return self.rows - len(self.keys)

    def _draw(self, logits: torch.Tensor, row: Row) -> Draw:
        """logits (1, V) -> the row's next token, below its sampling's vocab_size (as are its log-probs)."""
        logits = logits.float()
        if not bool(torch.isfinite(logits).all()):  # also keeps a CUDA multinomial from a device assert
            return Draw(-1, error=NOT_FINITE)
        token = int(row.sampling.draw(row.penalties.apply(logits, row.counts), row.generator))
        if row.counts is not None:
            row.counts[token] += 1
        if row.top is None:
            return Draw(token)
        return Draw(token, *logprobs_of(logits[0], token, row.top, row.sampling.vocab_size))

    @torch.inference_mode()
    def join(
        self,
        key: Hashable,
        prompt: list[int],
        sampling: Sampling,
        generator: torch.Generator | None = None,
        penalties: Penalties = Penalties(),
        top: int | None = None,
    ) -> Draw:
        """Read the prompt (alone) into a free row; return the sequence's first Draw. A failed draw
        (Draw.error) leaves the batch as it was."""
        fits = 0 < len(prompt) and (self.rolling or len(prompt) < self.max_len)
        if not self.free or not fits:
            raise NanoGPTError(
                f"cannot join a batch of {len(self.keys)}/{self.rows} sequences with a prompt of "
                f"{len(prompt)} tokens (1..{self.max_len - 1} fit)"
            )
        n = min(len(prompt), self.max_len)
        alone = [KVCache(n, self.rolling) for _ in self.model.transformer.h]
        logits = self.model.prefill(torch.tensor([prompt], device=self.device), alone)  # (1, 1, V)
        counts = torch.zeros(logits.size(-1), device=self.device) if penalties.counted else None
        row = Row(sampling, generator, penalties, top, counts)
        draw = self._draw(logits[:, -1, :], row)
        if draw.error:
            return draw
        r = len(self.keys)
        for layer, batch in zip(alone, self.cache, strict=True):
            storage = batch.storage(layer.kv)
            storage[:, r, :, :n] = layer.kv[:, 0]
            storage[:, r, :, n:] = 0  # a masked slot still multiplies its value by 0: 0 * NaN is NaN
        self.keys.append(key)
        self.lengths.append(len(prompt))
        self.draws.append(row)
        self.last.append(draw.token)
        return draw

    @torch.inference_mode()
    def step(self) -> list[Draw]:
        """The next Draw of every sequence, in row order (that of `keys`). A row whose Draw has an error
        must leave before the next step."""
        B = len(self.keys)
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=self.device)  # (B,)
        for layer in self.cache:
            layer.lengths, layer.len = lengths, max(self.lengths)
        tokens = torch.tensor(self.last, dtype=torch.long, device=self.device).view(B, 1)
        with one_position_kernels(self.device, self.model.lm_head.weight.dtype):
            logits, _ = self.model(tokens, kv_cache=self.cache)  # (B, 1, V)
        self.lengths = [n + 1 for n in self.lengths]
        draws = [self._draw(logits[r], self.draws[r]) for r in range(B)]
        self.last = [max(d.token, 0) for d in draws]
        return draws

    @torch.inference_mode()
    def leave(self, key: Hashable) -> None:
        """Free the sequence's row."""
        row, last = self.keys.index(key), len(self.keys) - 1
        if row != last:  # the last row moves into the freed one
            n = min(self.lengths[last], self.max_len)
            for layer in self.cache:
                layer.kv[:, row, :, :n] = layer.kv[:, last, :, :n]
                layer.kv[:, row, :, n:] = 0
            for rows in (self.keys, self.lengths, self.draws, self.last):
                rows[row] = rows[last]
        for rows in (self.keys, self.lengths, self.draws, self.last):
            rows.pop()
