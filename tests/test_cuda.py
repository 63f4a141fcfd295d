"""The GPU paths, where a CUDA device is present (skipped elsewhere, CI included): training on CUDA agrees
with the CPU, float16 trains through the gradient scaler, compiled bf16 agrees with eager, a stopped run
resumes, generation's KV cache equals recomputing, and its CUDA graph replays the eager step exactly."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_train_config

from nanogpt import GPT, GPTConfig
from nanogpt.checkpoint import load_checkpoint
from nanogpt.generate import CUDAGraphStep, Sampling, generate, new_kv_cache
from nanogpt.options import set_fields
from nanogpt.train.metrics import read_metrics
from nanogpt.train.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def config(data_dir, out_dir, **overrides):
    return tiny_train_config(data_dir, out_dir, **{"device": "cuda", "eval_iters": 2, **overrides})


def losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir) if "loss" in r]


def test_cuda_training_matches_cpu(data_dir, tmp_path):
    """Same batches (the loader draws them on the CPU), same initial weights: the float32 losses agree to
    TF32 rounding (the trainer allows TF32 matmuls on Ampere+), and the GPU run saves a CPU-loadable
    checkpoint."""
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = config(data_dir, tmp_path / device, device=device, max_iters=20, eval_interval=20)
        train(cfg)
        runs[device] = losses(tmp_path / device)
    assert len(runs["cuda"]) == 20
    assert runs["cuda"] == pytest.approx(runs["cpu"], abs=5e-3)
    assert load_checkpoint(tmp_path / "cuda", map_location="cpu")["iter_num"] == 20


def test_cuda_float16_trains_through_the_gradient_scaler(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, dtype="float16", max_iters=150, eval_interval=150)
    result = train(set_fields(cfg, {"learning_rate": 1e-2}, where="test"))
    run = losses(tmp_path)
    assert all(math.isfinite(x) for x in run)
    assert sum(run[-10:]) / 10 < run[0] - 1.0  # from ln(65) = 4.17 down
    scaler = load_checkpoint(tmp_path)["scaler"]
    assert scaler and scaler["scale"] > 0  # the scaler ran and its state is saved for resume
    assert math.isfinite(result["best_val_loss"])


def test_cuda_compiled_bf16_matches_eager(data_dir, tmp_path):
    runs = {}
    for compile in (False, True):
        out = tmp_path / f"compile_{compile}"
        train(config(data_dir, out, dtype="bfloat16", compile=compile, max_iters=12, eval_interval=12))
        runs[compile] = losses(out)
    assert runs[True] == pytest.approx(runs[False], abs=3e-2)  # bf16 rounding, fused differently


def test_cuda_resume_continues_the_run(data_dir, tmp_path):
    """N + M iterations == N, stop, M more: close, not bitwise (CUDA's embedding backward adds with
    atomics, in no fixed order)."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    cfg = dict(max_iters=16, eval_interval=8, dropout=0.1, always_save_checkpoint=True)
    train(config(data_dir, whole, **cfg))
    train(config(data_dir, part, **{**cfg, "max_iters": 8}))
    train(config(data_dir, part, **{**cfg, "init_from": "resume"}))
    assert losses(part) == pytest.approx(losses(whole), abs=1e-3)


@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_generate_with_cache_equals_recompute(batch):
    torch.manual_seed(0)
    model = (
        GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32)).cuda().double().eval()
    )
    prompt = torch.randint(0, 65, (batch, 5), device="cuda")
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator(device="cuda").manual_seed(7)
        outs.append(
            generate(model, prompt, 50, sampling=Sampling(1.0, top_k=20), use_cache=use_cache, generator=gen)
        )
    assert outs[0].shape == (batch, 55) and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graph_replays_the_eager_decoding_step(compiled):
    """Under bf16 autocast, as `nanogpt sample` runs: every replay gives bitwise the logits of the eager
    step on a second cache (the same kernels), as the cache fills position by position."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=65, n_layer=2, n_head=2, n_embd=64)).cuda().eval()
    if compiled:
        model.compile()
    tokens = torch.randint(0, 65, (3, 20), device="cuda")
    device = tokens.device
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        graphed, eager = new_kv_cache(model, 32, device), new_kv_cache(model, 32, device)
        for cache in (graphed, eager):
            model(tokens[:, :5], kv_cache=cache)
        step = CUDAGraphStep(model, graphed, tokens[:, 5:6], 5)
        for t in range(5, 20):
            eager[0].pos.fill_(t)
            expected, _ = model(tokens[:, t : t + 1], kv_cache=eager)
            torch.testing.assert_close(step(tokens[:, t : t + 1], t), expected, atol=0, rtol=0)
