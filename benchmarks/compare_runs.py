"""Side by side: the val-loss curves of several training runs in one picture, and a table of what each
reached (its last and best val loss, its wall time per iteration). How the shakespeare_char_cpu_fast
preset was chosen (benchmarks/README.md, "Training to quality").

    python benchmarks/compare_runs.py out/base:"4x256, lr 2e-3" out/deep:"6x192" --png=curves.png
    python benchmarks/compare_runs.py out/modern:ours nanogpt_baby.log:"nanoGPT's baby" --png=curves.png

Each argument is a training out_dir (it holds metrics.jsonl), the log of nanoGPT's own train.py with
each line prefixed by the seconds since it started (benchmarks/README.md shows the command), or a run kept
in an experiment's results file, FILE.json#RUN (its val_curve: runs of earlier sessions), optionally
followed by :label.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from nanogpt.experiment import plot_val_loss, train_and_val_logs
from nanogpt.files import write_text_atomic

# nanoGPT's train.py: "step 250: train loss 1.9780, val loss 2.0742" and "iter 10: loss 3.1416, time 41.59ms, ..."
NANOGPT_EVAL = re.compile(r"^([\d.]+) step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
NANOGPT_ITER = re.compile(r"^[\d.]+ iter \d+: loss [\d.]+, time ([\d.]+)ms")


def nanogpt_logs(path: Path) -> tuple[list[dict], list[dict]]:
    """(train log, val log) of a timestamped nanoGPT train.py log, in our metrics' keys."""
    lines = path.read_text().splitlines()
    evals = [m.groups() for m in map(NANOGPT_EVAL.match, lines) if m]
    val_log = [
        {"iter": int(i), "train_loss": float(t), "val_loss": float(v), "elapsed_s": float(s)}
        for s, i, t, v in evals
    ]
    return [{"ms": float(m[1])} for m in map(NANOGPT_ITER.match, lines) if m], val_log


def kept_run(path: Path, run: str) -> tuple[list[dict], list[dict]]:
    """(no train log, val log) of one run in an experiment's final_info-style JSON (val_curve rows:
    iteration, seconds, val loss)."""
    curve = json.loads(path.read_text())[run]["val_curve"]
    return [], [{"iter": i, "elapsed_s": t, "val_loss": v} for i, t, v in curve]


def summary(out_dir: Path) -> dict:
    """The run's config and what it reached: last and best val loss, median ms per logged iteration."""
    if "#" in str(out_dir):  # a run kept in a results file
        file, _, run = str(out_dir).partition("#")
        train_log, val_log = kept_run(Path(file), run)
        config = {"results": str(out_dir)}
    elif out_dir.is_file():  # nanoGPT's own log
        train_log, val_log = nanogpt_logs(out_dir)
        config = {"log": str(out_dir)}
    else:
        train_log, val_log = train_and_val_logs(out_dir)
        config = json.loads((out_dir / "config.json").read_text())
    if not val_log:
        raise SystemExit(f"{out_dir} has no evaluations: is it a training out_dir or a nanoGPT log?")
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
    parser.add_argument("--target", type=float, default=1.55, help="the table's seconds to this val loss")
    args = parser.parse_args()

    runs = {}
    for arg in args.runs:
        path, _, label = arg.partition(":")
        runs[label or path] = summary(Path(path))
    print(
        f"| run | iterations | final val loss | best val loss | ms/iter (logged) | seconds to {args.target} |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in runs.items():
        ms = f"{r['ms_per_iter']:.0f}" if r["ms_per_iter"] else "n/a"
        reached = [e["elapsed_s"] for e in r["val_log"] if e["val_loss"] <= args.target and "elapsed_s" in e]
        to_target = f"{reached[0]:.0f}" if reached else "not reached"
        print(
            f"| {label} | {r['iters']} | {r['final_val_loss']:.4f} | {r['best_val_loss']:.4f} | {ms} | {to_target} |"
        )
    # the whole curves, and their last three quarters, where the runs part
    whole = {label: r["val_log"] for label, r in runs.items()}
    tail = {label: [e for e in log if e["iter"] >= log[-1]["iter"] / 4] for label, log in whole.items()}
    plot_val_loss({args.title: whole, f"{args.title}, from 1/4 of the run": tail}, Path(args.png))
    print(f"curves: {args.png}")
    if args.json:
        write_text_atomic(args.json, json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
