"""Side by side: the val-loss curves of several training runs in one picture, and a table of what each
reached (its last and best val loss, its wall time per iteration). How the shakespeare_char_cpu_fast
preset was chosen (benchmarks/README.md, "Training to quality").

    python benchmarks/compare_runs.py out/base:"4x256, lr 2e-3" out/deep:"6x192" --png=curves.png

Each argument is a training out_dir (it holds metrics.jsonl), optionally followed by :label.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from nanogpt.experiment import plot_val_loss, train_and_val_logs
from nanogpt.files import write_text_atomic


def summary(out_dir: Path) -> dict:
    """The run's config and what it reached: last and best val loss, median ms per logged iteration."""
    train_log, val_log = train_and_val_logs(out_dir)
    if not val_log:
        raise SystemExit(f"{out_dir} has no evaluations in metrics.jsonl: is it a training out_dir?")
    config = json.loads((out_dir / "config.json").read_text())
    return {
        "out_dir": str(out_dir),
        "config": config,
        "iters": val_log[-1]["iter"],
        "final_val_loss": val_log[-1]["val_loss"],
        "best_val_loss": min(e["val_loss"] for e in val_log),
        "ms_per_iter": statistics.median(r["ms"] for r in train_log) if train_log else None,
        "val_log": val_log,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="OUT_DIR[:label]")
    parser.add_argument("--png", default="benchmarks/results/compare_runs.png")
    parser.add_argument("--title", default="tiny Shakespeare (characters)")
    parser.add_argument("--json", help="also write the summaries to this file")
    args = parser.parse_args()

    runs = {}
    for arg in args.runs:
        path, _, label = arg.partition(":")
        runs[label or path] = summary(Path(path))
    print("| run | iterations | final val loss | best val loss | ms/iter (logged) |")
    print("|---|---:|---:|---:|---:|")
    for label, r in runs.items():
        ms = f"{r['ms_per_iter']:.0f}" if r["ms_per_iter"] else "n/a"
        print(f"| {label} | {r['iters']} | {r['final_val_loss']:.4f} | {r['best_val_loss']:.4f} | {ms} |")
    # the whole curves, and their last three quarters, where the runs part
    whole = {label: r["val_log"] for label, r in runs.items()}
    tail = {label: [e for e in log if e["iter"] >= log[-1]["iter"] / 4] for label, log in whole.items()}
    plot_val_loss({args.title: whole, f"{args.title}, from 1/4 of the run": tail}, Path(args.png))
    print(f"curves: {args.png}")
    if args.json:
        write_text_atomic(args.json, json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
