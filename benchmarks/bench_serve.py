"""Load test of `nanogpt serve`: N concurrent streaming clients (1, 2, 4, 8, 16), each sending one
completion after another for a fixed time; requests/s, tokens/s, time to first token and latency
(p50/p99), errors and the server's peak RSS; JSON out and a table.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py                  # 10 s per level
    python benchmarks/bench_serve.py --seconds=5 --clients=1,8 --out=/tmp/serve.json

The model has the shakespeare_char_cpu preset's shape (4 layers, 4 heads, n_embd 128, block_size 64, a
65-character vocabulary) with random weights: decoding speed does not depend on what the weights are.
Every request: a 7-character prompt, 57 new tokens (the context's rest), temperature 0.8, streamed with
usage. The server runs with one torch thread (OMP_NUM_THREADS=1); the clients (one asyncio process)
share the machine with it. Target (issue 15): tokens/s at 8 clients >= 4x one client (batching), p99
time to first token under 1 s at 8 clients.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import torch

from nanogpt.checkpoint import save_checkpoint
from nanogpt.data.tokenizers import CharTokenizer
from nanogpt.device import device_name
from nanogpt.files import write_text_atomic
from nanogpt.model import GPT, GPTConfig
from nanogpt.options import parse_options
from nanogpt.train.config import load_train_config

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # its 65
PROMPT = "ROMEO:\n"


@dataclass
class BenchServeConfig:
    clients: str = "1,2,4,8,16"  # concurrent clients, one level each
    seconds: float = 10.0  # per level and repeat
    repeats: int = 3  # the levels run round-robin this many times; medians reported (a busy machine)
    temperature: float = 0.8
    server_threads: int = 1  # OMP_NUM_THREADS of the server process
    max_batch: int = 16
    out: str = "benchmarks/results/bench_serve.json"


def save_model(folder: Path) -> GPT:
    """A random model of the shakespeare_char_cpu preset's shape, saved as a checkpoint in folder."""
    preset = load_train_config(["shakespeare_char_cpu"])
    tok = CharTokenizer(SHAKESPEARE_CHARS)
    shape = dict(
        n_layer=preset.n_layer, n_head=preset.n_head, n_embd=preset.n_embd, block_size=preset.block_size
    )
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, bias=preset.bias, **shape))
    save_checkpoint(
        {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": tok.to_meta()}, folder
    )
    return model


def start_server(folder: Path, cfg: BenchServeConfig) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.server_threads)}
    command = [sys.executable, "-m", "nanogpt", "serve", f"--out_dir={folder}", "--port=0", "--device=cpu"]
    proc = subprocess.Popen(
        [*command, f"--max_batch={cfg.max_batch}"], stdout=subprocess.PIPE, text=True, env=env
    )
    url = re.search(r"http://[\d.]+:\d+", proc.stdout.readline()).group(0)
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not become ready in 60 s")


async def one_request(client: httpx.AsyncClient, temperature: float) -> tuple[float, float, int]:
    """(time to first token, latency, completion tokens) of one streamed completion."""
    body = {"prompt": PROMPT, "max_tokens": 1000, "temperature": temperature, "stream": True}
    body["stream_options"] = {"include_usage": True}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None or tokens == 0:
        raise RuntimeError("a stream without text or usage")
    return first - start, time.perf_counter() - start, tokens


async def client_loop(url: str, deadline: float, temperature: float, results: list, errors: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while time.perf_counter() < deadline:
            try:
                results.append(await one_request(client, temperature))
            except Exception as e:  # counted, not fatal: the table reports errors
                errors.append(repr(e))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def level(url: str, clients: int, cfg: BenchServeConfig) -> dict:
    """Run `clients` clients for cfg.seconds; their figures."""
    results, errors = [], []
    start = time.perf_counter()
    deadline = start + cfg.seconds
    await asyncio.gather(
        *(client_loop(url, deadline, cfg.temperature, results, errors) for _ in range(clients))
    )
    elapsed = time.perf_counter() - start
    ttft, latency = [r[0] for r in results], [r[1] for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "requests_per_s": len(results) / elapsed,
        "tokens_per_s": sum(r[2] for r in results) / elapsed,
        "ttft_p50_ms": 1000 * percentile(ttft, 0.5),
        "ttft_p99_ms": 1000 * percentile(ttft, 0.99),
        "latency_p50_ms": 1000 * percentile(latency, 0.5),
        "latency_p99_ms": 1000 * percentile(latency, 0.99),
    }


def median_level(repeats: list[dict]) -> dict:
    """Each figure's median over the repeats of one level (errors: their sum)."""
    level = {key: statistics.median(r[key] for r in repeats) for key in repeats[0]}
    level["errors"] = sum(r["errors"] for r in repeats)
    level["repeats_tokens_per_s"] = [r["tokens_per_s"] for r in repeats]
    return level


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def table(levels: list[dict]) -> str:
    lines = [
        "| clients | requests/s | tokens/s | vs 1 client | TTFT p50 / p99 (ms) | latency p50 / p99 (ms) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in levels:
        lines.append(
            f"| {r['clients']} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['latency_p50_ms']:.0f} / {r['latency_p99_ms']:.0f} "
            f"| {r['errors']} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    cfg = parse_options(BenchServeConfig, argv, "usage: python benchmarks/bench_serve.py [--key=value ...]")
    if cfg is None:
        return 0
    with tempfile.TemporaryDirectory() as folder:
        model = save_model(Path(folder))
        proc, url = start_server(Path(folder), cfg)
        try:
            asyncio.run(level(url, 1, BenchServeConfig(seconds=1.0)))  # warm-up
            counts = [int(n) for n in cfg.clients.split(",")]
            runs = [[asyncio.run(level(url, n, cfg)) for n in counts] for _ in range(cfg.repeats)]
            levels = [median_level([run[i] for run in runs]) for i in range(len(counts))]
            rss = peak_rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    for r in levels:
        r["speedup"] = r["tokens_per_s"] / levels[0]["tokens_per_s"]
    results = {
        "device": device_name("cpu"),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "model": {"parameters": model.get_num_params(non_embedding=False), **asdict(model.config)},
        "config": asdict(cfg),
        "server_peak_rss_mb": rss,
        "levels": levels,
        "note": "a shared machine: other agents' jobs ran at the same time; compare ratios, not absolutes",
    }
    print(table(levels))
    print(f"server peak RSS {rss:.0f} MB; {results['device']}, {results['cpus']} CPUs")
    write_text_atomic(Path(cfg.out), json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
