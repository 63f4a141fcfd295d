"""Run tasks on a model and aggregate: per task CORE's accuracy, lm-eval's acc / acc_norm and the centered
accuracy `(acc - 0.01 rb) / (1 - 0.01 rb)` (rb: the random baseline in percent); CORE is the mean
centered accuracy over the tasks run, which says how many of CORE's 22 it covers."""

from __future__ import annotations

from typing import Any

from nanogpt.evals.prompts import Prompted, Unencodable, prompt_item
from nanogpt.evals.scorer import ItemScore, score_items
from nanogpt.evals.tasks import CORE_SIZE, TASKS, Task, load_items
from nanogpt.model import GPT


def centered(accuracy: float, random_baseline: float) -> float:
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def prompt_task(
    task: Task, tokenizer: Any, window: int, limit: int = 0, skip_unencodable: bool = False
) -> tuple[list[Prompted], int]:
    """(the first `limit` items of a task (0: all) as token sequences, how many were skipped)."""
    items = load_items(task)
    prompted, skipped = [], 0
    for index in range(min(limit, len(items)) if limit else len(items)):
        try:
            prompted.append(prompt_item(task, items, index, tokenizer, window))
        except Unencodable as e:
            if not skip_unencodable:
                raise Unencodable(f"{e} (--skip_unencodable skips such items and counts them)") from None
            skipped += 1
    return prompted, skipped


def task_result(task: Task, verdicts: list[ItemScore], skipped: int) -> dict[str, Any]:
    n = len(verdicts)
    mean = lambda values: sum(values) / n if n else float("nan")
    accuracy = mean([v.correct for v in verdicts])
    norms = [v.acc_norm for v in verdicts if v.acc_norm is not None]
    return {
        "accuracy": accuracy,
        "acc": mean([v.acc for v in verdicts]),
        "acc_norm": mean(norms) if norms else None,
        "centered": centered(accuracy, task.random_baseline),
        "items": n,
        "skipped": skipped,
        "shots": task.shots,
        "type": task.type,
    }


def evaluate_tasks(
    model: GPT,
    tokenizer: Any,
    tasks: list[Task],
    device: str,
    dtype: str = "float32",
    limit: int = 0,
    batch_size: int = 32,
    skip_unencodable: bool = False,
) -> dict[str, Any]:
    """{"tasks": {name: result}, "core": mean centered accuracy over the CORE tasks run, "core_tasks": n}."""
    results = {}
    for task in tasks:
        prompted, skipped = prompt_task(task, tokenizer, model.config.block_size, limit, skip_unencodable)
        verdicts = score_items(model, task, prompted, device, dtype, batch_size)
        results[task.name] = task_result(task, verdicts, skipped)
    core = [r["centered"] for name, r in results.items() if TASKS.get(name) in tasks and r["items"]]
    return {"tasks": results, "core": sum(core) / len(core) if core else None, "core_tasks": len(core)}


def format_results(result: dict[str, Any]) -> str:
    """A table (task, shots, type, items, accuracy, centered, acc, acc_norm) and the CORE line."""
    lines = [
        f"{'task':<34} {'shots':>5} {'type':<17} {'items':>6} {'accuracy':>8} {'centered':>8} {'acc':>7} {'acc_norm':>8}"
    ]
    for name, r in result["tasks"].items():
        norm = "" if r["acc_norm"] is None else f"{r['acc_norm']:.4f}"
        skipped = f" ({r['skipped']} skipped)" if r["skipped"] else ""
        lines.append(
            f"{name:<34} {r['shots']:>5} {r['type']:<17} {r['items']:>6} {r['accuracy']:>8.4f} "
            f"{r['centered']:>8.4f} {r['acc']:>7.4f} {norm:>8}{skipped}"
        )
    if result["core"] is not None:
        lines.append(
            f"CORE {result['core']:.4f}: mean centered accuracy over {result['core_tasks']} of its {CORE_SIZE} tasks"
        )
    return "\n".join(lines)
