"""The learning rate at each iteration: linear warmup, a decay to min_lr, then min_lr.

cosine (nanoGPT's): from learning_rate down to min_lr along half a cosine, from the end of warmup to
lr_decay_iters. wsd (warmup-stable-decay; MiniCPM, Hu et al. 2024): learning_rate until the last
decay_fraction of the run, then a straight line down to min_lr. Its lr does not depend on where the run
ends until the decay starts, so a run can be extended: resume a checkpoint saved before the decay with a
larger max_iters and lr_decay_iters.

A run with a time budget (TrainConfig.max_seconds) measures where it is after warmup by the share of the
budget spent (`progress`) instead of by iterations: every variant of an ablation then decays to min_lr
right when its time is up, whatever its speed.
"""

from __future__ import annotations

import math


def get_lr(
    it: int,
    learning_rate: float,
    warmup_iters: int,
    lr_decay_iters: int,
    min_lr: float,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
    progress: float | None = None,
) -> float:
    # 1) linear warmup for warmup_iters steps (it + 1: the first step already moves)
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) how far the decay phase is done, 0..1: by iteration, or the share of the time budget spent
    if progress is None:
        progress = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    # 3) after it, min_lr
    if progress > 1:
        return min_lr
    # 4) in between, down from learning_rate to min_lr
    return min_lr + decay_coefficient(progress, schedule, decay_fraction) * (learning_rate - min_lr)


def decay_coefficient(progress: float, schedule: str, decay_fraction: float) -> float:
    """1 at the start of the decay phase, 0 at its end (progress 0..1)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":  # stable, then linear over the last decay_fraction
        return min(1.0, (1.0 - progress) / decay_fraction)
    raise ValueError(f"unknown lr_schedule {schedule!r}: cosine or wsd")
