"""Muon (Jordan et al. 2024): SGD with Nesterov momentum whose update of each matrix is orthogonalised by
Newton-Schulz iterations, so that it moves every direction of the matrix at about the same rate.

The update is torch.optim.Muon's (nesterov=True, adjust_lr_fn="original", tested equal to it), with two
differences that matter at 1-10M parameters:
- The Newton-Schulz iterations of all matrices of one shape run as one batched matmul. They cost the same
  whatever the batch (~12 GFLOP per step for 6 x 192); torch.optim.Muon's step took 88 ms on a 2-core
  Zen 4, this one 62 ms (benchmarks/bench_muon.py, benchmarks/README.md).
- A matrix may be orthogonalised as row blocks: `splits[p] = 3` treats c_attn's (3 C, C) weight as q, k
  and v (modded-nanogpt's split), each with its own scale and learning-rate ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

# the quintic iteration's coefficients: Jordan's, chosen for the steepest slope at zero (torch's defaults)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalise(G: torch.Tensor, steps: int) -> torch.Tensor:
    """(N, rows, cols) with rows <= cols -> about U V^T of each matrix's SVD U S V^T, in bfloat16 (the
    iteration tolerates it, and it is 2x float32 on CPUs with bf16 dot products and on GPUs)."""
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        A = X @ X.mT  # (N, rows, rows)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters. lr is Keller Jordan's: a block (rows, cols) moves by
    lr * sqrt(max(1, rows / cols)) times its orthogonalised momentum. Weight decay is decoupled
    (p -= lr * weight_decay * p). splits: row blocks per parameter, orthogonalised apart (default 1)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        ns_steps: int = 5,
        splits: Mapping[nn.Parameter, int] | None = None,
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.splits = dict(splits or {})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.size(0) % self.splits.get(p, 1):
                    raise ValueError(
                        f"Muon takes 2-D parameters whose rows divide by their split, got {p.shape}"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            momentum = group["momentum"]
            # (param, oriented blocks of its Nesterov update): a block is transposed to rows <= cols
            blocks: list[tuple[nn.Parameter, list[torch.Tensor]]] = []
            for p in params:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum)
                pieces = update.chunk(self.splits.get(p, 1), dim=0)
                blocks.append((p, [u.mT if u.size(0) > u.size(1) else u for u in pieces]))
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for _, pieces in blocks:
                for u in pieces:
                    by_shape.setdefault(u.shape, []).append(u)
            done = {
                shape: iter(orthogonalise(torch.stack(us), group["ns_steps"]))
                for shape, us in by_shape.items()
            }
            for p, pieces in blocks:
                rows = p.size(0) // len(pieces)  # of each block, in the parameter's orientation
                ortho = [next(done[u.shape]) for u in pieces]
                ortho = torch.cat([o.mT for o in ortho] if rows > p.size(1) else ortho)
                ratio = math.sqrt(max(1.0, rows / p.size(1)))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(ortho.to(p.dtype), alpha=-group["lr"] * ratio)
        return loss
