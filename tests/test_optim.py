"""The optimizers (nanogpt/train/optim.py): AdamW as nanoGPT's, and Muon for the blocks' matrices with
AdamW for the rest: who gets which, the learning-rate convention, state saved and loaded by parameter
name, a training run's schedule on both, DDP equal to one process, and FSDP refused."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import tiny_train_config
from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict

from nanogpt import GPT, GPTConfig
from nanogpt.checkpoint import load_checkpoint
from nanogpt.train.muon import Muon
from nanogpt.train.optim import ChainedOptimizer, build_optimizer
from nanogpt.train.schedule import get_lr
from nanogpt.train.trainer import FULL_STATE, train

TINY = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)


def muon_config(**overrides):
    """A TrainConfig asking for Muon (only the optimizer fields matter here)."""
    from nanogpt.options import set_fields
    from nanogpt.train.config import TrainConfig

    values = dict(optimizer="muon", muon_learning_rate=0.05, learning_rate=1e-3, weight_decay=0.1)
    return set_fields(TrainConfig(), {**values, **overrides}, "test")


def model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def step(net: GPT, optimizer, seed: int) -> None:
    idx = torch.randint(0, 65, (4, 16), generator=torch.Generator().manual_seed(seed))
    net(idx, idx)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    net = model(bias=True, tie_embeddings=False)
    optimizer = build_optimizer(net, muon_config(), "cpu")
    muon, adamw = optimizer
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in net.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert muon_names == {
        n for n, p in net.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2
    }
    assert len(muon_names) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    decayed = {names[id(p)] for g in adamw.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    counted = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert counted == net.get_num_params(non_embedding=False)  # every parameter exactly once
    group = muon.param_groups[0]
    assert (group["lr"], group["momentum"], group["ns_steps"]) == (0.05, 0.95, 5)
    assert all(g["lr"] == 1e-3 for g in adamw.param_groups)
    assert muon.splits == {}
    split, _ = build_optimizer(net, muon_config(muon_split_qkv=True, muon_ns_steps=3), "cpu")
    assert {names[id(p)] for p in split.splits} == {f"transformer.h.{i}.attn.c_attn.weight" for i in (0, 1)}
    assert set(split.splits.values()) == {3} and split.param_groups[0]["ns_steps"] == 3


def test_a_muon_step_moves_each_matrix_by_an_orthogonalised_update():
    """Keller Jordan's convention: the update is lr * sqrt(max(1, rows/cols)) times a matrix whose singular
    values Newton-Schulz puts in about [0.5, 1.5] (not 1 exactly, by design; directions the gradient
    hardly has stay small)."""
    net = model(bias=False)
    optimizer = build_optimizer(net, muon_config(weight_decay=0.0, muon_learning_rate=0.01), "cpu")
    c_attn = net.transformer.h[0].attn.c_attn.weight  # (96, 32): sqrt(max(1, 96 / 32))
    before = c_attn.detach().clone()
    step(net, optimizer, seed=0)
    update = (before - c_attn.detach()) / (0.01 * math.sqrt(3))
    singular = torch.linalg.svdvals(update.double())
    assert 0.7 < singular.max() < 1.6 and ((singular > 0.5) & (singular < 1.5)).float().mean() > 0.75, (
        singular
    )


def test_optimizer_state_is_saved_and_loaded_by_name():
    """Both optimizers' state (Muon's momentum, AdamW's moments) through torch.distributed.checkpoint's
    state dict, the trainer's format: a fresh optimizer loaded from it takes the very next step."""
    a = model()
    opt_a = build_optimizer(a, muon_config(), "cpu")
    for seed in range(3):
        step(a, opt_a, seed)
    buffer = io.BytesIO()  # through bytes, as a checkpoint on disk (the dicts share a's tensors)
    torch.save(get_state_dict(a, opt_a, options=FULL_STATE), buffer)
    model_state, optim_state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert len(optim_state["param_groups"]) == 3  # Muon's and AdamW's two
    assert any("momentum_buffer" in s for s in optim_state["state"].values())
    assert any("exp_avg_sq" in s for s in optim_state["state"].values())

    b = model(seed=1)
    b.load_state_dict(model_state)
    opt_b = build_optimizer(b, muon_config(), "cpu")
    set_optimizer_state_dict(b, opt_b, optim_state, options=FULL_STATE)
    step(a, opt_a, seed=3)
    step(b, opt_b, seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_zero_grad_and_param_groups_cover_both():
    net = model()
    optimizer = build_optimizer(net, muon_config(), "cpu")
    assert isinstance(optimizer, ChainedOptimizer)
    net(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    assert build_optimizer(net, muon_config(optimizer="adamw"), "cpu").__class__ is torch.optim.AdamW


def test_a_muon_run_schedules_both_learning_rates(data_dir, tmp_path):
    """Iteration 6 of a tiny run: AdamW's groups at get_lr, Muon's at muon_learning_rate scaled alike."""
    cfg = tiny_train_config(
        data_dir,
        tmp_path,
        optimizer="muon",
        muon_learning_rate=0.04,
        max_iters=6,
        lr_decay_iters=10,
        min_lr=1e-4,
    )
    result = train(cfg)
    assert math.isfinite(result["final_val_loss"])
    groups = load_checkpoint(tmp_path)["optimizer"]["param_groups"]
    lr = get_lr(5, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr)  # the last step's
    muon = [g for g in groups if "ns_steps" in g]
    assert len(muon) == 1 and muon[0]["lr"] == pytest.approx(0.04 * lr / cfg.learning_rate)
    assert all(g["lr"] == pytest.approx(lr) for g in groups if "ns_steps" not in g)


@pytest.mark.slow
def test_two_processes_with_muon_equal_one(data_dir, tmp_path):
    """DDP all-reduces the gradients in backward, before Muon orthogonalises them: the losses of two
    processes are one process's (to rounding: Newton-Schulz runs in bfloat16)."""
    from test_distributed import tiny, torchrun

    from nanogpt.train.metrics import read_metrics

    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny(data_dir, one, optimizer="muon"))
    result = torchrun(tiny(data_dir, two, optimizer="muon"), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    losses = lambda out: [r.get("loss", r.get("val_loss")) for r in read_metrics(out)]
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)


@pytest.mark.slow
def test_fsdp_with_muon_is_refused(data_dir, tmp_path):
    from test_distributed import tiny, torchrun

    result = torchrun(tiny(data_dir, tmp_path / "out", optimizer="muon", parallel="fsdp"), tmp_path)
    assert result.returncode != 0
    assert "FSDP shards them" in result.stdout + result.stderr


def test_resume_with_the_other_optimizer_is_refused(data_dir, tmp_path, capsys):
    """Muon's state (momentum buffers) and AdamW's (moments, steps) do not convert: one line, files kept
    (was a KeyError from torch's state loading)."""
    from nanogpt.cli import main as cli

    for trained, other in (("muon", "adamw"), ("adamw", "muon")):
        out = tmp_path / trained
        cfg = tiny_train_config(data_dir, out, optimizer=trained, max_iters=2, eval_interval=2, eval_iters=1)
        train(cfg)
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
        argv = [
            f"--{k}={v}" for k, v in vars(cfg).items() if k not in ("optimizer", "init_from", "max_iters")
        ]
        capsys.readouterr()
        assert cli(["train", *argv, "--init_from=resume", "--max_iters=4", f"--optimizer={other}"]) == 1
        err = capsys.readouterr().err
        assert f"optimizer='{other}' (checkpoint: '{trained}')" in err and len(err.strip().splitlines()) == 1
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
