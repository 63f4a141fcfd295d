"""`nanogpt experiment`: the research runner. Trains every seed on every dataset, one run after another
in this process, and tabulates the results with their spread.

    nanogpt experiment --datasets=shakespeare_char,enwik8,text8 --seeds=3 --out=runs/baseline --max_iters=2000
    nanogpt experiment --config=shakespeare_char_cpu_fast --variants=benchmarks/ablation_recipe.toml \
        --seeds=2 --max_seconds=600 --target_loss=1.55 --out=runs/ablation_recipe

Variants (--variants=FILE.toml): named sets of training overrides, one [NAME] table each, every one run
over the seeds (and datasets); a table's `config` key picks the preset it starts from. Precedence: the
variant's preset < the command line's --key=value < the variant's own keys. --only=a,b runs some of them.

Layout (one folder per run is the trainer's out_dir):
    OUT/DATASET/seed_S/       ckpt.pt, metrics.jsonl, ... and final_info.json: final_train_loss,
                              best_val_loss, total_train_time, avg_inference_tokens_per_second
    OUT/VARIANT/DATASET/seed_S/   the same, with --variants
    OUT/all_results.json      every run's final info and its train / val log lines
    OUT/final_info.json       per dataset (or variant): the mean and standard error of each metric over
                              the seeds, those above plus final_val_loss and ms_per_iter (and, with
                              --target_loss, seconds_to_target: the elapsed_s of the first eval at or below it)
    OUT/results.md            the Markdown table printed at the end
    OUT/val_loss.png          the val-loss curves of all runs against wall seconds, one panel per dataset

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
import signal
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanogpt.checkpoint import load_model, resume_path
from nanogpt.data.meta import META_FILE
from nanogpt.data.prepare import DATASETS
from nanogpt.device import resolve_device
from nanogpt.errors import NanoGPTError
from nanogpt.files import atomic_open, write_text_atomic
from nanogpt.options import read_argv, read_toml, set_fields, split_options, to_dict
from nanogpt.perf import generation_tokens_per_second
from nanogpt.train.config import TrainConfig, load_train_config
from nanogpt.train.metrics import read_metrics
from nanogpt.train.trainer import train

METRICS = ("final_train_loss", "best_val_loss", "total_train_time", "avg_inference_tokens_per_second")
# read from each run's final info and log at the end (so runs kept from an earlier invocation have them)
DERIVED = ("final_val_loss", "ms_per_iter")
TARGET = "seconds_to_target"


@dataclass
class ExperimentOptions:
    """experiment's own options; every other --key=value overrides each run's TrainConfig."""

    datasets: str = "shakespeare_char"  # comma-separated; the trainer prepares a known one not yet prepared
    seeds: int = 3  # runs per dataset
    out: str = "runs/experiment"  # the folder of the runs (out/VARIANT/DATASET/seed_N) and the results
    config: str = "shakespeare_char_cpu"  # the training preset (or TOML file) every run starts from
    inference_tokens: int = 100  # tokens generated after training (batch 1, KV cache) for tokens/s
    variants: str = ""  # a TOML file of named variants, each a table of training overrides ("": none)
    only: str = ""  # comma-separated names of the variants to run (default: all of the file's)
    target_loss: float = 0.0  # report the wall seconds each run took to reach this val loss (0: do not)

    def __post_init__(self):
        if self.seeds < 1 or self.inference_tokens < 1:
            raise NanoGPTError(
                f"seeds and inference_tokens must be >= 1, got {self.seeds}, {self.inference_tokens}"
            )
        if not self.dataset_names():
            raise NanoGPTError("--datasets names no dataset")
        if self.only and not self.variants:
            raise NanoGPTError("--only picks variants: give the --variants file too")

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


# how a run is shown, where it starts from or where it lies: a folder that differs only in these is the
# same run (an experiment folder moved or copied elsewhere continues)
_SAME_RUN_IGNORES = ("init_from", "progress", "out_dir", "data_dir")
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
    earlier = read_json(config_file) if config_file.is_file() else {}
    now = json.loads(json.dumps(to_dict(cfg)))  # as the trainer wrote it: tuples as lists
    differ = sorted(k for k in now.keys() - _SAME_RUN_IGNORES if earlier.get(k, now[k]) != now[k])
    if not earlier or differ:
        raise NanoGPTError(
            f"{run_dir} holds a run with another training config (differs in: "
            f"{', '.join(differ) or 'no config.json'}): use another --out, or delete that folder"
        )
    return state


def read_json(path: Path) -> Any:
    """A JSON file the experiment wrote earlier, or an error naming it when it is damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoGPTError(
            f"{path} is damaged ({e}): delete it and run the same command again (its run is redone or resumed)"
        ) from None


