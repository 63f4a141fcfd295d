"""Conversation files: JSONL with one conversation per line, in OpenAI's shape or ShareGPT's (FastChat's):

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}, ...]}

A .json file holding a list of such objects (FastChat's dummy_conversation.json) reads the same way.
Anything else is an error naming the file and the line (or list item) and what is wrong there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanogpt.chat.template import ROLES, Message
from nanogpt.errors import NanoGPTError

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def read_conversations(path: str | Path) -> list[tuple[str, list[Message]]]:
    """Every conversation of the file with where it is ("line 7" / "item 7"), checked."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NanoGPTError(f"cannot read the conversation file {path}: {e}") from None
    return [(where, parse_conversation(record, f"{path} {where}")) for where, record in _records(path, text)]


def _records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(where, JSON value) of each conversation: a JSON list's items, else each non-blank line's."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise NanoGPTError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
        yield from ((f"item {i}", item) for i, item in enumerate(items, 1))
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoGPTError(
                f"{path} line {number}: not valid JSON ({e.msg}); each line must be one conversation object"
            ) from None


def parse_conversation(record: Any, where: str) -> list[Message]:
    """One conversation object (OpenAI's "messages" or ShareGPT's "conversations") -> its messages."""
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        turns, role_key, text_key, roles = record["messages"], "role", "content", {r: r for r in ROLES}
    elif isinstance(record, dict) and isinstance(record.get("conversations"), list):
        turns, role_key, text_key, roles = record["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise NanoGPTError(
            f'{where}: expected an object with a list of "messages" (role, content) or of '
            f'"conversations" (from, value), got {_short(record)}'
        )
    messages = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise NanoGPTError(f"{where}: message {i} is not an object: {_short(turn)}")
        role, content = turn.get(role_key), turn.get(text_key)
        if role not in roles:
            raise NanoGPTError(
                f"{where}: message {i} has unknown {role_key} {role!r} (known: {', '.join(roles)})"
            )
        if not isinstance(content, str):
            raise NanoGPTError(f"{where}: message {i}'s {text_key!r} must be a string, got {_short(content)}")
        messages.append(Message(roles[role], content))
    return messages


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
