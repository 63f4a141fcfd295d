"""One optimizer step, as the trainer, `nanogpt bench` and benchmarks/bench_train.py all take it:
gradient_accumulation_steps micro-batches of forward and backward (gradients reduced across processes on
the last one only), the global gradient norm clipped, then the optimizer's update."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanogpt.device import device_type
from nanogpt.train import distributed

Batch = tuple[torch.Tensor, torch.Tensor]  # (x, y): (B, T) token ids and their next tokens


def checkpoint_activations(model: nn.Module) -> None:
    """Activation checkpointing: each block of model.transformer.h keeps only its input during the forward
    pass and runs again inside backward to get what its gradients need (the same numbers: dropout's random
    state is replayed). Activation memory falls from every block's insides to one block's; the forward
    runs twice. Parameters and state dict are unchanged."""
    for block in model.transformer.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def new_scaler(device: str, dtype: str) -> torch.amp.GradScaler:
    """A gradient scaler keeps float16 gradients from underflowing; for other dtypes it does nothing."""
    return torch.amp.GradScaler(device_type(device), enabled=dtype == "float16")


@dataclass
class TrainStep:
    """Everything one optimizer step needs. `forward` is the model as it runs (possibly DDP/FSDP-wrapped
    and compiled), `wrapped` the DDP/FSDP module whose gradient sync is switched per micro-step (or the
    model itself), `params` what is clipped."""

    forward: nn.Module
    wrapped: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager
    accum: int = 1  # micro-batches per step (on this process)
    grad_clip: float = 1.0  # 0: no clipping
    label_smoothing: float = 0.0  # of the training loss (GPT.forward)

    def __call__(self, next_batch: Callable[[], Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """Take one step on `accum` batches from next_batch -> (the mean loss of its micro-batches and the
        gradient norm before clipping), as device tensors: reading them waits for the device."""
        loss_sum = torch.zeros((), device=self.params[0].device)
        for micro_step in range(self.accum):
            distributed.set_grad_sync(self.wrapped, micro_step == self.accum - 1)
            x, y = next_batch()
            with self.autocast:
                _, loss = self.forward(x, y, label_smoothing=self.label_smoothing)
                loss = loss / self.accum  # the mean over micro-batches: gradients add up over them
            self.scaler.scale(loss).backward()  # with gradient scaling if training in float16
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or math.inf)
        self.scaler.step(self.optimizer)  # skipped if the float16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)  # free the gradients' memory until the next backward
        return loss_sum, grad_norm
