"""`nanogpt bench`: its JSON report on a tiny preset-derived model and on a checkpoint, the cache and
recompute runs timed in alternation, and its step == the trainer's step."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from nanogpt import GPT, GPTConfig
from nanogpt.bench import GEN_BATCH_SIZES, measure_generation
from nanogpt.checkpoint import save_checkpoint
from nanogpt.cli import main as cli

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2"]
QUICK = ["--train_iters=2", "--warmup_iters=1", "--repeats=1", "--device=cpu", "--json"]


def positive_numbers(report: dict) -> None:
    for key in ("ms_per_iter", "tokens_per_sec", "mfu", "tokens_per_iter"):
        assert report["train"][key] > 0, key
    assert report["peak_flops"]["float32"] > 0 and report["peak_flops"]["bfloat16"] > 0
    assert [g["batch_size"] for g in report["generate"]] == [1, 8]
    for g in report["generate"]:
        for key in ("new_tokens", "tokens_per_sec_kv_cache", "tokens_per_sec_recompute", "kv_cache_speedup"):
            assert g[key] > 0, key


@pytest.mark.slow
def test_bench_a_preset(sources_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOGPT_DATA_SOURCES", str(sources_dir))
    assert cli(["bench", "--config=shakespeare_char_cpu", f"--data_dir={tmp_path}", *TINY, *QUICK]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # stdout is the JSON alone: progress lines went to stderr
    positive_numbers(report)
    assert report["model"]["vocab_size"] == 65 and report["model"]["n_layer"] == 1
    assert report["train"]["tokens_per_iter"] == 2 * 16
    assert report["generate"][0]["new_tokens"] == 15  # fills the 16-token window after a 1-token prompt


def test_bench_a_checkpoint(tmp_path, capsys):
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    config = {
        "dataset": "somewhere_else",
        "batch_size": 3,
        "gradient_accumulation_steps": 2,
        "init_from": "gpt2",
    }
    ckpt = {"model": model.state_dict(), "model_args": vars(model.config), "config": config}
    save_checkpoint(ckpt, tmp_path)
    assert cli(["bench", f"--out_dir={tmp_path}", "--new_tokens=5", *QUICK]) == 0
    report = json.loads(capsys.readouterr().out)
    positive_numbers(report)
    assert report["train"]["tokens_per_iter"] == 3 * 32 * 2 and report["model"]["vocab_size"] == 50
    assert report["generate"][1]["new_tokens"] == 5


def test_unknown_option_is_reported(capsys):
    assert cli(["bench", "--train_iter=3"]) == 1
    assert "train_iters" in capsys.readouterr().err  # the did-you-mean hint


def test_cache_and_recompute_are_timed_in_alternation(monkeypatch):
    """A machine that slows down halfway must slow both paths alike: their runs alternate, medians kept."""
    model = GPT(GPTConfig(block_size=16, vocab_size=10, n_layer=1, n_head=1, n_embd=8)).eval()
    rates = {True: itertools.cycle([30.0, 10.0, 20.0]), False: itertools.cycle([2.0, 1.0, 4.0])}
    order = []

    def one_run(model, batch_size, new_tokens, use_cache, dtype, repeats):
        assert repeats == 1
        order.append((batch_size, use_cache))
        return next(rates[use_cache])

    monkeypatch.setattr("nanogpt.bench.generation_tokens_per_second", one_run)
    rows = measure_generation(model, 12, "float32", repeats=3)
    assert order == [(b, use_cache) for b in GEN_BATCH_SIZES for _ in range(3) for use_cache in (True, False)]
    for row in rows:
        assert (row["tokens_per_sec_kv_cache"], row["tokens_per_sec_recompute"]) == (20.0, 2.0)
        assert row["kv_cache_speedup"] == 10.0


def test_a_bench_step_is_the_trainers_step(data_dir, tmp_path):
    """From the same weights and batches, the step `nanogpt bench` times and the trainer's step leave the
    same parameters (same optimizer settings, accumulation, clipping and scaler)."""
    from conftest import tiny_train_config

    from nanogpt.bench import bench_step
    from nanogpt.train.distributed import DistEnv
    from nanogpt.train.trainer import Run

    cfg = tiny_train_config(
        data_dir, tmp_path / "run", gradient_accumulation_steps=2, grad_clip=0.5, max_iters=4
    )
    run = Run(cfg, DistEnv(), "cpu")
    model, initial = copy.deepcopy(run.raw_model), copy.deepcopy(run.raw_model)
    theirs = bench_step(model, model, cfg, "cpu", "float32")
    batches = [run.loader.get_batch("train") for _ in range(4)]
    for a in (0, 2):  # two steps of two micro-batches, the lr as the trainer sets it at iteration 0
        for step in (run.step, theirs):
            step.optimizer.param_groups[0]["lr"] = step.optimizer.param_groups[1]["lr"] = 1e-3
            pending = iter(batches[a : a + 2])
            step(lambda pending=pending: next(pending))
    for (name, ours), (_, bench) in zip(
        run.raw_model.named_parameters(), model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(bench, ours, atol=0, rtol=0, msg=name)
    assert not torch.equal(model.transformer.wte.weight, initial.transformer.wte.weight)  # they did step