def check_datasets(base: TrainConfig, names: list[str]) -> None:
    """Every dataset of the experiment is known or prepared, checked before the first run trains."""
    missing = [n for n in names if n not in DATASETS and not (Path(base.data_dir) / n / META_FILE).is_file()]
    if missing:
        raise NanoGPTError(
            f"unknown dataset(s) {', '.join(map(repr, missing))}: neither a known dataset ({', '.join(DATASETS)}) "
            f"nor prepared under {base.data_dir} (nanogpt prepare NAME --source PATH)"
        )


class Stopped(Exception):
    """A signal stopped the run in progress (it is saved, to resume); args[0] is the signal's name."""


def run_one(cfg: TrainConfig, inference_tokens: int) -> dict[str, Any]:
    """Train one run, time a short generation from its checkpoint, write out_dir/final_info.json.
    Raises Stopped if a signal stopped it (saved, to resume)."""
    # each run compiles its own model: without a reset the compiled graphs of earlier runs pile up in
    # this process until dynamo's recompile limit turns compiling off (inductor's disk cache stays warm)
    torch.compiler.reset()
    result = train(cfg)
    if result["stopped_by"]:
        raise Stopped(result["stopped_by"])
    model, _ = load_model(cfg.out_dir, resolve_device(cfg.device))
    # float32 inference, like `nanogpt sample`'s default: comparable across runs and devices
    tokens_per_sec = generation_tokens_per_second(model, 1, inference_tokens)
    info = {name: result[name] for name in METRICS[:3]} | {"avg_inference_tokens_per_second": tokens_per_sec}
    info |= {"dataset": cfg.dataset, "seed": cfg.seed, "iter_num": result["iter_num"]}
    write_text_atomic(Path(cfg.out_dir) / "final_info.json", json.dumps(info, indent=2) + "\n")
    return info


def run_row(info: dict[str, Any], val_log: list[dict], target_loss: float) -> dict[str, Any]:
    """A run's final info plus what its log says: final_val_loss, ms_per_iter (optimizer steps only) and,
    with a target, the elapsed_s of its first evaluation at or below it (None: never reached)."""
    row = info | {
        "final_val_loss": val_log[-1]["val_loss"],
        "ms_per_iter": 1000 * info["total_train_time"] / max(1, info["iter_num"]),
    }
    row |= {m: val_log[-1][m] for m in task_metrics(val_log[-1])}  # eval_tasks at the last evaluation
    if target_loss:
        reached = [e.get("elapsed_s", math.nan) for e in val_log if e["val_loss"] <= target_loss]
        row[TARGET] = reached[0] if reached else None
    return row


def task_metrics(record: dict[str, Any]) -> list[str]:
    """The eval_tasks figures of a run's record (training's `{task}_accuracy` and `core`), sorted."""
    return sorted(k for k in record if k.endswith("_accuracy") or k == "core")


