"""The optimizer step's options (nanogpt/train/step.py): activation checkpointing computes the same
gradients while keeping fewer tensors for backward."""

from __future__ import annotations

import copy

import torch

from nanogpt import GPT, GPTConfig
from nanogpt.train.step import checkpoint_activations


def saved_bytes_and_grads(
    model: GPT, x: torch.Tensor, y: torch.Tensor
) -> tuple[int, dict[str, torch.Tensor]]:
    """(bytes of the tensors autograd keeps for backward during the forward pass, the gradients)."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        _, loss = model(x, y)
    loss.backward()
    return sum(kept), {name: p.grad for name, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=4, n_head=2, n_embd=32, dropout=0.1)).train()
    checkpointed = copy.deepcopy(plain)
    checkpoint_activations(checkpointed)
    x, y = torch.randint(0, 65, (4, 32)), torch.randint(0, 65, (4, 32))
    torch.manual_seed(1)  # the same dropout masks: the recomputation replays the random state
    plain_bytes, plain_grads = saved_bytes_and_grads(plain, x, y)
    torch.manual_seed(1)
    kept_bytes, grads = saved_bytes_and_grads(checkpointed, x, y)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    assert kept_bytes < plain_bytes / 2  # only block inputs (and the head's tensors) wait for backward
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()


def test_a_run_with_activation_checkpointing_trains_the_same(data_dir, tmp_path):
    from conftest import tiny_train_config

    from nanogpt.train.metrics import read_metrics
    from nanogpt.train.trainer import train

    losses = []
    for on in (False, True):
        out = tmp_path / str(on)
        cfg = tiny_train_config(
            data_dir,
            out,
            max_iters=3,
            eval_interval=3,
            eval_iters=1,
            dropout=0.1,
            activation_checkpointing=on,
        )
        train(cfg)
        losses.append([r["loss"] for r in read_metrics(out) if "loss" in r])
    assert losses[0] == losses[1]
