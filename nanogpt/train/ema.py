"""An exponential moving average (EMA) of the weights, which evaluations measure and checkpoints save while
training goes on from the raw weights. After update t:

    average <- average + (1 - d_t) (weights - average),   d_t = min(decay, (1 + t) / (10 + t))

the warm-up of d_t (TensorFlow's ExponentialMovingAverage, timm's ModelEma) forgets the first steps,
whose weights are near the random init, within a few dozen updates. `applied()` swaps the average into
the model itself (compiled or DDP-wrapped alike) rather than evaluating a copy as
torch.optim.swa_utils.AveragedModel does: the compiled graphs serve both."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightEMA:
    """The average of `model`'s trainable parameters (a LoRA run's adapters; all of them otherwise)."""

    def __init__(self, model: nn.Module, decay: float):
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.decay, self.updates = decay, 0  # a resumed run sets updates from its checkpoint
        self.average = [p.detach().clone() for p in self.params]  # the weights as they are: update 0

    def current_decay(self) -> float:
        """d_t of the next update."""
        return min(self.decay, (2 + self.updates) / (11 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the average towards the new weights."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - self.current_decay())
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block, its own weights again after it (exactly)."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, raw)

    def raw_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights themselves (not the average), by parameter name: what a resumed run
        continues from."""
        return {name: p.detach().clone() for name, p in self.named}


@torch.no_grad()
def restore_raw_weights(model: nn.Module, raw: dict[str, torch.Tensor]) -> None:
    """A checkpoint's raw weights (WeightEMA.raw_state) into `model`, which holds the checkpoint's average."""
    params = dict(model.named_parameters())
    for name, value in raw.items():
        params[name].copy_(value)