def aggregate(rows: dict[str, list[dict]]) -> dict[str, Any]:
    """label (a dataset, or a variant) -> {"means": {M_mean}, "stderrs": {M_stderr}, "final_info_dict":
    {M: [per run]}}. seconds_to_target's mean is None unless every run reached the target."""
    out = {}
    for label, runs in rows.items():
        metrics = [m for m in (*METRICS, *DERIVED, TARGET, *task_metrics(runs[0])) if m in runs[0]]
        values = {m: [run[m] for run in runs] for m in metrics}
        stats = {m: (None, None) if None in v else mean_and_stderr(v) for m, v in values.items()}
        out[label] = {
            "means": {f"{m}_mean": stats[m][0] for m in metrics},
            "stderrs": {f"{m}_stderr": stats[m][1] for m in metrics},
            "final_info_dict": values,
        }
    return out


# the table's columns: metric, header, digits
COLUMNS = (
    ("final_train_loss", "final train loss", 4),
    ("best_val_loss", "best val loss", 4),
    ("final_val_loss", "final val loss", 4),
    ("ms_per_iter", "ms/iter", 1),
    ("total_train_time", "train time (s)", 1),
    ("avg_inference_tokens_per_second", "inference tokens/s", 0),
    (TARGET, "s to target", 0),
)


