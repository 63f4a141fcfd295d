"""Muon's step on this CPU: torch.optim.Muon against nanogpt/train/muon.py (Newton-Schulz batched by shape),
with 5 and 3 iterations and with q, k and v apart, on the blocks' matrices of a model shape.

    python benchmarks/bench_muon.py                          # shakespeare_char_cpu_modern's 6 x 192
    python benchmarks/bench_muon.py --n_layer=6 --n_embd=128 --json benchmarks/results/bench_muon.json

Random gradients; the optimizers step in turn, round after round, so the machine's drift reaches all
alike; medians of the rounds after a warm-up. The update is the same (tests/test_muon.py), so this is
the whole difference in cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from nanogpt.device import device_name
from nanogpt.files import write_text_atomic
from nanogpt.train.muon import Muon


def block_matrices(n_layer: int, n_embd: int) -> list[nn.Parameter]:
    """c_attn (3C, C), attn.c_proj (C, C), c_fc (4C, C), mlp.c_proj (C, 4C) per layer, with gradients."""
    C = n_embd
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * n_layer
    params = [nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    def ours(**kwargs):
        params = block_matrices(args.n_layer, args.n_embd)
        split = kwargs.pop("split", False)
        return Muon(params, lr=0.02, splits={p: 3 for p in params[::4]} if split else None, **kwargs)

    optimizers = {
        "torch.optim.Muon (5 steps)": torch.optim.Muon(
            block_matrices(args.n_layer, args.n_embd), lr=0.02, adjust_lr_fn="original"
        ),
        "ours, batched (5 steps)": ours(),
        "ours, batched, q/k/v apart (5 steps)": ours(split=True),
        "ours, batched (3 steps)": ours(ns_steps=3),
        "ours, batched, q/k/v apart (3 steps)": ours(ns_steps=3, split=True),
    }
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t[3:]) for name, t in times.items()}
    reference = ms["torch.optim.Muon (5 steps)"]
    print(
        f"Muon step, {args.n_layer} x {args.n_embd} blocks' matrices, {device_name('cpu')}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| optimizer | ms per step (median) | vs torch |\n|---|---:|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} | {reference / value:.2f}x |")
    report = {"cpu": device_name("cpu"), "threads": torch.get_num_threads(), "shape": vars(args), "ms": ms}
    print(json.dumps(report))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
