"""LoRA: the adapted model starts as the base, trains adapters only, merges to the same function, agrees
with Hugging Face peft's LoRA, and a LoRA run saves adapters + a base reference and resumes exactly."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from nanogpt import GPT, GPTConfig
from nanogpt.checkpoint import load_checkpoint, load_model, model_from_checkpoint, save_checkpoint
from nanogpt.errors import NanoGPTError
from nanogpt.lora import LoRAConfig, LoRALinear, apply_lora, has_lora, merge_lora
from nanogpt.train.metrics import read_metrics
from nanogpt.train.trainer import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32, bias=True)


def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """B is zero at the start: give it values so the adapters change the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_adapted_model_starts_as_the_base():
    torch.manual_seed(0)
    base = GPT(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 32))
    expected = base(idx, idx)[0]
    model = apply_lora(base, LoRAConfig(rank=4, alpha=8))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * TINY.n_layer
    torch.testing.assert_close(model(idx, idx)[0], expected, atol=0, rtol=0)


def test_only_adapters_train():
    """No gradient and no optimizer state for the base; its weights do not move, the adapters do."""
    torch.manual_seed(0)
    model = apply_lora(GPT(TINY), LoRAConfig(rank=4, targets=("c_attn", "c_fc")))
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    adapters = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert trained == adapters and len(adapters) == 2 * 2 * TINY.n_layer
    idx = torch.randint(0, TINY.vocab_size, (4, 32))
    for _ in range(2):
        model(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert len(optimizer.state) == len(adapters)
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), k
    assert any(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))


def test_merged_model_computes_the_same_function():
    torch.manual_seed(1)
    model = apply_lora(GPT(TINY), LoRAConfig(rank=4, alpha=16, dropout=0.1)).eval()
    randomize_adapters(model)
    idx = torch.randint(0, TINY.vocab_size, (3, 32))
    unmerged = model(idx, idx)[0]
    merged = merge_lora(model)
    assert not has_lora(merged) and set(merged.state_dict()) == set(GPT(TINY).state_dict())
    torch.testing.assert_close(merged(idx, idx)[0], unmerged, atol=1e-5, rtol=0)


def test_targets_are_checked():
    with pytest.raises(NanoGPTError, match="lora_targets"):
        LoRAConfig(targets=("lm_head",))
    with pytest.raises(NanoGPTError, match="lora_rank"):
        LoRAConfig(rank=0)


