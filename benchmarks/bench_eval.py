"""Benchmark-task throughput: our evaluator (nanogpt eval --tasks) vs lm-evaluation-harness's `hf` backend on
the same weights (exported with nanogpt.hf.export) and the same items, in items per second, float32.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py                       # 40 items of 4 tasks, 2 rounds
    python benchmarks/bench_eval.py --items=100 --rounds=3 --out=benchmarks/results/bench_eval.json

Tasks: the 0-shot ones whose lm-eval YAML (nanogpt/evals/lm_eval_plugin.py) gives the very prompts ours do:
hellaswag_zeroshot, copa, winograd, lambada_openai (the equality is tests/test_evals_lm_eval.py). The
model has random weights (speed does not depend on them), GPT-2's vocabulary and tokenizer, --n_layer /
--n_embd (default 4 x 256: GPT-2-124M's 12 x 768 is ~30x the compute and too slow to time here).
Each round times, one after the other, ours (prompting + scoring, items already read) and lm-eval's
`evaluate` at batch size 1 (its default) and --lm_eval_batch (requests built + scored, task data already
loaded); medians over rounds. Target: >= 3x lm-eval's items/s on the CPU.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanogpt.data.tokenizers import GPT2Tokenizer
from nanogpt.device import device_name
from nanogpt.evals.prompts import prompt_item
from nanogpt.evals.scorer import score_items
from nanogpt.evals.tasks import TASKS, load_items
from nanogpt.files import write_text_atomic
from nanogpt.hf import export
from nanogpt.model import GPT, GPTConfig
from nanogpt.options import parse_options

TASK_NAMES = ["hellaswag_zeroshot", "copa", "winograd", "lambada_openai"]


@dataclass
class BenchEvalConfig:
    items: int = 40  # per task
    rounds: int = 2
    n_layer: int = 4
    n_embd: int = 256
    block_size: int = 512
    batch_size: int = 32  # our sequences per forward pass
    lm_eval_batch: int = 32  # lm-eval's hf batch size, beside its default 1
    out: str = ""  # also write the JSON here


def ours(model: GPT, tok: GPT2Tokenizer, items: dict[str, list[dict]], cfg: BenchEvalConfig) -> float:
    """Seconds to prompt and score every task's first cfg.items items."""
    t0 = time.perf_counter()
    for name, task_items in items.items():
        task = TASKS[name]
        prompted = [prompt_item(task, task_items, i, tok, cfg.block_size) for i in range(cfg.items)]
        score_items(model, task, prompted, "cpu", "float32", cfg.batch_size)
    return time.perf_counter() - t0


def lm_eval_seconds(hf_dir: Path, yaml_dir: Path, cfg: BenchEvalConfig, batch_size: int) -> float:
    """Seconds of lm-eval's evaluate (requests built and scored) with its hf backend; task data loaded first."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    lm = HFLM(
        pretrained=str(hf_dir), add_bos_token=True, dtype="float32", device="cpu", batch_size=batch_size
    )
    tasks = get_task_dict([f"nanogpt_{n}" for n in TASK_NAMES], TaskManager(include_path=str(yaml_dir)))
    t0 = time.perf_counter()
    evaluate(lm=lm, task_dict=tasks, limit=cfg.items, verbosity="ERROR")
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    cfg = parse_options(BenchEvalConfig, argv, "usage: python benchmarks/bench_eval.py [--key=value ...]")
    if cfg is None:
        return 0
    from nanogpt.evals.lm_eval_plugin import write_task_yamls

    torch.manual_seed(0)
    shape = dict(n_layer=cfg.n_layer, n_head=max(1, cfg.n_embd // 64), n_embd=cfg.n_embd)
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=50257, **shape)).eval()
    tok = GPT2Tokenizer()
    items = {name: load_items(TASKS[name]) for name in TASK_NAMES}
    n_items = sum(min(cfg.items, len(v)) for v in items.values())
    times: dict[str, list[float]] = {"ours": [], "lm_eval_bs1": [], f"lm_eval_bs{cfg.lm_eval_batch}": []}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export(model, Path(tmp) / "hf", tok)
        write_task_yamls(Path(tmp) / "yaml", TASK_NAMES)
        for _ in range(cfg.rounds):  # alternated, so drift on a shared machine hits all alike
            times["ours"].append(ours(model, tok, items, cfg))
            times["lm_eval_bs1"].append(lm_eval_seconds(hf_dir, Path(tmp) / "yaml", cfg, 1))
            times[f"lm_eval_bs{cfg.lm_eval_batch}"].append(
                lm_eval_seconds(hf_dir, Path(tmp) / "yaml", cfg, cfg.lm_eval_batch)
            )
    rates = {k: n_items / statistics.median(v) for k, v in times.items()}
    result = {
        "cpu": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "model": shape | {"block_size": cfg.block_size, "vocab_size": 50257},
        "tasks": TASK_NAMES,
        "items": n_items,
        "seconds": times,
        "items_per_s": rates,
        "ours_vs_lm_eval_bs1": rates["ours"] / rates["lm_eval_bs1"],
        f"ours_vs_lm_eval_bs{cfg.lm_eval_batch}": rates["ours"] / rates[f"lm_eval_bs{cfg.lm_eval_batch}"],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if cfg.out:
        write_text_atomic(cfg.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