def markdown_table(final_info: dict[str, Any], first_column: str = "dataset") -> str:
    """One row per dataset (or variant): each metric's mean ± standard error over the runs."""
    measured = next(iter(final_info.values()))["final_info_dict"]
    tasks = [(m, m.replace("_accuracy", " accuracy"), 4) for m in task_metrics(measured)]
    columns = [c for c in COLUMNS if c[0] in measured] + tasks
    lines = [f"| {first_column} | runs | {' | '.join(c[1] for c in columns)} |"]
    lines.append("|---|---:|" + "---:|" * len(columns))
    for label, agg in final_info.items():
        cells = []
        for m, _, digits in columns:
            mean, stderr = agg["means"][f"{m}_mean"], agg["stderrs"][f"{m}_stderr"]
            missing = "not reached by all" if m == TARGET else "none scored"
            cell = missing if mean is None else f"{mean:.{digits}f}"
            cells.append(cell + ("" if stderr is None else f" ± {stderr:.{digits}f}"))
        lines.append(f"| {label} | {len(agg['final_info_dict'][METRICS[0]])} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot_val_loss(curves: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """One panel per title (a dataset), one line per label (a seed, a run): val loss against the wall
    seconds of each evaluation (elapsed_s; iterations for logs written before it was recorded)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, (title, runs) in zip(axes[0], curves.items(), strict=True):
        timed = all("elapsed_s" in e for evals in runs.values() for e in evals)
        for label, evals in runs.items():
            x = [e["elapsed_s"] if timed else e["iter"] for e in evals]
            ax.plot(x, [e["val_loss"] for e in evals], marker=".", label=label)
        ax.set(title=title, xlabel="seconds" if timed else "iteration", ylabel="val loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def check_folder_name(name: str, what: str) -> None:
    """A name the experiment makes a folder of (a variant, a dataset) stays inside --out: one plain part."""
    if name in ("", ".", "..") or Path(name).name != name or "\\" in name or "\0" in name:
        raise NanoGPTError(
            f"{what} {name!r} cannot be a folder name inside --out: use letters, digits, '-', '_' or '.', "
            "without '/' and not '..'"
        )


def read_variants(path: str, only: str) -> dict[str, dict[str, Any]]:
    """The variants of a TOML file, {name: training overrides} in the file's order (those `only` names, if
    it names any). A variant's key `config` names the preset it starts from."""
    variants = read_toml(path)
    if not variants or any(not isinstance(v, dict) for v in variants.values()):
        raise NanoGPTError(f"{path}: write each variant as a [NAME] table of training overrides")
    names = [n.strip() for n in only.split(",") if n.strip()] or list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise NanoGPTError(
            f"--only names {', '.join(unknown)}, not variants of {path} ({', '.join(variants)})"
        )
    for name in names:
        check_folder_name(name, f"variant of {path}")
        for key in ("dataset", "out_dir"):
            if key in variants[name]:
                raise NanoGPTError(f"variant {name!r} of {path} sets {key}: the experiment sets each run's")
    return {n: variants[n] for n in names}


@dataclass
class RunGroup:
    """The seeds of one dataset under one variant ("" without variants)."""

    variant: str
    label: str  # its row of the table
    folder: Path  # its seed_S/ folders
    config: TrainConfig  # its training config, before seed and out_dir


def run_groups(opts: ExperimentOptions, overrides: dict[str, Any]) -> list[RunGroup]:
    """Every variant x dataset of the experiment, each with its training config."""
    variants = read_variants(opts.variants, opts.only) if opts.variants else {"": {}}
    datasets, out = opts.dataset_names(), Path(opts.out)
    for dataset in datasets:
        check_folder_name(dataset, "dataset")
    groups = []
    for name, changes in variants.items():
        changes = dict(changes)
        base = set_fields(load_train_config([changes.pop("config", opts.config)]), overrides, "command line")
        base = set_fields(base, changes, f"variant {name!r} of {opts.variants}")
        for dataset in datasets:
            label = dataset if not name else name if len(datasets) == 1 else f"{name}/{dataset}"
            folder = out / name / dataset if name else out / dataset
            groups.append(RunGroup(name, label, folder, set_fields(base, {"dataset": dataset}, "experiment")))
    return groups


def run_or_reuse(cfg: TrainConfig, inference_tokens: int) -> dict[str, Any]:
    """A run's final info: kept from an earlier invocation, or trained now (a stopped one resumed)."""
    state = earlier_run(cfg)
    print(f"=== experiment: {cfg.dataset}, seed {cfg.seed} -> {cfg.out_dir}{_EARLIER_NOTE[state]}")
    if state == "done":
        return read_json(Path(cfg.out_dir) / "final_info.json")
    if state == "stopped":
        cfg = set_fields(cfg, {"init_from": "resume"}, "experiment")
    try:
        return run_one(cfg, inference_tokens)
    except Stopped:
        print(
            f"experiment stopped during {cfg.out_dir} (saved). To continue: the same command again; "
            "finished runs are kept and this one resumes"
        )
        raise


def run_experiment(opts: ExperimentOptions, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every run of the experiment, then the aggregate files; returns the aggregate (final_info.json).
    Raises Stopped if a signal stopped a run (it is saved; the same call again continues the experiment)."""
    groups = run_groups(opts, overrides)
    check_datasets(groups[0].config, opts.dataset_names())
    out = Path(opts.out)
    rows: dict[str, list[dict]] = {}
    curves: dict[str, dict[str, list[dict]]] = {}
    all_results: dict[str, Any] = {}
    for group in groups:
        for seed in range(group.config.seed, group.config.seed + opts.seeds):
            run_dir = group.folder / f"seed_{seed}"
            info = run_or_reuse(
                set_fields(group.config, {"seed": seed, "out_dir": str(run_dir)}, "experiment"),
                opts.inference_tokens,
            )
            train_log, val_log = train_and_val_logs(run_dir)
            rows.setdefault(group.label, []).append(run_row(info, val_log, opts.target_loss))
            curves.setdefault(group.config.dataset, {})[f"{group.variant} seed {seed}".strip()] = val_log
            all_results[f"{group.label}_{seed}_final_info"] = info
            all_results[f"{group.label}_{seed}_train_info"] = train_log
            all_results[f"{group.label}_{seed}_val_info"] = val_log
    final_info = aggregate(rows)
    table = markdown_table(final_info, "variant" if opts.variants else "dataset")
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
    try:
        run_experiment(set_fields(ExperimentOptions(), own, "command line"), train_overrides)
    except Stopped as stop:  # saved and resumable, but not finished: the shell's code for the signal
        return 128 + signal.Signals[stop.args[0]].value
    return 0
