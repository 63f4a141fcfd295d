"""`nanogpt experiment`: 2 seeds of a tiny config write every file, the aggregates are the mean and
standard error of the per-run values, and a stopped experiment continues where it stopped."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal

import numpy as np
import pytest

from nanogpt.cli import main as cli
from nanogpt.experiment import METRICS, mean_and_stderr
from nanogpt.model import GPT
from nanogpt.train.metrics import read_metrics

TINY = [
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=16",
    "--batch_size=4",
    "--max_iters=12",
    "--eval_interval=6",
    "--eval_iters=2",
    "--warmup_iters=2",
    "--lr_decay_iters=12",
    "--log_interval=4",
    "--progress=plain",
]


def run_experiment(out, data_dir, *extra: str, exit_code: int = 0) -> str:
    """A 2-seed experiment on shakespeare_char (prepared on the way); its stdout."""
    args = ["--datasets=shakespeare_char", "--seeds=2", f"--out={out}", f"--data_dir={data_dir}"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert cli(["experiment", *args, "--inference_tokens=8", "--seed=5", *TINY, *extra]) == exit_code
    return stdout.getvalue()


@pytest.fixture(scope="module")
def experiment(sources_dir, tmp_path_factory):
    """(out folder, stdout) of a 2-seed experiment on shakespeare_char."""
    tmp = tmp_path_factory.mktemp("experiment")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOGPT_DATA_SOURCES", str(sources_dir))
        return tmp / "runs", run_experiment(tmp / "runs", tmp / "data")


@pytest.mark.slow
def test_every_run_writes_its_final_info(experiment):
    experiment, _ = experiment
    for seed in (5, 6):  # the base seed (--seed) and the next
        run = experiment / "shakespeare_char" / f"seed_{seed}"
        info = json.loads((run / "final_info.json").read_text())
        assert info["seed"] == seed and info["dataset"] == "shakespeare_char" and info["iter_num"] == 12
        for m in METRICS:
            assert math.isfinite(info[m]) and info[m] > 0, m
        assert info["best_val_loss"] < math.log(65) + 0.1  # a real (if short) training run
        assert (run / "ckpt.pt").is_file() and (run / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_aggregates_are_mean_and_standard_error(experiment):
    experiment, _ = experiment
    runs = [
        json.loads((experiment / "shakespeare_char" / f"seed_{s}" / "final_info.json").read_text())
        for s in (5, 6)
    ]
    agg = json.loads((experiment / "final_info.json").read_text())["shakespeare_char"]
    for m in METRICS:
        values = np.array([r[m] for r in runs])
        assert agg["final_info_dict"][m] == values.tolist()
        assert agg["means"][f"{m}_mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert agg["stderrs"][f"{m}_stderr"] == pytest.approx(values.std(ddof=1) / math.sqrt(2), rel=1e-12)
    assert runs[0]["final_train_loss"] != runs[1]["final_train_loss"]  # the seeds differ


@pytest.mark.slow
def test_all_results_table_and_plot(experiment):
    experiment, stdout = experiment
    results = json.loads((experiment / "all_results.json").read_text())
    assert set(results) == {
        f"shakespeare_char_{s}_{kind}" for s in (5, 6) for kind in ("final_info", "train_info", "val_info")
    }
    assert [e["iter"] for e in results["shakespeare_char_5_val_info"]] == [0, 6, 12]
    assert all("loss" in line for line in results["shakespeare_char_5_train_info"])
    table = (experiment / "results.md").read_text().splitlines()
    assert table[0].startswith("| dataset | runs |") and table[2].startswith("| shakespeare_char | 2 |")
    assert "±" in table[2] and "\n".join(table) in stdout  # the table is printed too
    assert (experiment / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mean_and_stderr():
    assert mean_and_stderr([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / math.sqrt(3)))
    assert mean_and_stderr([4.0]) == (4.0, None)  # undefined for one run: null in the JSON


@pytest.mark.parametrize(
    "arg, message", [("--dataset=text8", "--datasets"), ("--seeds=0", "seeds"), ("--max_iter=3", "max_iters")]
)
def test_bad_options(arg, message, capsys):
    assert cli(["experiment", arg]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_stopped_experiment_continues_where_it_stopped(experiment, tmp_path, monkeypatch, capsys):
    """SIGTERM in seed 6's iteration 3: seed 5 is done, seed 6 saved, no aggregates yet. The same command
    again keeps seed 5, resumes seed 6 exactly (its losses equal the uninterrupted experiment's) and
    writes the aggregates. The same folder with another config is refused."""
    whole, _ = experiment
    data_dir, out = whole.parent / "data", tmp_path / "runs"
    forward, calls = GPT.forward, []

    def sigterm_in_seed_6(self, idx, targets=None, kv_cache=None, **kwargs):
        if self.training:
            calls.append(1)
            if len(calls) == 12 + 4:  # seed 5's 12 iterations, then seed 6's 4th
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, idx, targets, kv_cache, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(GPT, "forward", sigterm_in_seed_6)
        stdout = run_experiment(out, data_dir, exit_code=128 + signal.SIGTERM)
    assert "the same command again" in stdout and not (out / "final_info.json").exists()
    seed_5, seed_6 = (out / "shakespeare_char" / f"seed_{s}" for s in (5, 6))
    assert (seed_5 / "final_info.json").is_file() and not (seed_6 / "final_info.json").exists()
    done = (seed_5 / "final_info.json").read_text()

    stdout = run_experiment(out, data_dir)
    assert "(done earlier: kept)" in stdout and "(stopped earlier: resuming)" in stdout
    assert (seed_5 / "final_info.json").read_text() == done
    losses = lambda run: [(r["iter"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run)]
    assert losses(seed_6) == losses(whole / "shakespeare_char" / "seed_6")
    best = lambda out: json.loads((out / "final_info.json").read_text())["shakespeare_char"]["means"]
    assert best(out)["best_val_loss_mean"] == best(whole)["best_val_loss_mean"]

    capsys.readouterr()
    run_experiment(out, data_dir, "--max_iters=20", exit_code=1)
    assert "another training config (differs in: max_iters)" in capsys.readouterr().err


VARIANTS = """
[baseline]

[modern]  # the model options with Muon and WSD, as in benchmarks/ablation_recipe.toml
position = "rope"
norm = "rmsnorm"
optimizer = "muon"
lr_schedule = "wsd"

[wide]
n_embd = 48
"""


@pytest.mark.slow
def test_named_variants_over_seeds(experiment, tmp_path):
    """--variants: each [NAME] table's overrides on top of the command line's, over the seeds, in
    OUT/NAME/DATASET/seed_S; a table with the variants as rows (final val loss, ms/iter, seconds to the
    target loss) and curves against seconds. --only runs some; the same command keeps finished runs."""
    whole, _ = experiment
    variants = tmp_path / "variants.toml"
    variants.write_text(VARIANTS)
    data_dir, out = whole.parent / "data", tmp_path / "runs"
    args = (f"--variants={variants}", "--only=baseline,modern", "--target_loss=4.0")
    stdout = run_experiment(out, data_dir, *args)
    config = lambda v, s: json.loads((out / v / "shakespeare_char" / f"seed_{s}" / "config.json").read_text())
    assert (config("modern", 5)["position"], config("modern", 6)["optimizer"]) == ("rope", "muon")
    assert config("baseline", 5)["position"] == "learned" and config("modern", 5)["n_embd"] == 32
    assert config("modern", 5)["max_iters"] == 12  # the command line's, for every variant
    assert not (out / "wide").exists()
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| variant | runs |") and "ms/iter" in table[0] and "s to target" in table[0]
    assert [row.split(" | ")[0] for row in table[2:]] == ["| baseline", "| modern"]
    agg = json.loads((out / "final_info.json").read_text())
    for name in ("baseline", "modern"):
        evals = [
            [r for r in read_metrics(out / name / "shakespeare_char" / f"seed_{s}") if "val_loss" in r]
            for s in (5, 6)
        ]
        runs = agg[name]["final_info_dict"]
        assert runs["final_val_loss"] == [e[-1]["val_loss"] for e in evals]
        first_below = [next((r["elapsed_s"] for r in e if r["val_loss"] <= 4.0), None) for e in evals]
        assert runs["seconds_to_target"] == first_below
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(done earlier: kept)" in run_experiment(out, data_dir, *args) and "| modern |" in stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        ("--only=fast", "--only names fast, not variants"),
        ("", "--only picks variants"),
    ],
)
def test_bad_variant_options(extra, message, tmp_path, capsys):
    variants = tmp_path / "v.toml"
    variants.write_text(VARIANTS)
    args = [f"--variants={variants}", extra] if "fast" in extra else ["--only=baseline"]
    assert cli(["experiment", *args]) == 1
    assert message in capsys.readouterr().err


def test_a_variant_may_not_set_the_dataset(tmp_path, capsys):
    variants = tmp_path / "v.toml"
    variants.write_text('[odd]\ndataset = "text8"\n')
    assert cli(["experiment", f"--variants={variants}"]) == 1
    assert "variant 'odd'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "/tmp/abs_escape", "back\\\\slash"])
def test_a_variant_name_that_is_not_a_plain_folder_name_is_refused(name, tmp_path, capsys):
    """A variant's name becomes OUT/NAME/: a path there would write runs outside --out."""
    variants = tmp_path / "v.toml"
    variants.write_text(f"[{json.dumps(name)}]\nn_layer = 2\n")
    assert cli(["experiment", f"--variants={variants}", f"--out={tmp_path / 'runs'}"]) == 1
    err = capsys.readouterr().err
    assert f"variant of {variants} {name!r} cannot be a folder name inside --out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.toml"]


