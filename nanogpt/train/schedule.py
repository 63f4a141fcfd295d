"""The learning rate at each iteration: linear warmup, cosine decay to min_lr, then min_lr (nanoGPT's)."""

from __future__ import annotations

import math


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    # 1) linear warmup for warmup_iters steps (it + 1: the first step already moves)
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) after lr_decay_iters, min_lr
    if it > lr_decay_iters:
        return min_lr
    # 3) in between, cosine decay from learning_rate down to min_lr
    decay_ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)
