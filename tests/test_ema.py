"""The weights' moving average (ema_decay): its arithmetic against the formula, its swap in and out of the
model, and a training run with it: the same training as without, evaluated and saved on the average."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from nanogpt.checkpoint import load_checkpoint, model_from_checkpoint
from nanogpt.data.loader import BatchLoader
from nanogpt.errors import NanoGPTError
from nanogpt.train.distributed import DistEnv
from nanogpt.train.ema import WeightEMA
from nanogpt.train.metrics import read_metrics
from nanogpt.train.trainer import estimate_loss, train


def test_average_follows_the_formula_with_its_warm_up():
    """Five 'steps' of known weights: the average is the recursion of ema.py's docstring, d_t =
    min(decay, (1 + t) / (10 + t)) at update t = 1, 2, ..., computed here in float64."""
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    ema = WeightEMA(model, decay=0.2)  # the warm-up's (1 + t) / (10 + t) is below 0.2 at t = 1 only
    expected = [p.detach().double().clone() for p in (model.weight, model.bias)]
    generator = torch.Generator().manual_seed(0)
    for t in range(1, 6):
        with torch.no_grad():
            for p in (model.weight, model.bias):
                p.copy_(torch.randn(p.shape, generator=generator))
        ema.update()
        d = min(0.2, (1 + t) / (10 + t))
        expected = [
            e + (1 - d) * (p.detach().double() - e)
            for e, p in zip(expected, (model.weight, model.bias), strict=True)
        ]
    assert ema.updates == 5 and len(ema.average) == 2  # the frozen parameter is not averaged
    for average, e in zip(ema.average, expected, strict=True):
        torch.testing.assert_close(average.double(), e, rtol=1e-6, atol=1e-7)


def test_applied_swaps_the_average_in_and_the_weights_back_exactly():
    model = torch.nn.Linear(4, 4)
    ema = WeightEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    raw = model.weight.detach().clone()
    ema.update()
    with ema.applied():
        assert torch.equal(model.weight, ema.average[0]) and not torch.equal(model.weight, raw)
    assert torch.equal(model.weight, raw)
    with contextlib.suppress(RuntimeError), ema.applied():  # an evaluation that fails still gives them back
        raise RuntimeError
    assert torch.equal(model.weight, raw) and torch.equal(ema.raw_state()["weight"], raw)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ema_decay": 1.0}, "ema_decay must be in"),
        ({"ema_decay": 0.99, "parallel": "fsdp"}, "parallel=fsdp"),
    ],
)
def test_bad_ema_options_are_refused(tmp_path, overrides, message):
    with pytest.raises(NanoGPTError, match=message):
        tiny_train_config(tmp_path, tmp_path / "out", **overrides)


def val_loss_of(out_dir: Path, data_dir: Path, cfg) -> float:
    """The checkpoint's model on the evaluation batches the run itself used (estimate_loss draws them)."""
    model = model_from_checkpoint(load_checkpoint(out_dir)).eval()
    loader = lambda seed: BatchLoader(
        data_dir / "shakespeare_char", cfg.batch_size, cfg.block_size, "cpu", seed
    )
    return estimate_loss(model, loader, cfg, cfg.block_size, "cpu", contextlib.nullcontext(), DistEnv())[
        "val"
    ]


@pytest.mark.slow
def test_a_run_with_ema_trains_as_without_and_evaluates_and_saves_the_average(data_dir, tmp_path):
    """The same seed with and without ema_decay: the same training losses and raw weights (the average
    never feeds back), other val losses (they are the average's), and the saved model is the one
    evaluated: its val loss on the run's evaluation batches is the last one logged."""
    runs = {}
    for decay in (0.0, 0.9):
        schedule = dict(max_iters=30, lr_decay_iters=30, eval_interval=15, eval_iters=4, learning_rate=1e-2)
        cfg = tiny_train_config(data_dir, tmp_path / str(decay), ema_decay=decay, **schedule)
        train(cfg)
        runs[decay] = cfg, read_metrics(cfg.out_dir), load_checkpoint(cfg.out_dir)
    (_, plain, plain_ckpt), (cfg, averaged, ckpt) = runs[0.0], runs[0.9]
    losses = lambda records, key: [r[key] for r in records if key in r]
    assert losses(averaged, "loss") == losses(plain, "loss")
    for name, value in ckpt["ema"]["raw"].items():
        assert torch.equal(value, plain_ckpt["model"][name]), name
    assert ckpt["ema"]["updates"] == 30 and "ema" not in plain_ckpt
    assert losses(averaged, "val_loss")[0] == losses(plain, "val_loss")[0]  # before any step: the same
    assert losses(averaged, "val_loss")[1:] != losses(plain, "val_loss")[1:]
    assert val_loss_of(Path(cfg.out_dir), data_dir, cfg) == pytest.approx(
        losses(averaged, "val_loss")[-1], rel=1e-6
    )
