"""One decoding step of a GPT recorded as a CUDA graph and replayed for every new token.

On a GPU a small model's decoding step is launch-bound: the shakespeare_char model (10.7M parameters)
took ~1.5 ms per token, cache or not, in ~100 kernel launches of a few microseconds' work each. A CUDA
graph records those kernels once and launches them all with one call. Replaying needs fixed shapes and
no host values inside the step: the model reads a StaticKVCache, whose next position is a device tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nanogpt.model import GPT, StaticKVCache


class CUDAGraphStep:
    """model(token, kv_cache=cache) for one new token per sequence, as a graph replay. The returned
    logits (B, 1, V) live in the graph's memory: the next call overwrites them."""

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