def test_a_dataset_name_that_is_not_a_plain_folder_name_is_refused(tmp_path, capsys):
    assert cli(["experiment", "--datasets=../up", f"--out={tmp_path / 'runs'}"]) == 1
    assert "dataset '../up' cannot be a folder name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # two 12-step runs, each scoring the task at 3 evaluations
def test_eval_tasks_become_columns_of_the_table(sources_dir, tmp_path, monkeypatch):
    """--eval_tasks in an experiment: each run's row holds the task accuracy of its last evaluation, the
    aggregate is their mean, and the table gains the column."""
    task = tmp_path / "mytask.jsonl"
    items = [{"query": f"the {w} is", "choices": [" red", " blue", " gone"], "gold": i % 3} for i, w in
             enumerate(["king", "queen", "horse", "dog", "sea", "hat"])]  # fmt: skip
    task.write_text("".join(json.dumps(item) + "\n" for item in items))
    monkeypatch.setenv("NANOGPT_DATA_SOURCES", str(sources_dir))
    run_experiment(tmp_path / "runs", tmp_path / "data", f"--eval_tasks={task}:mc:0")
    final = json.loads((tmp_path / "runs" / "final_info.json").read_text())["shakespeare_char"]
    last = [[r for r in read_metrics(tmp_path / "runs" / "shakespeare_char" / f"seed_{s}") if "val_loss" in r][-1]
            for s in (5, 6)]  # fmt: skip
    per_run = [r["mytask_accuracy"] for r in last]
    assert final["final_info_dict"]["mytask_accuracy"] == per_run
    assert final["means"]["mytask_accuracy_mean"] == pytest.approx(np.mean(per_run))
    header = (tmp_path / "runs" / "results.md").read_text().splitlines()[0]
    assert header.endswith("| mytask accuracy |"), header
