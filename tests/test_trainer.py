"""The training loop on a tiny model and real text: logs, checkpoints, exact resume, signals, failures."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ends_with_this_process, tiny_train_config

from nanogpt.checkpoint import load_checkpoint, model_from_checkpoint, resume_path, save_checkpoint
from nanogpt.errors import NanoGPTError
from nanogpt.model import GPT
from nanogpt.options import set_fields
from nanogpt.train.config import TrainConfig
from nanogpt.train.metrics import read_metrics
from nanogpt.train.trainer import train

REPO = Path(__file__).resolve().parents[1]


def tiny(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """Dropout and 2 micro-steps exercise the RNG and gradient accumulation."""
    return tiny_train_config(
        data_dir,
        out_dir,
        **{
            **dict(
                gradient_accumulation_steps=2,
                dropout=0.1,
                max_iters=8,
                lr_decay_iters=8,
                min_lr=3e-4,
                eval_interval=4,
                eval_iters=2,
                always_save_checkpoint=True,
            ),
            **overrides,
        },
    )


def cli_args(cfg: TrainConfig) -> list[str]:
    return [f"--{k}={v}" for k, v in vars(cfg).items()]


def loss_by_iter(out_dir: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


@pytest.mark.slow
def test_training_learns_and_records_everything(data_dir, tmp_path):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    cfg = tiny(data_dir, out, max_iters=60, eval_interval=30, eval_iters=10, dropout=0.0)
    result = train(set_fields(cfg, dict(learning_rate=1e-2, lr_decay_iters=60, min_lr=1e-3), where="test"))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored

    records = read_metrics(out)
    evals = [r for r in records if "val_loss" in r]
    logs = [r for r in records if "loss" in r]
    assert [r["iter"] for r in evals] == [0, 30, 60]
    assert [r["iter"] for r in logs] == list(range(60))
    assert set(logs[0]) >= {"iter", "loss", "lr", "ms", "tokens_per_sec", "mfu"}
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.8  # from ln(65) = 4.17 to well below
    assert result["final_train_loss"] == evals[-1]["train_loss"]
    assert result["best_val_loss"] == min(r["val_loss"] for r in evals)
    assert result["iter_num"] == 60 and result["out_dir"] == str(out) and result["total_train_time"] > 0

    assert json.loads((out / "config.json").read_text())["max_iters"] == 60
    assert (out / "loss.png").stat().st_size > 0
    ckpt = load_checkpoint(out)  # weights_only=True
    assert ckpt["iter_num"] == 60 and ckpt["model_args"]["vocab_size"] == 65
    assert len(ckpt["tokenizer"]["chars"]) == 65  # sampling needs no data folder
    assert not any("_orig_mod." in k for k in ckpt["model"])
    model_from_checkpoint(ckpt)


# the model options and Muon + WSD (optimizer state of both Muon and AdamW in the checkpoint), and the
# weights' average (the checkpoint's model is the average, its raw weights beside it)
MODERN = dict(optimizer="muon", lr_schedule="wsd", position="rope", norm="rmsnorm", qk_norm=True, mlp="relu2",
              tie_embeddings=False, logit_softcap=15.0, zero_init_proj=True, residual_scalars=True,
              value_embeddings=True, muon_split_qkv=True, muon_ns_steps=3, label_smoothing=0.1, ema_decay=0.9)  # fmt: skip


@pytest.mark.parametrize("recipe", [{}, MODERN], ids=["gpt2", "modern"])
def test_exact_resume(data_dir, tmp_path, recipe):
    """N + M iterations in one run == N, a stop, and M more with init_from=resume: bit for bit on the CPU
    (dropout and two micro-steps per iteration included). The first part stops between two evals."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(tiny(data_dir, whole, max_iters=10, **recipe))
    train(tiny(data_dir, part, max_iters=5, **recipe))
    assert load_checkpoint(part)["iter_num"] == 5
    train(tiny(data_dir, part, max_iters=10, init_from="resume", **recipe))

    assert loss_by_iter(part) == loss_by_iter(whole)  # the first part's records are kept
    evals = lambda out: {r["iter"]: r["val_loss"] for r in read_metrics(out) if "val_loss" in r}
    assert evals(part)[8] == evals(whole)[8] and evals(part)[10] == evals(whole)[10]
    a, b = load_checkpoint(whole), load_checkpoint(part)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert ("ema" in a) == ("ema_decay" in recipe)
    for key, value in a.get("ema", {}).get("raw", {}).items():
        assert torch.equal(value, b["ema"]["raw"][key]), key


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly(data_dir, tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is saved, exit 143 (128 + SIGTERM, so `train && next`
    stops) with a resume hint; resuming gives the same losses as a run never stopped."""
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    cfg = tiny(data_dir, stopped, max_iters=150, eval_interval=50)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nanogpt", "train", *cli_args(cfg)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        preexec_fn=ends_with_this_process(),
    )
    deadline = time.time() + 60
    while not loss_by_iter(stopped) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "--init_from=resume" in output and "Traceback" not in output
    stop_iter = load_checkpoint(stopped)["iter_num"]
    assert 0 < stop_iter < 150

    train(set_fields(cfg, {"init_from": "resume"}, where="test"))
    train(set_fields(cfg, {"out_dir": str(whole)}, where="test"))
    assert loss_by_iter(stopped) == loss_by_iter(whole)


@pytest.mark.slow
def test_label_smoothing_trains_on_smoothed_targets_and_evaluates_plain(data_dir, tmp_path):
    """The same first batch and weights: the logged training loss is the smoothed one, while the
    evaluation before the first step (and so every val loss) is the plain cross-entropy."""
    plain, smoothed = tmp_path / "plain", tmp_path / "smoothed"
    train(tiny(data_dir, plain, max_iters=1, dropout=0.0))
    train(tiny(data_dir, smoothed, max_iters=1, dropout=0.0, label_smoothing=0.2))
    first = lambda out, key: next(r[key] for r in read_metrics(out) if key in r)
    assert first(smoothed, "val_loss") == first(plain, "val_loss")
    # at init the logits are near uniform: smoothing moves the loss towards log(65) from below or above
    assert first(smoothed, "loss") != first(plain, "loss")


def test_signal_stop_keeps_the_best_checkpoint(data_dir, tmp_path, monkeypatch):
    """always_save_checkpoint=false: ckpt.pt is the best model, and a stop must not overwrite it with a worse
    one. The stopped state goes to resume.pt, init_from=resume continues from it exactly, and a completed
    run removes it."""
    forward, calls = GPT.forward, []

    def sigterm_in_iteration_6(self, idx, targets=None, kv_cache=None, **kwargs):
        if self.training:
            calls.append(1)
            if len(calls) == 2 * 6 + 1:  # two micro-steps per iteration
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, idx, targets, kv_cache, **kwargs)

    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    cfg = tiny(data_dir, stopped, max_iters=12, always_save_checkpoint=False, learning_rate=1e-2)
    with monkeypatch.context() as m:
        m.setattr(GPT, "forward", sigterm_in_iteration_6)
        result = train(cfg)
    assert result["stopped_by"] == "SIGTERM" and result["iter_num"] == 7
    best = load_checkpoint(stopped)
    evals = {r["iter"]: r["val_loss"] for r in read_metrics(stopped) if "val_loss" in r}
    assert best["iter_num"] == min(evals, key=evals.get) == 4  # still the best model
    assert load_checkpoint(stopped / "resume.pt")["iter_num"] == 7

    train(set_fields(cfg, {"init_from": "resume"}, where="test"))
    train(set_fields(cfg, {"out_dir": str(whole)}, where="test"))
    assert loss_by_iter(stopped) == loss_by_iter(whole)
    assert not (stopped / "resume.pt").exists()
    assert load_checkpoint(stopped)["iter_num"] == load_checkpoint(whole)["iter_num"]


def test_a_new_ckpt_supersedes_a_stopped_runs_resume_state(tmp_path):
    save_checkpoint({"iter_num": 7}, tmp_path, "resume.pt")
    assert resume_path(tmp_path) == tmp_path / "resume.pt"
    save_checkpoint({"iter_num": 8}, tmp_path)
    assert not (tmp_path / "resume.pt").exists() and resume_path(tmp_path) == tmp_path / "ckpt.pt"


@pytest.mark.slow
def test_kill_9_during_saves_leaves_a_good_checkpoint_and_resumes(data_dir, tmp_path):
    """A checkpoint at every iteration, killed (-9) at random moments three times, each time resumed: the
    last checkpoint on disk always loads, training goes on from it, and the full-size temporary file a
    kill leaves mid-save is removed at the next start."""
    out = tmp_path / "run"
    cfg = tiny(data_dir, out, max_iters=10_000, eval_interval=1, n_embd=64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng, iters = random.Random(0), []
    for attempt in range(3):
        args = cli_args(set_fields(cfg, {"init_from": "resume"}, "test") if attempt else cfg)
        proc = subprocess.Popen([sys.executable, "-m", "nanogpt", "train", *args], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=ends_with_this_process())  # fmt: skip
        before = load_checkpoint(out)["iter_num"] if attempt else 0
        deadline = time.time() + 60
        while (
            not (out / "ckpt.pt").exists() or load_checkpoint(out)["iter_num"] <= before
        ) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.5))  # more saves in flight
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL, proc.stderr.read()
        ckpt = load_checkpoint(out)
        model_from_checkpoint(ckpt)
        iters.append(ckpt["iter_num"])
        (out / f".ckpt.pt.{2**22 + attempt}.tmp").write_bytes(b"x" * 1000)  # as a kill mid-save leaves it
    assert iters == sorted(iters) and iters[0] >= 1 and iters[-1] > iters[0]
    train(set_fields(cfg, {"init_from": "resume", "max_iters": iters[-1] + 2}, "test"))
    assert load_checkpoint(out)["iter_num"] == iters[-1] + 2
    assert not list(out.glob(".*.tmp"))  # the stale temporaries of dead processes are gone


def test_non_finite_loss_stops_and_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch):
    forward, calls = GPT.forward, []

    def nan_from_iteration_6(self, idx, targets=None, kv_cache=None, **kwargs):
        logits, loss = forward(self, idx, targets, kv_cache, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) > 2 * 6:  # two micro-steps per iteration
                loss = loss * math.nan
        return logits, loss

    monkeypatch.setattr(GPT, "forward", nan_from_iteration_6)
    out = tmp_path / "run"
    with pytest.raises(NanoGPTError, match=r"loss is nan at iteration 6.*last good checkpoint"):
        train(tiny(data_dir, out, max_iters=20))
    assert load_checkpoint(out)["iter_num"] == 4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_on_cpu(data_dir, tmp_path, dtype):
    result = train(tiny(data_dir, tmp_path, max_iters=4, dtype=dtype))
    assert math.isfinite(result["final_train_loss"])
    ckpt = load_checkpoint(tmp_path)
    assert bool(ckpt["scaler"]) == (dtype == "float16")  # a gradient scaler for float16 only


def test_eval_only_saves_nothing(data_dir, tmp_path):
    result = train(tiny(data_dir, tmp_path, eval_only=True))
    assert [r["iter"] for r in read_metrics(tmp_path)] == [0]
    assert result["iter_num"] == 0 and math.isfinite(result["best_val_loss"])
    assert not (tmp_path / "ckpt.pt").exists()


def test_fine_tune_a_local_hugging_face_gpt2(data_dir, tmp_path):
    """init_from a local HF GPT-2 folder: its shapes, cropped to block_size; GPT-2's tanh GELU kept."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(vocab_size=65, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path / "hf")
    result = train(tiny(data_dir, tmp_path / "run", init_from=str(tmp_path / "hf"), max_iters=4))
    assert math.isfinite(result["final_train_loss"])
    ckpt = load_checkpoint(tmp_path / "run")
    args = ckpt["model_args"]
    assert (args["n_layer"], args["block_size"], args["gelu_approximate"]) == (2, 16, "tanh")
    assert (ckpt["config"]["n_layer"], ckpt["config"]["bias"]) == (2, True)  # recorded as trained


def test_fine_tuning_with_another_shape_is_refused(data_dir, tmp_path):
    """A shape option given to a fine-tuning run is used or refused: the base's weights decide it."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(vocab_size=65, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path / "hf")
    for change, named in (
        (dict(n_layer=7), "n_layer=7 (its: 2)"),
        (dict(block_size=128), "block_size=128 (its: 64)"),
    ):
        with pytest.raises(NanoGPTError, match=re.escape(named)):
            train(tiny(data_dir, tmp_path / "run", init_from=str(tmp_path / "hf"), max_iters=4, **change))
        assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(NanoGPTError, match="no checkpoint"):
        train(tiny(data_dir, tmp_path, init_from="resume"))


def test_missing_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(NanoGPTError, match="nanogpt prepare"):
        train(tiny(tmp_path, tmp_path / "out", dataset="my_text"))


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_clean_keys(data_dir, tmp_path):
    """torch.compile (with inductor's C++ wrapper on a CPU) trains the same model: the same losses up to
    float32 rounding (no dropout: compiled code draws its own random numbers), and its checkpoint keys
    have no `_orig_mod.` prefix."""
    losses = {}
    for compiled in (False, True):
        train(tiny(data_dir, tmp_path / str(compiled), max_iters=4, dropout=0.0, compile=compiled))
        losses[compiled] = loss_by_iter(tmp_path / str(compiled))
    assert losses[True] == pytest.approx(losses[False], rel=1e-4) and len(losses[True]) == 4
    assert not any("_orig_mod." in k for k in load_checkpoint(tmp_path / "True")["model"])
