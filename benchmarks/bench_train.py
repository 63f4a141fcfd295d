"""Training-step throughput on this machine, side by side in one run: our plain eager float32 path, our
CPU defaults (bf16 autocast, attention="auto", fused AdamW), the same compiled, and Hugging Face's
GPT2LMHeadModel with the same sizes, batch and dtype. Then how the cost grows with block size and width.

    python benchmarks/bench_train.py                      # the shakespeare_char_cpu model, batch 12 x 64
    python benchmarks/bench_train.py --no-compile --json results.json

Contenders run round-robin (a few steps each, many rounds) so that a noisy machine slows them alike;
we report each one's median step time, its ratio to the plain path, MFU against this CPU's measured
matmul peak, its peak RSS (measured in a separate pass first: VmHWM reset through /proc/self/clear_refs)
and its minor page faults per step. The timed rounds run with malloc keeping freed memory, as training
does (nanogpt.perf.keep_freed_memory); --glibc-default times them without.
Inputs are random tokens: data loading is not timed here (it is ~0.2 ms per batch, see test_loader).
Last, the step's matrix products alone in fp32 and bf16: their ratio is the ceiling of the bf16 speedup
where matmuls are most of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from nanogpt import GPT, GPTConfig
from nanogpt.device import device_name
from nanogpt.files import write_text_atomic
from nanogpt.hf import hf_config
from nanogpt.perf import compile_options, keep_freed_memory, matmul_peak_flops
from nanogpt.train.step import TrainStep

BASE = dict(vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)  # shakespeare_char_cpu


def peak_rss_mib() -> float | None:
    """The process's peak resident memory since the last reset_peak_rss (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS counter (Linux >= 4.0)
    except OSError:
        pass


def timed_step(
    forward: torch.nn.Module, model: torch.nn.Module, cfg: GPTConfig, batch: int, bf16: bool, fused: bool
) -> Callable:
    """The trainer's optimizer step (nanogpt.train.step: forward, backward, clipping, AdamW) on a fixed
    random batch; float32 weights, bf16 through autocast if asked."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-3, **({"fused": True} if fused else {"foreach": True})
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # float16 is not timed here
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    step = TrainStep(forward, model, list(model.parameters()), optimizer, scaler, context)
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size))
    y = torch.randint(cfg.vocab_size, (batch, cfg.block_size))
    return lambda: step(lambda: (x, y))


def our_step(cfg: GPTConfig, batch: int, bf16: bool, fused: bool, compile: bool) -> tuple[Callable, GPT]:
    """One optimizer step of our model, as the trainer takes it."""
    torch.manual_seed(0)
    model = GPT(cfg)
    forward = torch.compile(model, options=compile_options("cpu")) if compile else model
    return timed_step(forward, model, cfg, batch, bf16, fused), model


class HFLoss(torch.nn.Module):
    """transformers' GPT2LMHeadModel called as ours is: (x, y) -> (logits, loss)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x).logits
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def hf_step(cfg: GPTConfig, batch: int, bf16: bool, attn_implementation: str) -> Callable:
    """The same step with transformers' GPT2LMHeadModel (same sizes and activation), our loss."""
    import transformers

    torch.manual_seed(0)
    hf_cfg = hf_config(cfg, attn_implementation=attn_implementation)
    model = HFLoss(transformers.GPT2LMHeadModel(hf_cfg).train())
    return timed_step(model, model, cfg, batch, bf16, fused=True)


