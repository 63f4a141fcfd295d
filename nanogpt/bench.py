"""`nanogpt bench`: training-step throughput (ms/iter, tokens/s, MFU) and generation throughput (tokens/s
with and without the KV cache, batch 1 and 8) of a preset's model or a checkpoint's.

    nanogpt bench                                          # the shakespeare_char_cpu preset
    nanogpt bench --config=gpt2_124m --device=cuda --dtype=bfloat16 --json
    nanogpt bench --out_dir=out/shakespeare_char --batch_size=32

MFU is measured against this machine's own peak: the best of a few large matmuls in float32 and bfloat16
at start, on the CPU as on a GPU (so it is the fraction of what this device actually does, not of a
datasheet number). Inputs are random tokens: of a preset's dataset only meta.json is read, for the vocabulary
(the dataset is prepared first if it is not yet, as training would).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nanogpt.checkpoint import load_checkpoint, model_from_checkpoint
from nanogpt.data.meta import read_meta
from nanogpt.data.prepare import ensure_prepared
from nanogpt.device import (
    DTYPES,
    autocast,
    device_name,
    device_type,
    resolve_device,
    resolve_dtype,
    synchronize,
)
from nanogpt.errors import NanoGPTError
from nanogpt.model import GPT
from nanogpt.options import read_argv, set_fields, split_options
from nanogpt.perf import (
    compile_options,
    generation_tokens_per_second,
    keep_freed_memory,
    matmul_peak_flops,
    wants_compile,
)
from nanogpt.train.config import TrainConfig, load_train_config
from nanogpt.train.model_init import init_model
from nanogpt.train.optim import build_optimizer
from nanogpt.train.step import TrainStep, new_scaler

GEN_BATCH_SIZES = (1, 8)


@dataclass
class BenchOptions:
    """bench's own options; every other --key=value is a TrainConfig override (device, dtype, batch_size,
    block_size, n_layer, compile, ...)."""

    config: str = "shakespeare_char_cpu"  # the training preset whose model and batch shape are measured
    out_dir: str = ""  # measure this checkpoint's model and training config instead of a preset's
    train_iters: int = 10  # timed training steps (after warmup_iters untimed ones); the median is reported
    warmup_iters: int = 3  # untimed steps first (allocator, kernels, a compile)
    new_tokens: int = 0  # tokens generated per sequence; 0: fill the context window after a 1-token prompt
    repeats: int = 3  # timed generate() runs per setting; the median is reported
    json: bool = False  # print one JSON object (progress goes to stderr)

    def __post_init__(self):
        if self.train_iters < 1 or self.warmup_iters < 0 or self.new_tokens < 0 or self.repeats < 1:
            raise NanoGPTError("train_iters and repeats must be >= 1, warmup_iters and new_tokens >= 0")


def bench_step(
    model: torch.nn.Module, raw_model: GPT, cfg: TrainConfig, device: str, dtype: str
) -> TrainStep:
    """The optimizer step the trainer would take with `cfg` on one process (tested to match it)."""
    optimizer = build_optimizer(raw_model, cfg, device_type(device))  # AdamW, or Muon + AdamW
    scaler = new_scaler(device, dtype)
    context = autocast(device, dtype)
    params = list(raw_model.parameters())
    return TrainStep(
        model, model, params, optimizer, scaler, context, cfg.gradient_accumulation_steps, cfg.grad_clip
    )


def measure_training(
    model: torch.nn.Module,
    raw_model: GPT,
    cfg: TrainConfig,
    device: str,
    dtype: str,
    iters: int,
    warmup: int,
    peak_flops: float,
) -> dict[str, float]:
    """Median time of the trainer's optimizer step (nanogpt.train.step: gradient_accumulation_steps
    micro-batches of random tokens, forward, backward, clipping, AdamW) -> ms/iter, tokens/s and MFU.
    `model` is what runs the steps (raw_model, or it compiled)."""
    B, T, accum = cfg.batch_size, raw_model.config.block_size, cfg.gradient_accumulation_steps
    model.train()
    step = bench_step(model, raw_model, cfg, device, dtype)
    x = torch.randint(raw_model.config.vocab_size, (B, T), device=device)
    y = torch.randint(raw_model.config.vocab_size, (B, T), device=device)
    times = []
    for i in range(warmup + iters):
        synchronize(device)
        t0 = time.perf_counter()
        step(lambda: (x, y))
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    model.eval()
    dt = statistics.median(times)
    return {
        "ms_per_iter": 1000 * dt,
        "tokens_per_iter": B * T * accum,
        "tokens_per_sec": B * T * accum / dt,
        "mfu": raw_model.estimate_mfu(B * accum, dt, peak_flops),
    }


def measure_generation(model: GPT, new_tokens: int, dtype: str, repeats: int) -> list[dict[str, Any]]:
    """Tokens/s with and without the KV cache at each of GEN_BATCH_SIZES: medians of `repeats` runs of
    each, the two timed in alternation so that a machine whose speed drifts slows both alike."""
    rows = []
    for batch_size in GEN_BATCH_SIZES:
        runs: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeats):
            for use_cache, timed in runs.items():
                timed.append(generation_tokens_per_second(model, batch_size, new_tokens, use_cache, dtype, 1))
        rates = {use_cache: statistics.median(r) for use_cache, r in runs.items()}
        rows.append(
            {
                "batch_size": batch_size,
                "new_tokens": new_tokens,
                "tokens_per_sec_kv_cache": rates[True],
                "tokens_per_sec_recompute": rates[False],
                "kv_cache_speedup": rates[True] / rates[False],
            }
        )
    return rows


def bench_setup(opts: BenchOptions, overrides: dict[str, Any]) -> tuple[GPT, TrainConfig, str]:
    """(model, training config, where they came from): a checkpoint's, or a preset's model initialised as
    training would (its vocabulary is that of the preset's dataset, prepared first if need be)."""
    if opts.out_dir:
        ckpt = load_checkpoint(opts.out_dir)
        # the weights are in hand: where they first came from (init_from) no longer matters
        saved = {**(ckpt.get("config") or {}), "init_from": "scratch"}
        cfg = set_fields(TrainConfig(), saved, f"{opts.out_dir}'s training config")
        return model_from_checkpoint(ckpt), set_fields(cfg, overrides, "command line"), opts.out_dir
    cfg = set_fields(load_train_config([opts.config]), overrides, "command line")
    meta = read_meta(ensure_prepared(cfg.dataset, cfg.data_dir))
    torch.manual_seed(cfg.seed)
    return init_model(cfg, meta, None), cfg, f"preset {opts.config}"


def run_bench(opts: BenchOptions, overrides: dict[str, Any]) -> dict[str, Any]:
    """Everything `nanogpt bench` reports, as one JSON-able dict."""
    model, cfg, source = bench_setup(opts, overrides)
    device = resolve_device(cfg.device)
    keep_freed_memory(device)  # as training does
    dtype = resolve_dtype(cfg.dtype, device)
    compile = wants_compile(cfg.compile, device, cfg.max_seconds)  # as training decides
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    model.to(device)
    peaks = {
        name: matmul_peak_flops(device, DTYPES[name])
        for name in dict.fromkeys(("float32", "bfloat16", dtype))
    }
    # only the training steps run compiled: generation below stays eager
    train_model = torch.compile(model, options=compile_options(device)) if compile else model
    train = measure_training(
        train_model, model, cfg, device, dtype, opts.train_iters, opts.warmup_iters, peaks[dtype]
    )
    new_tokens = opts.new_tokens or model.config.block_size - 1
    return {
        "source": source,
        "device": device,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "compile": compile,
        "model": {**asdict(model.config), "params": model.get_num_params()},
        "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "peak_flops": peaks,
        "peak_flops_source": "measured matmul",
        "train": train,
        "generate": measure_generation(model, new_tokens, dtype, opts.repeats),
    }


def format_report(r: dict[str, Any]) -> str:
    m, t = r["model"], r["train"]
    lines = [
        f"{r['source']}: {m['params'] / 1e6:.2f}M params, {m['n_layer']} layers, n_embd {m['n_embd']}, "
        f"block {m['block_size']}, vocab {m['vocab_size']} on {r['device_name']} ({r['threads']} threads), "
        f"{r['dtype']}",
        "peak (measured matmul): "
        + ", ".join(f"{name} {flops / 1e12:.3f} TFLOP/s" for name, flops in r["peak_flops"].items()),
        f"train: batch {r['batch_size']} x {r['gradient_accumulation_steps']} accum: {t['ms_per_iter']:.1f} "
        f"ms/iter, {t['tokens_per_sec']:,.0f} tokens/s, MFU {100 * t['mfu']:.1f}%",
        "",
        "| batch | new tokens | tokens/s (KV cache) | tokens/s (recompute) | speedup |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {g['batch_size']} | {g['new_tokens']} | {g['tokens_per_sec_kv_cache']:,.0f} | "
        f"{g['tokens_per_sec_recompute']:,.0f} | {g['kv_cache_speedup']:.2f}x |"
        for g in r["generate"]
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    overrides = read_argv(
        BenchOptions, argv, "usage: nanogpt bench [--key=value ...]  (+ any training config key)"
    )
    if overrides is None:
        return 0
    own, train_overrides = split_options(BenchOptions, overrides, TrainConfig)
    opts = set_fields(BenchOptions(), own, "command line")
    # with --json, stdout carries the JSON alone: the progress lines of the steps go to stderr
    with contextlib.redirect_stdout(sys.stderr if opts.json else sys.stdout):
        report = run_bench(opts, train_overrides)
    print(json.dumps(report) if opts.json else format_report(report))
    return 0
