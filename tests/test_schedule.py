"""The learning rate schedule (nanogpt/train/schedule.py): nanoGPT's cosine unchanged, WSD's stable phase
and linear decay (so a run can be extended), and the time-budget progress that replaces iterations."""

from __future__ import annotations

import pytest

from nanogpt.train.schedule import get_lr

ARGS = dict(learning_rate=1e-3, warmup_iters=10, lr_decay_iters=110, min_lr=1e-4)


def test_cosine_is_nanogpts():
    """Bit for bit the formula of nanoGPT's train.py (the default must not change any run)."""
    import math

    def nanogpt(it):
        if it < 10:
            return 1e-3 * (it + 1) / (10 + 1)
        if it > 110:
            return 1e-4
        ratio = (it - 10) / (110 - 10)
        return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    assert [get_lr(i, **ARGS) for i in range(130)] == [nanogpt(i) for i in range(130)]


def test_wsd_warms_up_holds_then_decays_linearly():
    lrs = [get_lr(i, **ARGS, schedule="wsd", decay_fraction=0.2) for i in range(120)]
    assert lrs[:10] == [get_lr(i, **ARGS) for i in range(10)]  # the same warmup
    assert lrs[10:91] == pytest.approx([1e-3] * 81, rel=1e-12)  # stable until the last 20% of 100
    assert lrs[100] == pytest.approx((1e-3 + 1e-4) / 2)  # half way down the straight line
    assert lrs[110] == pytest.approx(1e-4) and lrs[111:] == [1e-4] * 9
    steps = [a - b for a, b in zip(lrs[90:110], lrs[91:111], strict=True)]
    assert steps == pytest.approx([9e-4 / 20] * 20)  # linear


def test_wsd_run_can_be_extended():
    """Before its decay a WSD run's lr does not depend on where it ends: a 110-iteration run resumed at
    iteration 80 as a 210-iteration run has had exactly the lrs of a 210-iteration run from the start."""
    short = [get_lr(i, **ARGS, schedule="wsd") for i in range(80)]
    longer = [get_lr(i, **{**ARGS, "lr_decay_iters": 210}, schedule="wsd") for i in range(80)]
    assert short == longer
    cosine = [get_lr(i, **{**ARGS, "lr_decay_iters": 210}) for i in range(80)]
    assert cosine != [get_lr(i, **ARGS) for i in range(80)]  # a cosine run cannot


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_time_budget_progress_replaces_iterations(schedule):
    """progress (the share of a time budget spent) places the run on the decay whatever the iteration;
    warmup still counts iterations."""
    lr = lambda it, progress: get_lr(it, **ARGS, schedule=schedule, progress=progress)  # noqa: E731
    assert lr(3, 0.9) == get_lr(3, **ARGS)  # in warmup
    assert lr(20, 0.0) == 1e-3 and lr(5000, 0.0) == 1e-3
    assert lr(20, 1.0) == pytest.approx(1e-4) and lr(20, 1.01) == 1e-4
    assert lr(20, 0.95) == get_lr(10 + 95, **ARGS, schedule=schedule)  # 95% of the way, by time


def test_unknown_schedule():
    with pytest.raises(ValueError, match="cosine or wsd"):
        get_lr(50, **ARGS, schedule="linear")


@pytest.mark.slow
def test_a_time_budget_stops_the_run_with_a_final_evaluation(data_dir, tmp_path):
    """max_seconds: the run stops long before max_iters, ends with an evaluation and a checkpoint of its
    last iteration, every eval record has the wall time it began at, and the schedule (by time spent) has
    decayed most of the way by the last step."""
    from conftest import tiny_train_config

    from nanogpt.checkpoint import load_checkpoint
    from nanogpt.train.metrics import read_metrics
    from nanogpt.train.trainer import train

    cfg = tiny_train_config(
        data_dir,
        tmp_path,
        max_seconds=3.0,
        max_iters=10**6,
        lr_decay_iters=10**6,
        eval_interval=50,
        eval_iters=2,
    )
    result = train(cfg)
    records = read_metrics(tmp_path)
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "loss" in r]
    assert 0 < result["iter_num"] < 10**6 and result["stopped_by"] is None
    assert evals[-1]["iter"] == result["iter_num"] == load_checkpoint(tmp_path)["iter_num"]
    elapsed = [r["elapsed_s"] for r in evals]
    assert elapsed == sorted(elapsed) and elapsed[0] < 1.0 < elapsed[-1] <= result["elapsed_s"]
    assert steps[-1]["lr"] < cfg.learning_rate / 2  # an iteration schedule would still be at the peak
