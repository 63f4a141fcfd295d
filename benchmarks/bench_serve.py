"""Load test of `nanogpt serve` in the shape of vLLM's `bench serve`: synthetic prompts of a fixed length,
streamed completions of a fixed length, a fixed-concurrency sweep (1, 2, 4, 8, 16 clients, each sending
one request after another) or Poisson arrivals at given request rates. Per level: output tokens/s,
requests/s, TTFT (time to first token), TPOT (time per output token after the first, per request) and ITL
(the gaps between a stream's chunks), p50 and p99, errors; beside it the decoding engine alone
(nanogpt.generate.BatchDecoder in this process, no HTTP) on the same work, and the server's peak RSS.
JSON and a plot out.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py                         # the baby model, sweep
    python benchmarks/bench_serve.py --model=gpt2_124m --concurrency=1,8 --output_len=32
    python benchmarks/bench_serve.py --request_rates=2,8,32 --seconds=10      # Poisson arrivals
    python benchmarks/bench_serve.py --quantize=int8 --model=gpt2_124m        # the server's --quantize

Models (random weights: speed does not depend on them), saved as a checkpoint the server loads:
  baby: the shakespeare_char_cpu preset's shape (4 layers, 4 heads, n_embd 128, block 64, 65 characters);
  gpt2_124m: GPT-2's (12 x 768, block 1024, GPT-2 BPE, its 50257 tokens).
Prompts: --input_len random characters (baby) or random GPT-2 tokens decoded to text (gpt2_124m); each
request asks for --output_len tokens at temperature 0.8 (a random model never ends early in practice).
Bounded: loopback only (the server binds 127.0.0.1 on a free port), --seconds per level and repeat, each
request has a timeout, Poisson mode holds at most --max_in_flight requests. The levels run round-robin
--repeats times; medians are reported. The server runs with --server_threads torch threads; the clients
(one asyncio process) and the engine-alone runs share the machine with it, one at a time.
Target: 8 clients >= 4x the output tokens/s of one; p99 TTFT < 300 ms at 8 clients (baby).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch

from nanogpt.checkpoint import load_model, save_checkpoint
from nanogpt.data.tokenizers import CharTokenizer, get_tokenizer
from nanogpt.device import device_name
from nanogpt.files import write_text_atomic
from nanogpt.generate import BatchDecoder, Sampling
from nanogpt.model import GPT, GPTConfig
from nanogpt.options import parse_options
from nanogpt.quantization import quantized
from nanogpt.train.config import load_train_config

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # its 65
HOST = "127.0.0.1"  # loopback only


@dataclass
class BenchServeConfig:
    model: str = "baby"  # baby | gpt2_124m
    concurrency: str = "1,2,4,8,16"  # fixed-concurrency levels ("": none)
    request_rates: str = ""  # Poisson levels, requests/s (e.g. "2,8,32"; "": none)
    input_len: int = 8  # prompt length: characters (baby) or GPT-2 tokens (gpt2_124m)
    output_len: int = 48  # new tokens per request
    seconds: float = 8.0  # per level and repeat
    repeats: int = 3  # rounds over the levels; medians reported
    temperature: float = 0.8
    server_threads: int = 1  # OMP_NUM_THREADS of the server process (and of the engine-alone runs)
    max_batch: int = 16
    quantize: str = "none"  # the server's (and the engine's) --quantize
    max_in_flight: int = 64  # Poisson mode: arrivals beyond this many open requests wait
    request_timeout: float = 120.0
    seed: int = 0
    out: str = ""  # "": benchmarks/results/bench_serve_<model>.json (and .png beside it)

    def __post_init__(self):
        if self.model not in ("baby", "gpt2_124m"):
            raise SystemExit(f"--model must be baby or gpt2_124m, got {self.model!r}")
        if self.input_len < 1 or self.output_len < 2 or self.seconds <= 0 or self.repeats < 1:
            raise SystemExit("input_len >= 1, output_len >= 2, seconds > 0 and repeats >= 1, please")


def save_model(folder: Path, name: str) -> tuple[GPT, object]:
    """A random model of the named shape and its tokenizer, saved as a checkpoint in folder."""
    torch.manual_seed(0)
    if name == "baby":
        preset = load_train_config(["shakespeare_char_cpu"])
        tok = CharTokenizer(SHAKESPEARE_CHARS)
        shape = dict(n_layer=preset.n_layer, n_head=preset.n_head, n_embd=preset.n_embd)
        config = GPTConfig(vocab_size=tok.vocab_size, block_size=preset.block_size, bias=preset.bias, **shape)
    else:
        # GPT-2's vocabulary unpadded (50257): a random model draws the padding ids of 50304 now and then,
        # which have no text
        tok, config = get_tokenizer("gpt2"), GPTConfig(vocab_size=50257)
    model = GPT(config).eval()
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": tok.to_meta()}
    save_checkpoint(ckpt, folder)
    return model, tok


def synthetic_prompts(tok, cfg: BenchServeConfig, count: int) -> list[str]:
    """`count` random prompts of cfg.input_len characters (a char model) or tokens (decoded to text)."""
    rng = random.Random(cfg.seed)
    if isinstance(tok, CharTokenizer):
        return ["".join(rng.choices(SHAKESPEARE_CHARS, k=cfg.input_len)) for _ in range(count)]
    vocab = [i for i in range(tok.vocab_size) if i != tok.eot]
    return [tok.decode(rng.choices(vocab, k=cfg.input_len)) for _ in range(count)]


def start_server(folder: Path, cfg: BenchServeConfig) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.server_threads)}
    command = [sys.executable, "-m", "nanogpt", "serve", f"--out_dir={folder}", f"--host={HOST}", "--port=0"]
    command += ["--device=cpu", f"--max_batch={cfg.max_batch}", f"--quantize={cfg.quantize}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    found = re.search(r"http://[\d.]+:\d+", line)
    if not found:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    url = found.group(0)
    deadline = time.monotonic() + 300  # a GPT-2-size checkpoint loads in seconds; a busy machine is slow
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not become ready")


@dataclass
class Record:
    """One streamed request: when it was sent, when each chunk with text came, its completion tokens."""

    start: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0


async def one_request(client: httpx.AsyncClient, prompt: str, cfg: BenchServeConfig) -> Record:
    body = {"prompt": prompt, "max_tokens": cfg.output_len, "temperature": cfg.temperature, "stream": True}
    body["stream_options"] = {"include_usage": True}
    record = Record(time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                record.chunks.append(time.perf_counter())
            if chunk.get("usage"):
                record.tokens = chunk["usage"]["completion_tokens"]
    if not record.chunks or record.tokens == 0:
        raise RuntimeError("a stream without text or usage")
    return record


async def send(client, prompt: str, cfg: BenchServeConfig, records: list, errors: list) -> None:
    try:
        records.append(await one_request(client, prompt, cfg))
    except Exception as e:  # counted, not fatal: the table reports errors
        errors.append(repr(e))


async def concurrency_level(url: str, clients: int, prompts: list[str], cfg: BenchServeConfig) -> dict:
    """`clients` clients, each sending one request after another for cfg.seconds."""
    records, errors = [], []
    start = time.perf_counter()
    deadline = start + cfg.seconds

    async def client_loop(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=cfg.request_timeout) as client:
            i = k
            while time.perf_counter() < deadline:
                await send(client, prompts[i % len(prompts)], cfg, records, errors)
                i += clients

    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    return figures(records, errors, time.perf_counter() - start) | {"concurrency": clients}


async def poisson_level(url: str, rate: float, prompts: list[str], cfg: BenchServeConfig) -> dict:
    """Requests arriving as a Poisson process of `rate` per second for cfg.seconds (vLLM's
    --request-rate), at most cfg.max_in_flight open at once; then the open ones finish."""
    records, errors, tasks = [], [], []
    rng = random.Random(cfg.seed + int(rate * 1000))
    gate = asyncio.Semaphore(cfg.max_in_flight)
    limits = httpx.Limits(max_connections=cfg.max_in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=cfg.request_timeout, limits=limits) as client:

        async def bounded(prompt: str) -> None:
            async with gate:
                await send(client, prompt, cfg, records, errors)

        start = time.perf_counter()
        arrival, i = start, 0
        while arrival < start + cfg.seconds:
            await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
            tasks.append(asyncio.create_task(bounded(prompts[i % len(prompts)])))
            arrival += rng.expovariate(rate)
            i += 1
        await asyncio.gather(*tasks)
    return figures(records, errors, time.perf_counter() - start) | {"request_rate": rate}


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in [0, 1]); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def figures(records: list[Record], errors: list[str], elapsed: float) -> dict:
    """vLLM's figures of one level: throughput, and TTFT / TPOT / ITL p50 and p99 in ms."""
    ttft = [r.chunks[0] - r.start for r in records]
    tpot = [(r.chunks[-1] - r.chunks[0]) / (r.tokens - 1) for r in records if r.tokens > 1]
    itl = [b - a for r in records for a, b in zip(r.chunks, r.chunks[1:], strict=False)]
    out = {
        "requests": len(records),
        "errors": len(errors),
        "requests_per_s": len(records) / elapsed,
        "output_tokens_per_s": sum(r.tokens for r in records) / elapsed,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        out[f"{name}_p50_ms"] = 1000 * percentile(values, 0.5)
        out[f"{name}_p99_ms"] = 1000 * percentile(values, 0.99)
    return out


def engine_tokens_per_s(
    decoder: BatchDecoder, tok, prompts: list[str], batch: int, cfg: BenchServeConfig
) -> float:
    """Output tokens/s of the server's engine alone (one decoder of max_batch rows, as the server keeps,
    its cache allocated by the warm-up): `batch` sequences joined (each prompt read alone, as the server
    does) and decoded together for output_len tokens each, rounds until cfg.seconds / 4."""
    generator = torch.Generator().manual_seed(cfg.seed)
    sampling = Sampling(temperature=cfg.temperature)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < cfg.seconds / 4:
        for k in range(batch):
            decoder.join(k, tok.encode(prompts[k % len(prompts)]), sampling, generator)
        for _ in range(cfg.output_len - 1):
            decoder.step()
        for k in range(batch):
            decoder.leave(k)
        tokens += batch * cfg.output_len
    return tokens / (time.perf_counter() - start)


def median_level(repeats: list[dict]) -> dict:
    """Each figure's median over the repeats of one level (errors: their sum)."""
    level = {key: statistics.median(r[key] for r in repeats) for key in repeats[0]}
    for key in ("concurrency", "request_rate"):  # the level itself, the same in every repeat
        if key in repeats[0]:
            level[key] = repeats[0][key]
    level["errors"] = sum(r["errors"] for r in repeats)
    level["repeats_output_tokens_per_s"] = [r["output_tokens_per_s"] for r in repeats]
    return level


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def run_levels(url: str, model: GPT, tok, cfg: BenchServeConfig) -> list[dict]:
    """Every level, round-robin cfg.repeats times (engine alone beside each concurrency level); medians."""
    prompts = synthetic_prompts(tok, cfg, 1000)
    levels = [("concurrency", int(n)) for n in cfg.concurrency.split(",") if n]
    levels += [("request_rate", float(r)) for r in cfg.request_rates.split(",") if r]
    asyncio.run(concurrency_level(url, 1, prompts, BenchServeConfig(seconds=1.0)))  # warm-up
    decoder = BatchDecoder(model, cfg.max_batch)
    engine_tokens_per_s(decoder, tok, prompts, 1, BenchServeConfig(output_len=2, seconds=0.01))  # warm-up
    runs: list[list[dict]] = [[] for _ in levels]
    for _ in range(cfg.repeats):
        for i, (kind, value) in enumerate(levels):
            if kind == "concurrency":
                level = asyncio.run(concurrency_level(url, value, prompts, cfg))
                level["engine_output_tokens_per_s"] = engine_tokens_per_s(decoder, tok, prompts, value, cfg)
            else:
                level = asyncio.run(poisson_level(url, value, prompts, cfg))
            runs[i].append(level)
            print(f"  {kind} {value}: {level['output_tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    return [median_level(r) for r in runs]


def table(levels: list[dict]) -> str:
    lines = [
        "| level | out tok/s | vs 1 client | engine alone tok/s (vs 1) | req/s | TTFT p50 / p99 ms "
        "| TPOT p50 / p99 ms | ITL p50 / p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in levels:
        name = f"{r['concurrency']} clients" if "concurrency" in r else f"Poisson {r['request_rate']:g}/s"
        engine = r.get("engine_output_tokens_per_s")
        engine_cell = f"{engine:,.0f} ({r['engine_speedup']:.2f}x)" if engine else "-"
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        lines.append(
            f"| {name} | {r['output_tokens_per_s']:,.0f} | {speedup} | {engine_cell} | {r['requests_per_s']:.2f} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | "
            f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['errors']} |"
        )
    return "\n".join(lines)


def plot(levels: list[dict], path: Path, title: str) -> None:
    """Output tokens/s (server and engine alone) and p99 TTFT against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in levels if "concurrency" in r]
    if not sweep:
        return
    x = [r["concurrency"] for r in sweep]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(x, [r["output_tokens_per_s"] for r in sweep], "o-", label="server (HTTP, streamed)")
    left.plot(x, [r["engine_output_tokens_per_s"] for r in sweep], "s--", label="engine alone")
    left.set(xlabel="concurrent clients", ylabel="output tokens/s")
    left.legend()
    right.plot(x, [r["ttft_p99_ms"] for r in sweep], "o-", label="TTFT p99")
    right.plot(x, [r["itl_p99_ms"] for r in sweep], "s--", label="ITL p99")
    right.set(xlabel="concurrent clients", ylabel="ms")
    right.legend()
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(x, [str(n) for n in x])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    cfg = parse_options(BenchServeConfig, argv, __doc__)
    if cfg is None:
        return 0
    torch.set_num_threads(cfg.server_threads)  # the engine-alone runs, as the server runs
    with tempfile.TemporaryDirectory() as folder:
        model, tok = save_model(Path(folder), cfg.model)
        engine_model = quantized(load_model(folder)[0], cfg.quantize)
        proc, url = start_server(Path(folder), cfg)
        try:
            levels = run_levels(url, engine_model, tok, cfg)
            rss = peak_rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    sweep = [r for r in levels if "concurrency" in r]
    for r in sweep:
        r["speedup"] = r["output_tokens_per_s"] / sweep[0]["output_tokens_per_s"]
        r["engine_speedup"] = r["engine_output_tokens_per_s"] / sweep[0]["engine_output_tokens_per_s"]
    results = {
        "device": device_name("cpu"),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "model": {"name": cfg.model, "parameters": model.get_num_params(non_embedding=False)},
        "config": asdict(cfg),
        "server_peak_rss_mb": rss,
        "levels": levels,
        "note": "a shared machine: other jobs ran at the same time; compare ratios, not absolutes",
    }
    out = Path(cfg.out or f"benchmarks/results/bench_serve_{cfg.model}.json")
    write_text_atomic(out, json.dumps(results, indent=2) + "\n")
    title = (
        f"nanogpt serve, {cfg.model} ({cfg.quantize}), {results['device']}, {cfg.server_threads} thread(s)"
    )
    plot(levels, out.with_suffix(".png"), title)
    print(table(levels))
    print(f"server peak RSS {rss:.0f} MB; {results['device']}, {results['cpus']} CPUs; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
