"""Full fine-tuning vs LoRA on this CPU: peak memory, time per optimizer step and checkpoint size.

    python benchmarks/bench_lora.py                 # GPT-2 124M shape, batch 4 x 256, LoRA r=8
    python benchmarks/bench_lora.py --steps 3 --json benchmarks/results/bench_lora.json

GPT-2 124M's shape (12 layers, 12 heads, 768 wide, 50304 tokens, biases, tanh GELU) with random weights
(the pretrained ones cannot be downloaded here), trained on BPE tiny Shakespeare (`nanogpt prepare
shakespeare`) with the trainer's step (nanogpt.train.step: forward, backward, clipping, fused AdamW),
float32. Each mode runs in a process of its own with OMP_NUM_THREADS=1 (the machine is shared), so its
peak RSS (VmHWM) is its own: weights, gradients, optimizer state and activations. LoRA: rank 8, alpha 16,
on c_attn, c_proj and c_fc of every block, base frozen. Checkpoint size: torch.save of what a run saves
(full: every weight + AdamW state; LoRA: adapters + their AdamW state + the base reference).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from nanogpt import GPT, GPTConfig
from nanogpt.device import device_name
from nanogpt.files import write_text_atomic
from nanogpt.lora import LoRAConfig, adapter_state, apply_lora, lora_entry, weights_sha256
from nanogpt.train.step import TrainStep, checkpoint_activations

GPT2_124M = GPTConfig(
    block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=True, gelu_approximate="tanh"
)
LORA = LoRAConfig(rank=8, alpha=16.0, dropout=0.05)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def batches(data_dir: Path, batch: int, block: int):
    from nanogpt.data.loader import BatchLoader

    loader = BatchLoader(data_dir / "shakespeare", batch, block, "cpu", seed=0)
    return lambda: loader.get_batch("train")


def saved_bytes(model: GPT, optimizer: torch.optim.Optimizer, lora: bool) -> int:
    """Bytes of torch.save of the model and optimizer state a run's checkpoint holds."""
    state = model.state_dict()
    ckpt = {"model": adapter_state(state) if lora else state, "optimizer": optimizer.state_dict()}
    if lora:
        ckpt["lora"] = lora_entry(LORA, "gpt2", "0" * 64)
    with tempfile.TemporaryFile() as f:
        torch.save(ckpt, f)
        return f.tell()


def worker(
    mode: str, data_dir: Path, steps: int, batch: int, block: int, dtype: str, recompute: bool
) -> dict:
    """One mode's measurement, in this process: model, optimizer, `steps` timed steps after one warm-up."""
    torch.manual_seed(0)
    model = GPT(GPT2_124M)
    model.crop_block_size(block)
    if mode == "lora":
        weights_sha256(model)  # as a LoRA run does once, to reference its base
        apply_lora(model, LORA)
    if recompute:
        checkpoint_activations(model)
    model.train()
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    trained = [p for p in model.parameters() if p.requires_grad]
    context = nullcontext() if dtype == "float32" else torch.autocast("cpu", dtype=torch.bfloat16)
    step = TrainStep(model, model, trained, optimizer, scaler, context)
    next_batch = batches(data_dir, batch, block)
    times, losses = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss, _ = step(next_batch)
        losses.append(loss.item())
        if i:  # the first step allocates the optimizer state
            times.append((time.perf_counter() - t0) * 1000)
    return {
        "mode": mode,
        "trained_params": sum(p.numel() for p in trained),
        "total_params": sum(p.numel() for p in model.parameters()),
        "ms_per_step_median": statistics.median(times),
        "ms_per_step": times,
        "peak_rss_mib": peak_rss_mib(),
        "checkpoint_bytes": saved_bytes(model, optimizer, mode == "lora"),
        "losses": losses,
    }


def median_run(runs: list[dict]) -> dict:
    """One mode's figures over its processes: the median step time and peak RSS (each run's own kept)."""
    return {
        **runs[0],
        "ms_per_step_median": statistics.median(r["ms_per_step_median"] for r in runs),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "runs": [{k: r[k] for k in ("ms_per_step", "peak_rss_mib")} for r in runs],
    }


def prepare(data_dir: Path) -> None:
    from nanogpt.data.prepare import ensure_prepared

    ensure_prepared("shakespeare", str(data_dir))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="processes per mode, alternated")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--json", default="")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: autocast, as training on a CPU with native bf16",
    )
    parser.add_argument(
        "--activation_checkpointing", action="store_true", help="both modes recompute each block in backward"
    )
    parser.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    if args.worker:
        print(
            json.dumps(
                worker(
                    args.worker,
                    data_dir,
                    args.steps,
                    args.batch,
                    args.block,
                    args.dtype,
                    args.activation_checkpointing,
                )
            )
        )
        return
    prepare(data_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.rounds):  # alternated: a busy spell of the machine slows both modes alike
        for mode in runs:
            cmd = [sys.executable, __file__, "--worker", mode, *sys.argv[1:]]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    full, lora = (median_run(runs[mode]) for mode in ("full", "lora"))
    ratios = {
        "peak_rss": lora["peak_rss_mib"] / full["peak_rss_mib"],
        "ms_per_step": lora["ms_per_step_median"] / full["ms_per_step_median"],
        "checkpoint": lora["checkpoint_bytes"] / full["checkpoint_bytes"],
    }
    report = {
        "cpu": device_name("cpu"),
        "threads": 1,
        "model": f"GPT-2 124M shape, random weights, {args.dtype}",
        "activation_checkpointing": args.activation_checkpointing,
        "batch": f"{args.batch} x {args.block}",
        "lora": {
            "rank": LORA.rank,
            "alpha": LORA.alpha,
            "dropout": LORA.dropout,
            "targets": list(LORA.targets),
        },
        "steps_timed": args.steps,
        "processes_per_mode": args.rounds,
        "full": full,
        "lora_run": lora,
        "lora_over_full": ratios,
    }
    print(f"{'':<16}{'full':>14}{'LoRA r=8':>14}{'LoRA / full':>14}")
    rows = [
        ("trained params", "trained_params", "{:,}", None),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}", "peak_rss"),
        ("ms / step", "ms_per_step_median", "{:.0f}", "ms_per_step"),
        ("checkpoint (MB)", "checkpoint_bytes", "{:.1f}", "checkpoint"),
    ]
    for label, key, fmt, ratio in rows:
        scale = 1e-6 if key == "checkpoint_bytes" else 1
        cells = [fmt.format(r[key] * scale) for r in (full, lora)]
        print(f"{label:<16}{cells[0]:>14}{cells[1]:>14}{(f'{ratios[ratio]:.1%}' if ratio else ''):>14}")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