def step_matmuls(cfg: GPTConfig, batch: int, dtype: torch.dtype) -> Callable:
    """Only the matrix products of one training step, at their shapes and in `dtype`: per Linear the
    forward x W^T, the input gradient dy W and the weight gradient dy^T x; per layer the attention's
    q k^T and att v, forward and backward. Their fp32 / bf16 time ratio bounds what bf16 can buy here."""
    N, C, T, nh = batch * cfg.block_size, cfg.n_embd, cfg.block_size, cfg.n_head
    linears = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)] * cfg.n_layer + [(C, cfg.vocab_size)]
    ops: list[Callable] = []
    for fan_in, fan_out in linears:
        x, w = torch.randn(N, fan_in, dtype=dtype), torch.randn(fan_out, fan_in, dtype=dtype)
        dy = torch.randn(N, fan_out, dtype=dtype)
        ops += [lambda x=x, w=w: x @ w.t(), lambda dy=dy, w=w: dy @ w, lambda dy=dy, x=x: dy.t() @ x]
    q, k, v = (torch.randn(batch * nh, T, C // nh, dtype=dtype) for _ in range(3))
    att = torch.randn(batch * nh, T, T, dtype=dtype)
    attention = [
        lambda: q @ k.transpose(1, 2),  # the scores; backward: d(att) = dy v^T
        lambda: att @ v,  # the output; backward: dq = d(scores) k
        lambda: att.transpose(1, 2) @ q,  # backward: dv = att^T dy, dk = d(scores)^T q
    ]
    ops += attention * (2 * cfg.n_layer)  # each shape twice per layer

    def run() -> None:
        for op in ops:
            op()

    return run


def round_robin(
    steps: dict[str, Callable], rounds: int, per_round: int, warmup: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per step of each contender, timed in interleaved rounds, and its minor page
    faults per step (what the allocator costs: each is a fresh zeroed page)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    faults = dict.fromkeys(steps, 0)
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return medians, {name: n / (rounds * per_round) for name, n in faults.items()}


def rss_of(make: Callable[[], Callable], steps: int = 3) -> float | None:
    reset_peak_rss()
    step = make()
    for _ in range(steps):
        step()
    return peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch_size", type=int, default=12)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the compiled contender"
    )
    parser.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the scaling table")
    parser.add_argument(
        "--glibc-default",
        dest="keep_freed_memory",
        action="store_false",
        help="leave malloc as glibc sets it (training calls nanogpt.perf.keep_freed_memory)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))

    cfg = GPTConfig(block_size=args.block_size, **BASE)
    plain = GPTConfig(block_size=args.block_size, attention="sdpa", **BASE)
    B = args.batch_size
    makers: dict[str, Callable[[], Callable]] = {
        "ours fp32 eager (plain path)": lambda: our_step(plain, B, bf16=False, fused=False, compile=False)[0],
        "ours bf16 eager (CPU defaults)": lambda: our_step(cfg, B, bf16=True, fused=True, compile=False)[0],
        "HF fp32 (sdpa)": lambda: hf_step(cfg, B, bf16=False, attn_implementation="sdpa"),
        "HF bf16 (sdpa)": lambda: hf_step(cfg, B, bf16=True, attn_implementation="sdpa"),
        "HF bf16 (eager attention)": lambda: hf_step(cfg, B, bf16=True, attn_implementation="eager"),
    }
    compile_seconds = None
    if args.compile:
        makers["ours bf16 compiled"] = lambda: our_step(cfg, B, bf16=True, fused=True, compile=True)[0]
        t0 = time.perf_counter()
        our_step(cfg, B, bf16=True, fused=True, compile=True)[0]()  # first call compiles
        compile_seconds = time.perf_counter() - t0

    rss = {name: rss_of(make) for name, make in makers.items()}  # before malloc keeps freed memory
    malloc_tuned = keep_freed_memory("cpu") if args.keep_freed_memory else False
    medians, faults = round_robin({name: make() for name, make in makers.items()}, args.rounds, 3, warmup=3)
    matmul_medians, _ = round_robin(
        {dtype: step_matmuls(cfg, B, getattr(torch, dtype)) for dtype in ("float32", "bfloat16")},
        args.rounds,
        3,
        warmup=3,
    )
    matmul_ms = {dtype: 1000 * t for dtype, t in matmul_medians.items()}
    flops_per_step = our_step(cfg, B, False, False, False)[1].flops_per_token() * B * args.block_size
    peaks = {
        "float32": matmul_peak_flops("cpu", torch.float32),
        "bfloat16": matmul_peak_flops("cpu", torch.bfloat16),
    }
    base = medians["ours fp32 eager (plain path)"]
    rows = []
    for name, dt in medians.items():
        peak = peaks["bfloat16" if "bf16" in name else "float32"]
        rows.append(
            {
                "contender": name,
                "ms_per_iter": 1000 * dt,
                "tokens_per_sec": B * args.block_size / dt,
                "speedup_vs_plain": base / dt,
                "mfu": flops_per_step / dt / peak,
                "peak_rss_mib": rss[name],
                "page_faults_per_iter": faults[name],
            }
        )

    def best(who: str, dtype: str = "") -> float:
        """The best tokens/s among `who`'s contenders (of `dtype`, "fp32" or "bf16", if given)."""
        return max(
            r["tokens_per_sec"] for r in rows if r["contender"].startswith(who) and dtype in r["contender"]
        )

    # ours vs HF: each at its best, and in the same dtype (HF's default attention is sdpa)
    vs_hf = {
        "ours_best_vs_hf_best": best("ours") / best("HF"),
        "fp32_ours_vs_hf": best("ours", "fp32") / best("HF", "fp32"),
        "bf16_ours_best_vs_hf_best": best("ours", "bf16") / best("HF", "bf16"),
        "bf16_ours_best_vs_hf_default": best("ours", "bf16") / best("HF bf16 (sdpa)"),
        "bf16_ours_eager_vs_hf_best": best("ours bf16 eager") / best("HF", "bf16"),
    }

    scaling = []
    if args.scaling:
        for block_size, n_embd in [(64, 128), (128, 128), (256, 128), (64, 256), (64, 384)]:
            c = GPTConfig(**{**BASE, "block_size": block_size, "n_embd": n_embd})
            p = GPTConfig(**{**BASE, "block_size": block_size, "n_embd": n_embd, "attention": "sdpa"})
            m, _ = round_robin(
                {
                    "fp32": our_step(p, B, bf16=False, fused=False, compile=False)[0],
                    "bf16": our_step(c, B, bf16=True, fused=True, compile=False)[0],
                },
                rounds=5,
                per_round=2,
                warmup=2,
            )
            scaling.append(
                {
                    "block_size": block_size,
                    "n_embd": n_embd,
                    "params": GPT(c).get_num_params(),
                    "fp32_ms": 1000 * m["fp32"],
                    "bf16_ms": 1000 * m["bf16"],
                    "bf16_tokens_per_sec": B * block_size / m["bf16"],
                    "bf16_speedup": m["fp32"] / m["bf16"],
                }
            )

    result = {
        "machine": {"cpu": device_name("cpu"), "threads": torch.get_num_threads()},
        "keep_freed_memory": malloc_tuned,
        "torch": torch.__version__,
        "model": {**BASE, "block_size": args.block_size, "batch_size": B},
        "peak_flops": peaks,
        "compile_seconds": compile_seconds,
        "rows": rows,
        "step_matmuls_ms": matmul_ms,  # the matmuls of one step alone
        "step_matmuls_fp32_over_bf16": matmul_ms["float32"] / matmul_ms["bfloat16"],
        **vs_hf,
        "scaling": scaling,
    }
    print(
        f"shakespeare_char_cpu model, batch {B} x {args.block_size}, {result['machine']['threads']} threads, "
        f"torch {torch.__version__}; matmul peak fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s; malloc keeps freed memory: {malloc_tuned}"
    )
    print("| contender | ms/iter | tokens/s | vs plain | MFU | peak RSS MiB | page faults/iter |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rss_text = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] else "n/a"
        print(
            f"| {r['contender']} | {r['ms_per_iter']:.1f} | {r['tokens_per_sec']:,.0f} | "
            f"{r['speedup_vs_plain']:.2f}x | {100 * r['mfu']:.1f}% | {rss_text} | {r['page_faults_per_iter']:,.0f} |"
        )
    print("ours / HF: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in vs_hf.items()), end="")
    print(f"; compile time {compile_seconds:.0f} s" if compile_seconds else "")
    print(
        f"the step's matmuls alone: fp32 {matmul_ms['float32']:.1f} ms, bf16 {matmul_ms['bfloat16']:.1f} ms "
        f"({result['step_matmuls_fp32_over_bf16']:.2f}x): the most bf16 buys where matmuls dominate"
    )
    if scaling:
        print("\n| block | n_embd | params | fp32 ms | bf16 ms | bf16 tokens/s | bf16 speedup |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for s in scaling:
            print(
                f"| {s['block_size']} | {s['n_embd']} | {s['params'] / 1e6:.2f}M | {s['fp32_ms']:.1f} | "
                f"{s['bf16_ms']:.1f} | {s['bf16_tokens_per_sec']:,.0f} | {s['bf16_speedup']:.2f}x |"
            )
    print(json.dumps(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
