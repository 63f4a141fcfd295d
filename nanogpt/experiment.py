"""`nanogpt experiment`: the research runner. Trains every seed on every dataset, one run after another
in this process, and tabulates the results with their spread.

    nanogpt experiment --datasets=shakespeare_char,enwik8,text8 --seeds=3 --out=runs/baseline --max_iters=2000

Layout (one folder per run is the trainer's out_dir):
    OUT/DATASET/seed_S/       ckpt.pt, metrics.jsonl, ... and final_info.json: final_train_loss,
                              best_val_loss, total_train_time, avg_inference_tokens_per_second
    OUT/all_results.json      every run's final info and its train / val log lines
    OUT/final_info.json       per dataset: the mean and standard error of each metric over the seeds
    OUT/results.md            the Markdown table printed at the end
    OUT/val_loss.png          the val-loss curves of all runs, one panel per dataset

Seeds are the training config's seed (the preset's, or --seed) plus 0, 1, ...: `nanogpt train ...
--seed=S` reproduces OUT/DATASET/seed_S. Any other --key=value overrides every run's TrainConfig.

Ctrl-C (or SIGTERM) saves the current run and stops the experiment. The same command again continues it:
finished runs are kept, a stopped one resumes exactly where it stopped (init_from=resume), the rest run.
A run folder made with another training config is an error, not silently reused.

The two JSON files keep the layout of the AI-Scientist nanoGPT template, so its tools read them.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanogpt.bench import generation_tokens_per_second
from nanogpt.checkpoint import load_model, resume_path
from nanogpt.device import resolve_device
from nanogpt.errors import NanoGPTError
from nanogpt.files import atomic_open, write_text_atomic
from nanogpt.options import read_argv, set_fields, split_options, to_dict
from nanogpt.train.config import TrainConfig, load_train_config
from nanogpt.train.metrics import read_metrics
from nanogpt.train.trainer import train

METRICS = ("final_train_loss", "best_val_loss", "total_train_time", "avg_inference_tokens_per_second")


@dataclass
class ExperimentOptions:
    """experiment's own options; every other --key=value overrides each run's TrainConfig."""

    datasets: str = "shakespeare_char"  # comma-separated; the trainer prepares a known one not yet prepared
    seeds: int = 3  # runs per dataset
    out: str = "runs/experiment"
    config: str = "shakespeare_char_cpu"  # the training preset (or TOML file) every run starts from
    inference_tokens: int = 100  # tokens generated after training (batch 1, KV cache) for tokens/s

    def __post_init__(self):
        if self.seeds < 1 or self.inference_tokens < 1:
            raise NanoGPTError(
                f"seeds and inference_tokens must be >= 1, got {self.seeds}, {self.inference_tokens}"
            )
        if not self.dataset_names():
            raise NanoGPTError("--datasets names no dataset")

    def dataset_names(self) -> list[str]:
        return [name.strip() for name in self.datasets.split(",") if name.strip()]


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std, ddof=1, / sqrt(n)); None for a single value."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def train_and_val_logs(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """(log lines, eval lines) of a run's metrics.jsonl."""
    lines = read_metrics(out_dir)
    return [m for m in lines if "val_loss" not in m], [m for m in lines if "val_loss" in m]


# how a run is shown or where it starts from: a folder that differs only in these is the same run
_SAME_RUN_IGNORES = ("init_from", "progress")
_EARLIER_NOTE = {"done": " (done earlier: kept)", "stopped": " (stopped earlier: resuming)", "none": ""}


def earlier_run(cfg: TrainConfig) -> str:
    """What an earlier invocation left in cfg.out_dir: "done" (its final_info.json), "stopped" (a
    checkpoint to resume from) or "none". Done or stopped with another training config is an error."""
    run_dir = Path(cfg.out_dir)
    if (run_dir / "final_info.json").is_file():
        state = "done"
    elif resume_path(run_dir).is_file():
        state = "stopped"
    else:
        return "none"
    config_file = run_dir / "config.json"
    earlier = json.loads(config_file.read_text()) if config_file.is_file() else {}
    now = json.loads(json.dumps(to_dict(cfg)))  # as the trainer wrote it: tuples as lists
    differ = sorted(k for k in now.keys() - _SAME_RUN_IGNORES if earlier.get(k, now[k]) != now[k])
    if not earlier or differ:
        raise NanoGPTError(
            f"{run_dir} holds a run with another training config (differs in: "
            f"{', '.join(differ) or 'no config.json'}): use another --out, or delete that folder"
        )
    return state


def run_one(cfg: TrainConfig, inference_tokens: int) -> dict[str, Any] | None:
    """Train one run, time a short generation from its checkpoint, write out_dir/final_info.json.
    None if a signal stopped it (saved, to resume)."""
    result = train(cfg)
    if result["stopped_by"]:
        return None
    model, _ = load_model(cfg.out_dir, resolve_device(cfg.device))
    # float32 inference, like `nanogpt sample`'s default: comparable across runs and devices
    tokens_per_sec = generation_tokens_per_second(model, 1, inference_tokens)
    info = {name: result[name] for name in METRICS[:3]} | {"avg_inference_tokens_per_second": tokens_per_sec}
    info |= {"dataset": cfg.dataset, "seed": cfg.seed, "iter_num": result["iter_num"]}
    write_text_atomic(Path(cfg.out_dir) / "final_info.json", json.dumps(info, indent=2) + "\n")
    return info


