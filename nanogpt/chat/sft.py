"""Supervised fine-tuning data: conversations -> packed rows of block_size + 1 tokens -> (x, y) batches
whose y is -1 wherever the loss must not train (the model's cross-entropy ignores -1).

Packed, not padded: each conversation (cut to block_size + 1 tokens if longer, and counted) is placed
whole, longest first, into the fullest row it still fits (best fit decreasing), and a batch is (B, T)
like a pretraining batch: the same step, the same tokens/s (benchmarks/bench_sft.py: 0.98-1.02x). The rest
of a row is <|endoftext|> with y = -1 (FastChat's identity chats fill rows of 257 to 86%); padding
each batch to its longest conversation would waste more, and vary the step's shape. Conversations in one row see the ones before them, as pretraining's packed documents do; each starts
with <|endoftext|>, after which the base model learnt to ignore what came before.

Val holds whole conversations (sft_val_fraction of them, at least one), never a part of a training one.
Batches are reproducible and resumable like nanogpt.data.loader.BatchLoader's: the rows are packed once
(seeded), each epoch visits them in its own seeded order, and batch n of a rank is fixed by (seed,
split, n): the state is the batch count per split.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nanogpt.chat.conversations import read_conversations
from nanogpt.chat.template import ChatTemplate, encode_conversation, template_for, with_template
from nanogpt.data.tokenizers import tokenizer_from_meta
from nanogpt.errors import NanoGPTError
from nanogpt.model import padded_vocab_size


def encode_all(tokenizer: Any, template: ChatTemplate, conversations: list) -> tuple[list, list, int]:
    """(ids, trained, skipped): each conversation with an assistant turn encoded; skipped: those without."""
    ids, trained, skipped = [], [], 0
    for _, messages in conversations:
        if not any(m.role == "assistant" for m in messages):
            skipped += 1
            continue
        conv_ids, conv_trained = encode_conversation(tokenizer, template, messages)
        ids.append(np.asarray(conv_ids, dtype=np.int64))
        trained.append(np.asarray(conv_trained, dtype=bool))
    return ids, trained, skipped


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of item indices, each row's lengths summing to at most capacity: every item (in the given
    order) goes into the row with the least room that still holds it, else into a new row."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, row index), sorted
    for item, length in enumerate(lengths):
        at = bisect.bisect_left(room, (length, -1))
        if at == len(room):
            rows.append([item])
            left, row = capacity - length, len(rows) - 1
        else:
            left, row = room.pop(at)
            rows[row].append(item)
            left -= length
        bisect.insort(room, (left, row))
    return rows


@dataclass
class Packed:
    tokens: np.ndarray  # (R, T+1) int64
    targets: np.ndarray  # (R, T+1) bool: the token is a label the loss trains on
    used: int  # positions holding a conversation's token (the rest is padding)
    truncated: int  # conversations cut to T+1 tokens
    dropped: int  # of those, the ones left without a trained label


def pack(ids: list[np.ndarray], trained: list[np.ndarray], block_size: int, pad: int, seed: int) -> Packed:
    """Conversations cut to block_size + 1 tokens, best-fit packed longest first, padded with `pad`."""
    width = block_size + 1
    order = np.random.default_rng(seed).permutation(len(ids))
    truncated = [i for i in order if len(ids[i]) > width]
    kept = [i for i in order if trained[i][1:width].any()]  # position 0 is never a label
    # longest first (best fit decreasing: fuller rows than in random order), ties in the seeded order;
    # the loader shuffles the rows themselves
    kept.sort(key=lambda i: -min(len(ids[i]), width))
    rows = best_fit([min(len(ids[i]), width) for i in kept], width)
    tokens = np.full((len(rows), width), pad, dtype=np.int64)
    targets = np.zeros((len(rows), width), dtype=bool)
    for r, row in enumerate(rows):
        at = 0
        for k in row:
            n = min(len(ids[kept[k]]), width)
            tokens[r, at : at + n] = ids[kept[k]][:n]
            targets[r, at : at + n] = trained[kept[k]][:n]
            targets[r, at] = False  # a conversation's first token is never its predecessor's label
            at += n
    used = sum(min(len(ids[i]), width) for i in kept)
    return Packed(tokens, targets, used, len(truncated), len(ids) - len(kept))


class SFTLoader:
    """(x, y) batches of packed rows: y = the next token where it is trained, else -1. The same interface
    as BatchLoader (get_batch, state_dict, load_state_dict)."""

    def __init__(
        self,
        rows: dict[str, tuple[np.ndarray, np.ndarray]],
        batch_size: int,
        device: str | torch.device = "cpu",
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.rows, self.batch_size, self.device = rows, batch_size, torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._batches: dict[str, int] = {}
        self._orders: dict[str, tuple[int, np.ndarray]] = {}  # split -> (epoch, its order of rows)

    def _order(self, split: str, epoch: int) -> np.ndarray:
        """The rows' order in `epoch` of `split`: a permutation seeded by (seed, split, epoch)."""
        if self._orders.get(split, (-1,))[0] != epoch:
            key = hashlib.blake2b(f"{self.seed}/{split}/{epoch}".encode(), digest_size=8).digest()
            rng = np.random.default_rng(int.from_bytes(key, "little"))
            self._orders[split] = (epoch, rng.permutation(len(self.rows[split][0])))
        return self._orders[split][1]

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (B, T) on the device."""
        tokens, targets = self.rows[split]
        n = self._batches.get(split, 0)
        self._batches[split] = n + 1
        first = (n * self.world_size + self.rank) * self.batch_size  # this rank's rows of the global stream
        index = [
            self._order(split, g // len(tokens))[g % len(tokens)]
            for g in range(first, first + self.batch_size)
        ]
        x = torch.from_numpy(tokens[index, :-1])
        y = torch.from_numpy(np.where(targets[index, 1:], tokens[index, 1:], -1))
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batches": dict(self._batches)}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._batches = {str(split): int(n) for split, n in state["batches"].items()}


class SFTData:
    """A conversation file read, checked and encoded for a model with tokenizer `tokenizer_meta` (its
    checkpoint's): everything that can be wrong with the data is found here, before a run writes
    anything. `meta` stands in for a prepared dataset's meta.json in the trainer's checks;
    `tokenizer_meta` is what the fine-tuned checkpoints store (the template included)."""

    def __init__(self, path: str, tokenizer_meta: dict, val_fraction: float, seed: int):
        tokenizer = tokenizer_from_meta(tokenizer_meta)
        self.template = template_for(tokenizer)
        self.path = path
        self.meta = {"vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer_meta}
        self.tokenizer_meta = with_template(tokenizer_meta, self.template)
        conversations = read_conversations(path)
        ids, trained, self.skipped = encode_all(tokenizer, self.template, conversations)
        if len(ids) < 2:
            raise NanoGPTError(
                f"{path}: {len(ids)} conversation(s) with an assistant turn ({self.skipped} without one): "
                "fine-tuning needs at least 2 (one for val)"
            )
        n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))  # both splits hold one or more
        order = np.random.default_rng(seed).permutation(len(ids))
        self.splits = {
            "train": ([ids[i] for i in order[n_val:]], [trained[i] for i in order[n_val:]]),
            "val": ([ids[i] for i in order[:n_val]], [trained[i] for i in order[:n_val]]),
        }
        self.max_id = max(int(a.max()) for a in ids)
        self.rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def pack(self, model: Any, seed: int) -> None:
        """Pack both splits into rows of the model's block_size + 1 and say what was done. GPT-2's own
        weights (50257 token rows) get the padded vocabulary first, which holds the chat tokens."""
        block_size = model.config.block_size
        if self.max_id >= model.config.vocab_size:
            fit_vocabulary(model, self.max_id)
        pad = self.template.bos if self.template.bos is not None else 0
        report = []
        for split, (ids, trained) in self.splits.items():
            packed = pack(ids, trained, block_size, pad, seed)
            if not len(packed.tokens):
                raise NanoGPTError(
                    f"{self.path}: no {split} conversation has an assistant token within block_size={block_size}"
                )
            self.rows[split] = (packed.tokens, packed.targets)
            report.append(
                f"{split} {len(ids)} conversations -> {len(packed.tokens)} rows of {block_size + 1} tokens "
                f"({packed.used / packed.tokens.size:.0%} filled, {int(packed.targets.sum()):,} trained tokens), "
                f"{packed.truncated} cut to block_size ({packed.dropped} of them left with no assistant token: dropped)"
            )
        print(f"sft data {self.path}: " + "; ".join(report) + f"; {self.skipped} skipped (no assistant turn)")

    def loader(
        self, batch_size: int, device: str, seed: int, rank: int = 0, world_size: int = 1
    ) -> SFTLoader:
        return SFTLoader(self.rows, batch_size, device, seed, rank, world_size)


def fit_vocabulary(model: Any, max_id: int) -> None:
    """Pad the model's token rows to the padded vocabulary nanoGPT trains GPT-2 with (50257 -> 50304), so
    that id max_id exists. The new rows start at the mean of the others (an average token, as HF's
    `resize_token_embeddings` starts them); a tied head follows, an untied one is padded the same way."""
    from nanogpt.lora import has_lora

    size = padded_vocab_size(model.config.vocab_size)
    if max_id >= size or has_lora(model):
        raise NanoGPTError(
            f"the chat tokens (up to id {max_id}) do not fit the model's vocabulary of {model.config.vocab_size}"
            + (": LoRA cannot add token rows to a frozen base; fine-tune it fully" if max_id < size else "")
        )
    print(f"vocabulary padded from {model.config.vocab_size} to {size} token rows for the chat tokens")
    with torch.no_grad():
        wte = model.transformer.wte.weight
        model.transformer.wte = nn.Embedding.from_pretrained(_padded(wte, size), freeze=False)
        head = model.lm_head.weight
        model.lm_head = nn.Linear(head.size(1), size, bias=False).to(head.device, head.dtype)
        if model.config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        else:
            model.lm_head.weight.copy_(_padded(head, size))
    model.config.vocab_size = size


def _padded(rows: torch.Tensor, size: int) -> torch.Tensor:
    """(V, C) -> (size, C): the rows, then copies of their mean."""
    return torch.cat([rows, rows.mean(0, keepdim=True).expand(size - rows.size(0), -1)])


def base_tokenizer_meta(init_from: str, ckpt: dict[str, Any] | None) -> dict:
    """The tokenizer meta of the model a fine-tuning run starts from: the resumed checkpoint's, GPT-2's
    for GPT-2 weights, else the base checkpoint's (read without loading its weights)."""
    from nanogpt.checkpoint import is_hf_source, peek_checkpoint

    if ckpt is not None:
        meta = ckpt.get("tokenizer")
    elif init_from == "scratch":
        raise NanoGPTError(
            "sft_data fine-tunes a base model: give --init_from (gpt2, a checkpoint or an out_dir)"
        )
    else:
        meta = {"name": "gpt2"} if is_hf_source(init_from) else peek_checkpoint(init_from).get("tokenizer")
    if meta is None:
        raise NanoGPTError(
            f"{init_from} names no tokenizer (a nanoGPT checkpoint?): SFT needs one with chat tokens"
        )
    return meta


def sft_data(cfg: Any, ckpt: dict[str, Any] | None) -> SFTData:
    """The conversations of cfg.sft_data, read and checked for the model cfg starts from."""
    meta = base_tokenizer_meta(cfg.init_from, ckpt)
    return SFTData(cfg.sft_data, meta, cfg.sft_val_fraction, cfg.seed)