def test_matches_hugging_face_peft(tmp_path):
    """The same GPT-2 weights and adapters in our model and in peft's LoRA on transformers' GPT-2: the same
    logits, and the same gradients on every adapter."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=32)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "hf")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.0)
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(lora.targets))
    theirs = peft.get_peft_model(theirs, peft_cfg).eval()
    ours = apply_lora(GPT.from_pretrained(str(tmp_path / "hf")), lora).eval()
    randomize_adapters(ours)
    peft_params = dict(theirs.named_parameters())
    pairs = {}  # ours -> peft's, e.g. transformer.h.0.attn.c_attn.lora_A -> ...c_attn.lora_A.default.weight
    for name, p in ours.named_parameters():
        if "lora_" in name:
            module, kind = name.rsplit(".", 1)
            pairs[name] = peft_params[f"base_model.model.{module}.{kind}.default.weight"]
            with torch.no_grad():
                pairs[name].copy_(p)
    assert len(pairs) == 2 * 4 * hf_cfg.n_layer

    idx = torch.randint(0, 101, (2, 32))
    logits, loss = ours(idx, idx)
    out = theirs(input_ids=idx, labels=None)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)
    # HF shifts labels inside; compute the same next-token loss on its logits instead
    their_loss = torch.nn.functional.cross_entropy(out.logits.view(-1, 101), idx.view(-1))
    loss.backward()
    their_loss.backward()
    ours_params = dict(ours.named_parameters())
    for name, p in pairs.items():
        torch.testing.assert_close(ours_params[name].grad, p.grad, atol=1e-6, rtol=1e-4)


# ---- a LoRA training run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory) -> Path:
    """A tiny full training run of ours: the base the LoRA runs below adapt."""
    out = tmp_path_factory.mktemp("base")
    train(tiny_train_config(data_dir, out, max_iters=4, eval_interval=4, eval_iters=2, bias=True))
    return out


def lora_run(data_dir: Path, base: Path, out: Path, **overrides):
    values = dict(
        init_from=str(base),
        lora_rank=4,
        lora_alpha=8.0,
        lora_dropout=0.1,
        max_iters=6,
        lr_decay_iters=6,
        eval_interval=3,
        eval_iters=2,
        gradient_accumulation_steps=2,
        bias=True,  # the base's shape (a resumed run checks its config's shape against the checkpoint's)
    )
    return tiny_train_config(data_dir, out, **{**values, **overrides})


def test_lora_run_saves_adapters_and_resumes_exactly(data_dir, base_run, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(lora_run(data_dir, base_run, whole))
    train(lora_run(data_dir, base_run, part, max_iters=3))
    train(lora_run(data_dir, base_run, part, init_from="resume"))

    ckpt = load_checkpoint(whole)
    assert ckpt["model"] and all(k.endswith((".lora_A", ".lora_B")) for k in ckpt["model"])
    assert ckpt["lora"]["base"] == str(base_run.resolve()) and len(ckpt["lora"]["base_sha256"]) == 64
    loss = lambda out: {r["iter"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert loss(part) == loss(whole)
    resumed = load_checkpoint(part)
    for key, value in ckpt["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    # the base's weights are the base run's, untouched; the adapters are trained
    model, tokenizer = load_model(whole)
    base = model_from_checkpoint(load_checkpoint(base_run))
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert tokenizer.name == "char" and any(
        v.abs().sum() > 0 for k, v in ckpt["model"].items() if "lora_B" in k
    )


def test_a_changed_base_is_refused(data_dir, base_run, tmp_path):
    train(lora_run(data_dir, base_run, tmp_path / "lora", max_iters=3))
    ckpt = load_checkpoint(base_run)
    ckpt["model"] = {k: v + 1e-3 if k.endswith("ln_f.weight") else v for k, v in ckpt["model"].items()}
    save_checkpoint(ckpt, tmp_path / "changed")
    lora = load_checkpoint(tmp_path / "lora")
    lora["lora"]["base"] = str(tmp_path / "changed")
    with pytest.raises(NanoGPTError, match="has changed"):
        model_from_checkpoint(lora)


def test_lora_needs_a_base(data_dir, tmp_path):
    with pytest.raises(NanoGPTError, match="init_from"):
        tiny_train_config(data_dir, tmp_path, lora_rank=4)


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(lora_rank=8), "lora_rank=8 (checkpoint: 4)"),
        (dict(lora_alpha=32.0), "lora_alpha=32.0 (checkpoint: 8.0)"),
        (dict(lora_targets="c_attn"), "lora_targets='c_attn' (checkpoint: 'c_attn,c_proj,c_fc')"),
        (dict(lora_dropout=0.2), "lora_dropout=0.2 (checkpoint: 0.1)"),
    ],
)
def test_resume_with_other_lora_options_is_refused(data_dir, base_run, tmp_path, change, named):
    """The adapters in the checkpoint have its rank, scale and targets: other values given are refused,
    nothing written (they were once recorded in config.json as used while the checkpoint's applied)."""
    out = tmp_path / "lora"
    train(lora_run(data_dir, base_run, out, max_iters=3))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(NanoGPTError, match=re.escape(named)):
        train(lora_run(data_dir, base_run, out, init_from="resume", **change))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_a_bare_resume_of_a_lora_run_records_the_adapters_it_trains(data_dir, base_run, tmp_path):
    out = tmp_path / "lora"
    train(lora_run(data_dir, base_run, out, max_iters=3))
    # no LoRA option at all: the checkpoint's adapters continue, and the records say so
    cfg = tiny_train_config(data_dir, out, init_from="resume", max_iters=6, eval_iters=2, bias=True)
    train(cfg)
    ckpt, written = load_checkpoint(out), json.loads((out / "config.json").read_text())
    for config in (ckpt["config"], written):
        assert (config["lora_rank"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)
    assert ckpt["lora"]["rank"] == 4 and ckpt["iter_num"] == 6


def test_lora_on_a_run_without_adapters_is_refused_on_resume(data_dir, base_run, tmp_path):
    out = Path(shutil.copytree(base_run, tmp_path / "full"))
    with pytest.raises(NanoGPTError, match=re.escape("lora_rank=4 (checkpoint: 0)")):
        train(tiny_train_config(data_dir, out, init_from="resume", max_iters=6, lora_rank=4, bias=True))


def test_lora_rank_and_alpha_ranges(data_dir, base_run, tmp_path):
    with pytest.raises(NanoGPTError, match=r"lora_rank=33 exceeds the adapted Linears' width \(32"):
        train(lora_run(data_dir, base_run, tmp_path / "wide", lora_rank=33))
    with pytest.raises(NanoGPTError, match="lora_alpha must be positive"):
        LoRAConfig(rank=4, alpha=0.0)
    assert not (tmp_path / "wide").exists()


def test_a_deleted_base_is_named_as_this_runs_base(data_dir, base_run, tmp_path):
    base = Path(shutil.copytree(base_run, tmp_path / "base"))
    train(lora_run(data_dir, base, tmp_path / "lora", max_iters=3))
    shutil.rmtree(base)
    with pytest.raises(NanoGPTError, match=rf"this LoRA run's base model '{re.escape(str(base))}' is gone"):
        load_model(tmp_path / "lora")
