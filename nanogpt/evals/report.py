"""Run tasks on a model and aggregate: per task CORE's accuracy, lm-eval's acc / acc_norm and the centered
accuracy `(acc - 0.01 rb) / (1 - 0.01 rb)` (rb: the random baseline in percent); CORE is the mean
centered accuracy over the tasks run, which says how many of CORE's 22 it covers."""

from __future__ import annotations

from typing import Any

import torch

from nanogpt.evals.prompts import Prompted, Unencodable, prompt_item
from nanogpt.evals.scorer import ItemScore, score_items
from nanogpt.evals.tasks import CORE_SIZE, TASKS, Task, load_items, resolve_tasks
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
    """A task's figures; None where no item was scored (all skipped) or the metric does not apply."""
    n = len(verdicts)
    mean = lambda values: sum(values) / n if n and values else None
    accuracy = mean([v.correct for v in verdicts])
    return {
        "accuracy": accuracy,
        "acc": mean([v.acc for v in verdicts]),
        "acc_norm": mean([v.acc_norm for v in verdicts if v.acc_norm is not None]),
        "centered": None if accuracy is None else centered(accuracy, task.random_baseline),
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
        acc, centered_acc, lm_acc, norm = (
            "" if r[k] is None else f"{r[k]:.4f}" for k in ("accuracy", "centered", "acc", "acc_norm")
        )
        skipped = f" ({r['skipped']} skipped)" if r["skipped"] else ""
        lines.append(
            f"{name:<34} {r['shots']:>5} {r['type']:<17} {r['items']:>6} {acc:>8} {centered_acc:>8} {lm_acc:>7} {norm:>8}{skipped}"
        )
    if result["core"] is not None:
        lines.append(
            f"CORE {result['core']:.4f}: mean centered accuracy over {result['core_tasks']} of its {CORE_SIZE} tasks"
        )
    return "\n".join(lines)


class TaskEvaluator:
    """Tasks scored again and again (training's eval_tasks): items prompted once, those the tokenizer
    cannot encode skipped and counted; each call gives flat metrics for metrics.jsonl:
    `{name}_accuracy` (CORE's rule), `{name}_acc_norm` (multiple choice) and `core` over CORE's tasks."""

    def __init__(self, spec: str, tokenizer: Any, window: int, limit: int = 0, batch_size: int = 32):
        self.tasks = resolve_tasks(spec)
        self.prompted = {
            task.name: prompt_task(task, tokenizer, window, limit, skip_unencodable=True)
            for task in self.tasks
        }
        self.batch_size = batch_size

    def skipped(self) -> dict[str, int]:
        return {name: skipped for name, (_, skipped) in self.prompted.items() if skipped}

    @torch.no_grad()
    def __call__(self, model: GPT, device: str, dtype: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        metrics, centered_core = {}, []
        for task in self.tasks:
            prompted, skipped = self.prompted[task.name]
            if not prompted:
                continue
            r = task_result(task, score_items(model, task, prompted, device, dtype, self.batch_size), skipped)
            metrics[f"{task.name}_accuracy"] = r["accuracy"]
            if r["acc_norm"] is not None:
                metrics[f"{task.name}_acc_norm"] = r["acc_norm"]
            if TASKS.get(task.name) == task:
                centered_core.append(r["centered"])
        model.train(was_training)
        return metrics | ({"core": sum(centered_core) / len(centered_core)} if centered_core else {})
