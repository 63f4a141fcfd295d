"""Score prompted items with a model, batched: all choices of several items in one padded forward pass,
logits computed only where a scored token is predicted (the head is most of a small model's compute).

Per choice: the mean per-token loss over CORE's span (lowest wins: CORE's `accuracy`), and, over
lm-eval's span, the summed log-probability (highest wins: `acc`; divided by the choice's length in
characters: `acc_norm`, as lm-eval's multiple-choice metrics compute them). A language-modeling item
is correct only if greedy decoding reproduces every token of its continuation.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm import tqdm

from nanogpt.device import autocast
from nanogpt.evals.prompts import Prompted, Sequence
from nanogpt.evals.tasks import LM, MC, Task
from nanogpt.model import GPT


@dataclass
class SequenceScore:
    core_loss: float  # mean next-token loss over CORE's span
    core_greedy: bool  # argmax reproduces every token of CORE's span
    logprob: float  # summed log-probability of lm-eval's span
    greedy: bool  # argmax reproduces every token of lm-eval's span


@dataclass
class ItemScore:
    index: int
    prediction: int  # CORE's choice (language modeling: 1 if reproduced, else 0)
    correct: bool  # CORE's rule
    acc: bool  # lm-eval's acc (language modeling: greedy over its span)
    acc_norm: bool | None  # lm-eval's acc_norm (multiple choice only)


def judge(task: Task, item: Prompted, scores: list[SequenceScore]) -> ItemScore:
    """An item's verdicts under CORE's rule and lm-eval's from the scores of its sequences."""
    if task.type == LM:
        (s,) = scores
        return ItemScore(item.index, int(s.core_greedy), s.core_greedy, s.greedy, None)
    losses = [s.core_loss for s in scores]
    prediction = losses.index(min(losses))  # the first of equals, as nanochat's list.index(min)
    logprobs = torch.tensor([s.logprob for s in scores], dtype=torch.float64)
    acc = int(torch.argmax(logprobs)) == item.gold
    acc_norm = None
    if task.type == MC:
        lengths = torch.tensor([float(len(seq.text)) for seq in item.sequences], dtype=torch.float64)
        acc_norm = int(torch.argmax(logprobs / lengths)) == item.gold
    return ItemScore(item.index, prediction, prediction == item.gold, acc, acc_norm)


@contextlib.contextmanager
def final_hidden_states(model: GPT) -> Iterator[list[torch.Tensor]]:
    """Inside, each forward of `model` appends its final (normed) hidden states (B, T, n_embd) to the
    list: the model's forward without targets computes the head on the last position only."""
    captured: list[torch.Tensor] = []
    handle = model.transformer.ln_f.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def score_sequences(model: GPT, seqs: list[Sequence], device: str, dtype: str) -> list[SequenceScore]:
    """One padded forward pass over `seqs`; the head and log-softmax only at the scored positions."""
    T = max(len(s.tokens) for s in seqs) - 1  # the last token is a target only
    idx = torch.zeros(len(seqs), T, dtype=torch.long)  # right padding: a causal model never sees it
    rows, positions, targets, counts = [], [], [], []
    for i, s in enumerate(seqs):
        idx[i, : len(s.tokens) - 1] = torch.tensor(s.tokens[:-1])
        first = min(s.core_start, s.lm_start)
        rows += [i] * (len(s.tokens) - first)
        positions += range(first - 1, len(s.tokens) - 1)  # position p predicts token p + 1
        targets += s.tokens[first:]
        counts.append(len(s.tokens) - first)
    with final_hidden_states(model) as hidden, autocast(device, dtype):
        model(idx.to(device))
        h = hidden[0][torch.tensor(rows, device=device), torch.tensor(positions, device=device)]  # (N, C)
        logits = model._head(h)  # (N, V)
    logp = F.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(targets, device=device)
    token_logp = logp.gather(1, target[:, None])[:, 0].double().cpu()  # (N,)
    hit = (logp.argmax(dim=-1) == target).cpu()
    scores = []
    for s, lp, ok in zip(seqs, token_logp.split(counts), hit.split(counts), strict=True):
        first = min(s.core_start, s.lm_start)
        core, lm = slice(s.core_start - first, None), slice(s.lm_start - first, None)
        scores.append(
            SequenceScore(
                -lp[core].mean().item(), bool(ok[core].all()), lp[lm].sum().item(), bool(ok[lm].all())
            )
        )
    return scores


def batches(items: list[Prompted], batch_size: int) -> Iterator[list[Prompted]]:
    """Items longest first, grouped so a batch holds at most `batch_size` sequences (an item with more
    choices than that is a batch of its own); similar lengths pad little."""
    items = sorted(items, key=lambda it: -max(len(s.tokens) for s in it.sequences))
    batch: list[Prompted] = []
    for item in items:
        if batch and sum(len(it.sequences) for it in batch) + len(item.sequences) > batch_size:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def score_items(
    model: GPT, task: Task, items: list[Prompted], device: str, dtype: str = "float32", batch_size: int = 32
) -> list[ItemScore]:
    """Every item's verdicts, in the order of `items`; a progress bar counts items/s on a terminal."""
    verdicts: dict[int, ItemScore] = {}
    with tqdm(total=len(items), desc=task.name, unit="item", disable=None, file=sys.stderr) as bar:
        for batch in batches(items, batch_size):
            scores = iter(score_sequences(model, [s for it in batch for s in it.sequences], device, dtype))
            for item in batch:
                verdicts[item.index] = judge(task, item, [next(scores) for _ in item.sequences])
            bar.update(len(batch))
    return [verdicts[item.index] for item in items]
