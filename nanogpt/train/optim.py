"""The optimizer of a training run: AdamW for every parameter (GPT.configure_optimizers, nanoGPT's), or
Muon (nanogpt/train/muon.py) for the blocks' matrices and AdamW for the rest (modded-nanogpt's and
nanochat's split).

Learning rates. `learning_rate` is AdamW's peak; `muon_learning_rate` is Muon's, in Keller Jordan's
convention (torch.optim.Muon's adjust_lr_fn="original"): a matrix (rows, cols) moves by
lr * sqrt(max(1, rows / cols)) times its orthogonalised momentum, whose entries have an RMS of about
1 / sqrt(max(rows, cols)), so his and nanochat's 0.02 carry over. Every group follows the same schedule:
the trainer sets each group's lr to its peak times get_lr(...) / learning_rate. Weight decay is decoupled
in both (AdamW's and Muon's: p -= lr * weight_decay * p), on matrices only.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from nanogpt.errors import NanoGPTError
from nanogpt.model import GPT
from nanogpt.train.config import TrainConfig
from nanogpt.train.muon import Muon


class ChainedOptimizer:
    """Optimizers over disjoint parameters, stepped as one: what the training step and the gradient scaler
    call (param_groups, step, zero_grad). Iterating yields them, so torch.distributed.checkpoint's
    get/set_optimizer_state_dict save and load them as one state keyed by parameter name."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    """A 2-D weight inside the transformer blocks: what Muon orthogonalises. Embeddings and the head are
    lookups and a classifier rather than maps between hidden states, so they stay with AdamW (Jordan)."""
    return p.dim() == 2 and name.startswith("transformer.h.")


def muon_with_adamw(
    model: GPT,
    muon_learning_rate: float,
    momentum: float,
    weight_decay: float,
    learning_rate: float,
    betas: tuple[float, float],
    device_type: str,
    ns_steps: int = 5,
    split_qkv: bool = False,
) -> ChainedOptimizer:
    """Muon for the blocks' matrices (c_attn as q, k and v if split_qkv), AdamW (GPT.configure_optimizers)
    for the embeddings, the head, biases and gains. Muon orthogonalises whole matrices: under FSDP, where
    each process holds a shard of each, it would orthogonalise the shards, so that is refused."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weights appear once
    matrices = [p for n, p in named if is_hidden_matrix(n, p)]
    splits = {p: 3 for n, p in named if split_qkv and n.endswith("attn.c_attn.weight")}
    if any(type(p).__name__ == "DTensor" for p in matrices):
        raise NanoGPTError(
            "optimizer='muon' orthogonalises whole matrices, but FSDP shards them across processes: "
            "use --parallel=ddp (or optimizer='adamw')"
        )
    print(f"Muon for {len(matrices)} matrices, with {sum(p.numel() for p in matrices):,} parameters")
    muon = Muon(
        matrices,
        lr=muon_learning_rate,
        weight_decay=weight_decay,
        momentum=momentum,
        ns_steps=ns_steps,
        splits=splits,
    )
    rest = [p for n, p in named if not is_hidden_matrix(n, p)]
    return ChainedOptimizer(
        muon, model.configure_optimizers(weight_decay, learning_rate, betas, device_type, rest)
    )


def build_optimizer(
    model: GPT, cfg: TrainConfig, device_type: str
) -> torch.optim.Optimizer | ChainedOptimizer:
    """The optimizer cfg names, over model's trainable parameters."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        return muon_with_adamw(
            model,
            cfg.muon_learning_rate,
            cfg.muon_momentum,
            cfg.weight_decay,
            cfg.learning_rate,
            betas,
            device_type,
            cfg.muon_ns_steps,
            cfg.muon_split_qkv,
        )
    return model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, betas, device_type)
