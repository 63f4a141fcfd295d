"""Preparation throughput (MB/s of raw text) for character-level and GPT-2 BPE tiny Shakespeare.

    OMP_NUM_THREADS=1 python benchmarks/bench_prepare.py [--repeats 5] [--json results.json]

"prepare" times the whole `prepare_dataset` (read, hash, tokenize, write the bins and meta.json) into a
fresh folder; "encode" times the tokenizer's `encode_array` over the corpus alone. Both are the median of
--repeats runs after one warm-up (which also loads GPT-2's BPE ranks, timed separately). The raw text comes
from NANOGPT_DATA_SOURCES (default ../shared/data) or --source.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanogpt.data import CharTokenizer, GPT2Tokenizer, prepare_dataset
from nanogpt.files import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}


def median_seconds(fn, *args, repeats: int) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prepare_into_temp(name: str, source: Path) -> None:
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        prepare_dataset(name, source=source, data_dir=out)


def run(source: Path, repeats: int) -> dict:
    text = source.read_text(encoding="utf-8")
    megabytes = source.stat().st_size / 1e6
    start = time.perf_counter()
    GPT2Tokenizer()  # the first one loads (and caches) the BPE ranks
    load_s = time.perf_counter() - start
    rows = []
    for name, tokenizer in DATASETS.items():
        tok = CharTokenizer.from_text(text) if tokenizer == "char" else GPT2Tokenizer()
        prepare_s = median_seconds(prepare_into_temp, name, source, repeats=repeats)
        encode_s = median_seconds(tok.encode_array, text, repeats=repeats)
        rows.append(
            {
                "dataset": name,
                "tokenizer": tokenizer,
                "prepare_s": round(prepare_s, 4),
                "prepare_MB_per_s": round(megabytes / prepare_s, 2),
                "encode_s": round(encode_s, 4),
                "encode_MB_per_s": round(megabytes / encode_s, 2),
            }
        )
    return {
        "benchmark": "prepare",
        "source": str(source),
        "source_MB": round(megabytes, 3),
        "repeats": repeats,
        "gpt2_tokenizer_load_s": round(load_s, 3),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
        },
        "results": rows,
    }


def table(report: dict) -> str:
    lines = [
        f"tiny Shakespeare ({report['source_MB']} MB), median of {report['repeats']}; "
        f"GPT-2 BPE ranks load once in {report['gpt2_tokenizer_load_s']} s",
        f"{'dataset':<18}{'tokenizer':<10}{'prepare s':>11}{'prepare MB/s':>14}{'encode s':>10}{'encode MB/s':>13}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['dataset']:<18}{r['tokenizer']:<10}{r['prepare_s']:>11.3f}{r['prepare_MB_per_s']:>14.1f}"
            f"{r['encode_s']:>10.3f}{r['encode_MB_per_s']:>13.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("NANOGPT_DATA_SOURCES", REPO.parent / "shared" / "data"))
    parser.add_argument("--source", type=Path, default=default / "tinyshakespeare" / "input.txt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--json", type=Path, help="write the results here (default: print them after the table)"
    )
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(
            f"tiny Shakespeare not found at {args.source}: set NANOGPT_DATA_SOURCES or --source",
            file=sys.stderr,
        )
        return 1
    report = run(args.source, args.repeats)
    print(table(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
