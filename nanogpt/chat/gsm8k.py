"""GSM8K as a chat eval: each test question is a user message, the model's greedy reply is right when the
number after its "####" equals the reference's (commas dropped), as in GSM8K's paper and nanochat.

GSM8K's answers mark calculator steps as <<48/2=24>>; `to_conversation` drops them, so the train split
becomes SFT data whose replies end "#### N" as the ones scored here must.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from nanogpt.chat.template import Message
from nanogpt.errors import NanoGPTError

ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
CALCULATOR = re.compile(r"<<[^>]*>>")


def final_answer(text: str) -> str | None:
    """The number after the first "#### " of `text`, without commas (None: there is none)."""
    match = ANSWER.search(text)
    return None if match is None else match.group(1).replace(",", "").rstrip(".")


def read_gsm8k(path: str | Path) -> list[dict[str, str]]:
    """The {"question", "answer"} rows of a GSM8K .jsonl file."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise NanoGPTError(f"cannot read the GSM8K file {path}: {e}") from None
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            rows.append({"question": str(row["question"]), "answer": str(row["answer"])})
        except (ValueError, KeyError, TypeError):
            raise NanoGPTError(f'{path} line {number}: not a GSM8K row ({{"question", "answer"}})') from None
    return rows


def to_conversation(row: dict[str, str]) -> list[Message]:
    """A GSM8K row as a conversation to fine-tune on (calculator marks dropped)."""
    return [Message("user", row["question"]), Message("assistant", CALCULATOR.sub("", row["answer"]))]


def evaluate_gsm8k(session: Any, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Greedy replies (a fresh conversation each) scored by exact final answer."""
    session.sampling = replace(session.sampling, temperature=0.0)
    correct = 0
    for row in rows:
        session.clear()
        reply = "".join(session.reply(row["question"]))
        correct += final_answer(reply) == final_answer(row["answer"])
    return {"task": "gsm8k", "n": len(rows), "correct": correct, "accuracy": correct / max(1, len(rows))}


def print_gsm8k(session: Any, path: str, limit: int) -> None:
    rows = read_gsm8k(path)
    print(json.dumps(evaluate_gsm8k(session, rows[:limit] if limit else rows)))