def aggregate(infos: dict[str, list[dict]]) -> dict[str, Any]:
    """dataset -> {"means": {M_mean}, "stderrs": {M_stderr}, "final_info_dict": {M: [per run]}}."""
    out = {}
    for dataset, runs in infos.items():
        values = {m: [run[m] for run in runs] for m in METRICS}
        stats = {m: mean_and_stderr(v) for m, v in values.items()}
        out[dataset] = {
            "means": {f"{m}_mean": stats[m][0] for m in METRICS},
            "stderrs": {f"{m}_stderr": stats[m][1] for m in METRICS},
            "final_info_dict": values,
        }
    return out


def markdown_table(final_info: dict[str, Any]) -> str:
    header = "| dataset | runs | final train loss | best val loss | train time (s) | inference tokens/s |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for dataset, agg in final_info.items():
        cells = []
        for m, digits in zip(METRICS, (4, 4, 1, 0), strict=True):
            mean, stderr = agg["means"][f"{m}_mean"], agg["stderrs"][f"{m}_stderr"]
            cells.append(f"{mean:.{digits}f}" + ("" if stderr is None else f" ± {stderr:.{digits}f}"))
        lines.append(f"| {dataset} | {len(agg['final_info_dict'][METRICS[0]])} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot_val_loss(curves: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """One panel per title (a dataset), one line per label (a seed, a run): val loss against iteration."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (title, runs) in zip(axes[0], curves.items(), strict=True):
        for label, evals in runs.items():
            ax.plot([e["iter"] for e in evals], [e["val_loss"] for e in evals], marker=".", label=label)
        ax.set(title=title, xlabel="iteration", ylabel="val loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def run_experiment(opts: ExperimentOptions, overrides: dict[str, Any]) -> dict[str, Any] | None:
    """Every run of the experiment, then the aggregate files; returns the aggregate (final_info.json), or
    None if a signal stopped a run (it is saved; the same call again continues the experiment)."""
    base = set_fields(load_train_config([opts.config]), overrides, "command line")
    out = Path(opts.out)
    infos: dict[str, list[dict]] = {}
    curves: dict[str, dict[str, list[dict]]] = {}
    all_results: dict[str, Any] = {}
    for dataset in opts.dataset_names():
        for seed in range(base.seed, base.seed + opts.seeds):
            run_dir = out / dataset / f"seed_{seed}"
            cfg = set_fields(base, {"dataset": dataset, "seed": seed, "out_dir": str(run_dir)}, "experiment")
            state = earlier_run(cfg)
            print(f"=== experiment: {dataset}, seed {seed} -> {run_dir}{_EARLIER_NOTE[state]}")
            if state == "done":
                info = json.loads((run_dir / "final_info.json").read_text())
            else:
                if state == "stopped":
                    cfg = set_fields(cfg, {"init_from": "resume"}, "experiment")
                info = run_one(cfg, opts.inference_tokens)
                if info is None:
                    print(
                        f"experiment stopped during {run_dir} (saved). To continue: the same command again; "
                        "finished runs are kept and this one resumes"
                    )
                    return None
            train_log, val_log = train_and_val_logs(run_dir)
            infos.setdefault(dataset, []).append(info)
            curves.setdefault(dataset, {})[f"seed {seed}"] = val_log
            all_results[f"{dataset}_{seed}_final_info"] = info
            all_results[f"{dataset}_{seed}_train_info"] = train_log
            all_results[f"{dataset}_{seed}_val_info"] = val_log
    final_info = aggregate(infos)
    table = markdown_table(final_info)
    write_text_atomic(out / "all_results.json", json.dumps(all_results, indent=2) + "\n")
    write_text_atomic(out / "final_info.json", json.dumps(final_info, indent=2) + "\n")
    write_text_atomic(out / "results.md", table + "\n")
    plot_val_loss(curves, out / "val_loss.png")
    print(f"\n{table}\n\nresults in {out}/: final_info.json, all_results.json, results.md, val_loss.png")
    return final_info


def main(argv: list[str]) -> int:
    title = "usage: nanogpt experiment [--key=value ...]  (+ any training config key, applied to every run)"
    overrides = read_argv(ExperimentOptions, argv, title)
    if overrides is None:
        return 0
    own, train_overrides = split_options(ExperimentOptions, overrides, TrainConfig)
    for key, instead in (("dataset", "--datasets"), ("out_dir", "--out")):
        if key in train_overrides:
            raise NanoGPTError(f"the experiment sets each run's {key}: use {instead}")
    run_experiment(set_fields(ExperimentOptions(), own, "command line"), train_overrides)
    return 0
