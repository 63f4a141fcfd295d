"""nanogpt/train/muon.py against torch.optim.Muon: the same update, batched by shape; a split matrix
moves as its blocks would as parameters of their own; the Newton-Schulz step count carried through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nanogpt.train.muon import Muon

# wide, tall, square, and two of one shape (stacked into one batched iteration)
SHAPES = [(12, 40), (40, 12), (24, 24), (24, 24), (36, 12)]


def params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]


def take_steps(optimizer: torch.optim.Optimizer, ps: list[nn.Parameter], grads_of, steps: int = 3) -> None:
    for k in range(steps):
        for p, grad in zip(ps, grads_of(k), strict=True):
            p.grad = grad.clone()
        optimizer.step()


def gradients(k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return [torch.randn(s, generator=g) for s in SHAPES]


@pytest.mark.parametrize("ns_steps", [5, 3])
def test_the_update_is_torch_muons(ns_steps):
    ours, theirs = params(), params()
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.95, ns_steps=ns_steps)
    take_steps(Muon(ours, **kwargs), ours, gradients)
    take_steps(torch.optim.Muon(theirs, nesterov=True, adjust_lr_fn="original", **kwargs), theirs, gradients)
    start = params()
    for a, b, p0 in zip(ours, theirs, start, strict=True):
        # Newton-Schulz runs in bfloat16: batched and one-at-a-time matmuls may round apart (equal on a Zen 4)
        moved = (b - p0).abs().max()
        assert (a - b).abs().max() < 5e-3 * moved, (a.shape, (a - b).abs().max(), moved)
    other = params()
    take_steps(
        torch.optim.Muon(other, nesterov=True, adjust_lr_fn="original", lr=0.02, ns_steps=ns_steps + 2),
        other,
        gradients,
    )
    assert (
        max((a - b).abs().max() / (b - p0).abs().max() for a, b, p0 in zip(other, theirs, start, strict=True))
        > 5e-2
    )


def test_a_split_matrix_moves_as_its_blocks_would_alone():
    """c_attn as q, k and v: a (3 C, C) weight with splits 3 takes the steps three (C, C) weights take."""
    g = torch.Generator().manual_seed(0)
    whole = nn.Parameter(torch.randn(3 * 16, 16, generator=g) * 0.1)
    blocks = [nn.Parameter(b.detach().clone()) for b in whole.chunk(3)]
    grads = lambda k: [torch.randn(3 * 16, 16, generator=torch.Generator().manual_seed(k))]
    take_steps(Muon([whole], lr=0.02, splits={whole: 3}), [whole], grads)
    take_steps(Muon(blocks, lr=0.02), blocks, lambda k: list(grads(k)[0].chunk(3)))
    assert torch.allclose(whole.detach(), torch.cat([b.detach() for b in blocks]), atol=1e-6)
    unsplit = nn.Parameter(torch.cat([b.detach() for b in blocks]).clone())
    unsplit.data.copy_(torch.randn(3 * 16, 16, generator=torch.Generator().manual_seed(0)) * 0.1)
    take_steps(Muon([unsplit], lr=0.02), [unsplit], grads)
    assert not torch.allclose(unsplit.detach(), whole.detach(), atol=1e-3)  # the split changes the step


def test_only_matrices_whose_rows_divide_by_their_split():
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(4))])
    p = nn.Parameter(torch.zeros(10, 4))
    with pytest.raises(ValueError, match="divide"):
        Muon([p], splits={p: 3})
