"""Preparation throughput (MB/s of raw text) and peak memory, small and large.

    OMP_NUM_THREADS=1 python benchmarks/bench_prepare.py [--repeats 5] [--json results.json]
    OMP_NUM_THREADS=1 python benchmarks/bench_prepare.py --large --sizes_mb 50,200 --num_procs 1,2

Default: tiny Shakespeare (from NANOGPT_DATA_SOURCES, default ../shared/data, or --source) as characters
and GPT-2 BPE, the median of --repeats whole `prepare_dataset` runs after one warm-up.

--large: a generated multi-language corpus (nanogpt.data.synthetic, seeded; written to a temporary folder,
never kept) of each --sizes_mb, prepared with each tokenizer (GPT-2 BPE; a BPE of 4096 trained on it) by
each number of --num_procs. Every run is a fresh child process, which reports its seconds and its peak RSS
and that of its worker processes (the largest one): memory must not grow with the corpus. It also
reports the CPU seconds of all its processes (after the imports), which a busy machine
inflates far less than the wall-clock time: equal CPU seconds at 1 and N processes mean the work splits
without overhead, and on N idle cores the wall-clock time would fall by about N.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanogpt.data import prepare_dataset
from nanogpt.data.synthetic import write_corpus
from nanogpt.device import device_name
from nanogpt.files import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}
CHILD = """
import json, resource, sys, time
from nanogpt.data.prepare import prepare_dataset
source, out, tokenizer, num_proc = sys.argv[1:5]
options = {"vocab_size": 4096} if tokenizer == "bpe" else {}
cpu = lambda u: u.ru_utime + u.ru_stime
imported = cpu(resource.getrusage(resource.RUSAGE_SELF))
start = time.perf_counter()
prepare_dataset("bench", source, out, tokenizer, num_proc=int(num_proc), **options)
seconds = time.perf_counter() - start
me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu(me) - imported + cpu(workers),
                  "rss_MiB": me.ru_maxrss / 1024, "worker_rss_MiB": workers.ru_maxrss / 1024}))
"""


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


def machine() -> dict:
    return {
        "cpu": device_name("cpu"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_small(source: Path, repeats: int) -> dict:
    megabytes = source.stat().st_size / 1e6
    rows = []
    for name, tokenizer in DATASETS.items():
        seconds = median_seconds(prepare_into_temp, name, source, repeats=repeats)
        rows.append(
            {
                "dataset": name,
                "tokenizer": tokenizer,
                "seconds": round(seconds, 4),
                "MB_per_s": round(megabytes / seconds, 2),
            }
        )
    return {
        "benchmark": "prepare",
        "source": str(source),
        "source_MB": round(megabytes, 3),
        "repeats": repeats,
        "machine": machine(),
        "results": rows,
    }


def prepare_in_child(source: Path, tokenizer: str, num_proc: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(source), out, tokenizer, str(num_proc)],
            capture_output=True,
            text=True,
            env=env,
        )
    if done.returncode:
        raise SystemExit(f"prepare failed ({tokenizer}, {num_proc} proc):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_large(sizes_mb: list[int], tokenizers: list[str], num_procs: list[int]) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for size in sizes_mb:
            folder = Path(root) / f"corpus_{size}"
            files = write_corpus(folder, size * 1_000_000, seed=0, docs_per_file=200)
            megabytes = sum(p.stat().st_size for p in files) / 1e6
            for tokenizer in tokenizers:
                for num_proc in num_procs:
                    result = prepare_in_child(folder, tokenizer, num_proc)
                    rows.append(
                        {
                            "corpus_MB": round(megabytes, 1),
                            "files": len(files),
                            "tokenizer": "bpe 4096" if tokenizer == "bpe" else tokenizer,
                            "num_proc": num_proc,
                            "seconds": round(result["seconds"], 2),
                            "MB_per_s": round(megabytes / result["seconds"], 2),
                            "cpu_seconds": round(result["cpu_seconds"], 2),
                            "peak_rss_MiB": round(result["rss_MiB"], 1),
                            "worker_peak_rss_MiB": round(result["worker_rss_MiB"], 1),
                        }
                    )
                    print(json.dumps(rows[-1]), file=sys.stderr)
    return {
        "benchmark": "prepare_large",
        "corpus": "nanogpt.data.synthetic.write_corpus(seed=0)",
        "machine": machine(),
        "results": rows,
    }


def table(report: dict) -> str:
    if report["benchmark"] == "prepare":
        lines = [f"tiny Shakespeare ({report['source_MB']} MB), median of {report['repeats']} whole prepares"]
        lines += [
            f"{r['dataset']:<18}{r['tokenizer']:<10}{r['seconds']:>9.3f} s{r['MB_per_s']:>9.1f} MB/s"
            for r in report["results"]
        ]
        return "\n".join(lines)
    lines = [
        f"generated multi-language corpus on {report['machine']['cpu']} ({report['machine']['cpu_count']} cores)",
        f"{'MB':>7}{'tokenizer':>11}{'proc':>6}{'seconds':>9}{'MB/s':>8}{'CPU s':>8}{'peak RSS MiB':>14}{'worker RSS':>12}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['corpus_MB']:>7.1f}{r['tokenizer']:>11}{r['num_proc']:>6}{r['seconds']:>9.1f}{r['MB_per_s']:>8.1f}"
            f"{r.get('cpu_seconds', float('nan')):>8.1f}"
            f"{r['peak_rss_MiB']:>14.0f}{r['worker_peak_rss_MiB']:>12.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("NANOGPT_DATA_SOURCES", REPO.parent / "shared" / "data"))
    parser.add_argument("--source", type=Path, default=default / "tinyshakespeare" / "input.txt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--large", action="store_true", help="the generated corpus instead of tiny Shakespeare"
    )
    parser.add_argument("--sizes_mb", default="50,200", help="--large: corpus sizes in MB")
    parser.add_argument("--tokenizers", default="gpt2,bpe", help="--large: gpt2 and/or bpe (4096, trained)")
    parser.add_argument("--num_procs", default="1,2", help="--large: numbers of encoding processes")
    parser.add_argument(
        "--json", type=Path, help="write the results here (default: print them after the table)"
    )
    args = parser.parse_args(argv)
    if args.large:
        ints = lambda text: [int(x) for x in text.split(",")]
        report = run_large(ints(args.sizes_mb), args.tokenizers.split(","), ints(args.num_procs))
    elif not args.source.is_file():
        print(
            f"tiny Shakespeare not found at {args.source}: set NANOGPT_DATA_SOURCES or --source",
            file=sys.stderr,
        )
        return 1
    else:
        report = run_small(args.source, args.repeats)
    print(table(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
