"""Prompts of a task's items, as token sequences with the span to score (CORE's rules: nanochat's
core_eval.py, the DCLM paper's).

Each prompt is few-shot examples + the item, rendered as the gauntlet's templates render them
("query + delimiter + choice", examples separated by a blank line) and tokenised whole, after a BOS token.
The scored span of a choice ("core span") is:
- multiple choice: the tokens after the choices' longest common token prefix;
- schema (the contexts differ, the continuation is shared): the choices' longest common token suffix;
- language modeling: the tokens after those of the prompt without the continuation (stripped), which must
  be a token prefix of the prompt with it.
Each sequence also carries lm-eval's span (what follows the tokens of the context text, trailing
whitespace moved to the continuation), so `acc` and `acc_norm` are the numbers lm-eval computes.
A prompt longer than the model's window is cut from the left, keeping the scored tokens whole.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from nanogpt.data.tokenizers import UnknownCharacterError
from nanogpt.errors import NanoGPTError
from nanogpt.evals.tasks import MC, SCHEMA, Task

FEWSHOT_SEED = 1234  # nanochat: random.Random(1234 + index) picks an item's examples
SHUFFLE_SEED = 1337  # nanochat shuffles a task's items with random.Random(1337) before indexing them


@dataclass
class Sequence:
    """One choice of an item: its tokens and the spans [start, len(tokens)) scored."""

    tokens: list[int]
    core_start: int  # CORE's span
    lm_start: int  # lm-eval's span
    text: str  # the choice (or continuation) text, whose length normalises acc_norm


@dataclass
class Prompted:
    """An item ready to score: one sequence per choice (a language-modeling item: one)."""

    index: int  # the item's place in its file
    sequences: list[Sequence]
    gold: int


class Unencodable(NanoGPTError):
    """An item this tokenizer and window cannot score (--skip_unencodable skips and counts it)."""


def fewshot_indices(index: int, n_items: int, shots: int) -> list[int]:
    """File indices of the few-shot examples of item `index`: nanochat's choice for that item when it
    evaluates the whole file (items shuffled with SHUFFLE_SEED; Random(FEWSHOT_SEED + its position)
    samples `shots` other positions), so the prompts are nanochat's whatever --limit is."""
    if shots == 0:
        return []
    if shots >= n_items:
        raise NanoGPTError(f"{shots} few-shot examples need more than {n_items} items in the task")
    order = _shuffled(n_items)
    position = order.index(index)
    picks = random.Random(FEWSHOT_SEED + position).sample(range(n_items - 1), shots)
    return [order[p + (p >= position)] for p in picks]  # the positions without the item's own


_ORDERS: dict[int, list[int]] = {}


def _shuffled(n_items: int) -> list[int]:
    if n_items not in _ORDERS:
        order = list(range(n_items))
        random.Random(SHUFFLE_SEED).shuffle(order)
        _ORDERS[n_items] = order
    return _ORDERS[n_items]


def render(item: dict, task: Task, examples: list[dict]) -> list[tuple[str, str]]:
    """(context text, continuation text) per choice; their concatenation is the whole prompt."""
    d = task.delimiter
    if task.type == MC:
        shots = "".join(f"{e['query']}{d}{e['choices'][e['gold']]}\n\n" for e in examples)
        return [(shots + item["query"], d + choice) for choice in item["choices"]]
    if task.type == SCHEMA:
        shots = "".join(f"{e['context_options'][e['gold']]}{d}{e['continuation']}\n\n" for e in examples)
        return [(shots + context, d + item["continuation"]) for context in item["context_options"]]
    shots = "".join(f"{e['context'].strip()}{d}{e['continuation']}\n\n" for e in examples)
    return [(shots + item["context"].strip(), d + item["continuation"])]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    return next((i for i in range(n) if any(s[i] != seqs[0][i] for s in seqs)), n)


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def _encode(tokenizer: Any, text: str, where: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except UnknownCharacterError as e:
        raise Unencodable(
            f"{where}: character {e.char!r} is not in the model's vocabulary of {e.vocab_size} characters"
        ) from None


def _core_starts(task: Task, full: list[list[int]], context_tokens: list[int], where: str) -> list[int]:
    """Where CORE's scored span of each full token sequence starts (context_tokens: BOS + the tokens of
    the prompt without its choice, stripped)."""
    if task.type == MC:
        return [_common_prefix(full)] * len(full)
    if task.type == SCHEMA:
        suffix = _common_suffix(full)
        return [len(s) - suffix for s in full]
    n = len(context_tokens)
    if n >= len(full[0]) or full[0][:n] != context_tokens:
        raise Unencodable(
            f"{where}: the prompt without its continuation does not tokenise to a prefix of the prompt with it"
        )
    return [n]


def prompt_item(task: Task, items: list[dict], index: int, tokenizer: Any, window: int) -> Prompted:
    """Item `index` of `items` (all of the task's file) as token sequences of at most `window` tokens."""
    item = items[index]
    where = f"task {task.name} item {index + 1}"
    examples = [items[i] for i in fewshot_indices(index, len(items), task.shots)]
    prompts = render(item, task, examples)
    bos = [] if tokenizer.eot is None else [tokenizer.eot]
    full = [bos + _encode(tokenizer, context + continuation, where) for context, continuation in prompts]
    # lm-eval's context: the prompt without the choice, its trailing whitespace moved to the continuation
    contexts = [
        bos + _encode(tokenizer, (context + task.delimiter).rstrip(), where) for context, _ in prompts
    ]
    starts = _core_starts(task, full, contexts[0], where)
    sequences = [
        _cut(tokens, start, len(context), continuation[len(task.delimiter) :], window, where)
        for tokens, start, context, (_, continuation) in zip(full, starts, contexts, prompts, strict=True)
    ]
    return Prompted(index, sequences, item.get("gold", 0))


def _cut(tokens: list[int], start: int, lm_start: int, text: str, window: int, where: str) -> Sequence:
    """Drop tokens from the left so the sequence fits `window`, keeping every scored token."""
    first = min(start, lm_start)
    if first < 1:
        raise Unencodable(
            f"{where}: nothing precedes the scored tokens (a tokenizer without BOS and an empty context)"
        )
    cut = max(0, len(tokens) - window)
    if first - cut < 1:
        raise Unencodable(
            f"{where}: its scored tokens alone ({len(tokens) - first}) do not fit the model's {window}-token window"
        )
    return Sequence(tokens[cut:], start - cut, lm_start - cut, text)
