"""Benchmark evaluation: in-context-learning tasks (CORE's, HellaSwag, a user's JSONL) scored by CORE's
rules and lm-eval's, batched on any device.

    tasks.py    the task table (data), fetching task files, the three layouts
    prompts.py  few-shot prompts as token sequences and the spans to score
    scorer.py   batched forward passes -> per-item verdicts
    report.py   per-task accuracy, centered accuracy, CORE; the table
    lm_eval_plugin.py  a `nanogpt` model for EleutherAI's lm-evaluation-harness (extra [eval])
"""

from nanogpt.evals.report import evaluate_tasks, format_results
from nanogpt.evals.tasks import CORE_TASKS, TASKS, Task, resolve_tasks

__all__ = ["CORE_TASKS", "TASKS", "Task", "evaluate_tasks", "format_results", "resolve_tasks"]
