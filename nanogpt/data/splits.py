"""Which text goes to train, val (and test): a single file by position, a folder of files by document.

A plan (plan_corpus: one streamed pass over the text, which also checks it is UTF-8) is a list of
Segments, byte ranges of source files in the order they are tokenized: all of train, then val, then test. A single file is cut by characters (by bytes for the byte tokenizer): nanoGPT's first
90% / last 10%, so tiny Shakespeare gives its known 1,003,854 / 111,540. A source of several files is split
by whole files (documents): no document is cut between train and val.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from nanogpt.data.sources import read_text, source_size
from nanogpt.errors import NanoGPTError

DOCUMENT_SEED = 1337  # the documents' order when choosing which go to val: the same for every run


@dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of a source file, all in one split; start and end are character boundaries."""

    split: str
    path: Path
    start: int
    end: int


def split_bounds(n: int, splits: tuple[str, ...], val_fraction: float) -> dict[str, tuple[int, int]]:
    """[start, end) of each split: train first (nanoGPT's int(n * 0.9)), then val_fraction of n each."""
    n_train, held = int(n * (1 - val_fraction * (len(splits) - 1))), int(n * val_fraction)
    edges = [0, n_train] + [n_train + held * i for i in range(1, len(splits) - 1)] + [n]
    bounds = {split: (edges[i], edges[i + 1]) for i, split in enumerate(splits)}
    for split, (start, end) in bounds.items():
        if end <= start:
            raise NanoGPTError(
                f"the {split} split would be empty: {n} units with val_fraction {val_fraction}"
            )
    return bounds


def split_rule(splits: tuple[str, ...], val_fraction: float, unit: str) -> str:
    """The rule in words, for meta.json: "first 90% train, last 10% val (by characters)"."""
    if unit == "documents":
        return (
            f"whole files, in a seeded random order (seed {DOCUMENT_SEED}), to {', '.join(splits[1:])} until "
            f"each holds about {val_fraction:.4%} of the bytes; the rest to {splits[0]}; each in name order"
        ).replace(".0000%", "%")
    train = 1 - val_fraction * (len(splits) - 1)
    held = [f"{'last' if s == splits[-1] else 'next'} {val_fraction:.4%} {s}" for s in splits[1:]]
    return f"first {train:.4%} {splits[0]}, {', '.join(held)} (by {unit})".replace(".0000%", "%")


def plan_by_position(path: Path, bounds: dict[str, tuple[int, int]]) -> list[Segment]:
    """One file cut at byte offsets: `bounds` already converted from characters where needed."""
    return [Segment(split, path, start, end) for split, (start, end) in bounds.items()]


def plan_by_documents(
    files: list[Path], sizes: list[int], splits: tuple[str, ...], val_fraction: float
) -> list[Segment]:
    """Whole files to each held-out split, in a seeded random order, until it holds val_fraction of the
    bytes (skipping a file that would take it past twice that; the smallest file if none fits); the rest
    to train. Each split keeps its files in name order."""
    order = list(range(len(files)))
    random.Random(DOCUMENT_SEED).shuffle(order)
    target = val_fraction * sum(sizes)
    chosen: dict[str, list[int]] = {}
    for split in splits[1:]:
        chosen[split], held = [], 0
        for i in list(order):
            if held < target and held + sizes[i] <= 2 * target:
                chosen[split].append(i)
                order.remove(i)
                held += sizes[i]
        if not held and len(order) > 1:
            chosen[split].append(smallest := min(order, key=lambda i: (sizes[i] == 0, sizes[i])))
            order.remove(smallest)
    chosen[splits[0]] = order
    for split, members in chosen.items():
        if not any(sizes[i] for i in members):
            raise NanoGPTError(
                f"the {split} split would be empty: {len(files)} files cannot be split by whole files into "
                f"{', '.join(splits)} with val_fraction {val_fraction} (add files, or give one file to split "
                "by position)"
            )
    return [Segment(split, files[i], 0, sizes[i]) for split in splits for i in sorted(chosen[split])]


@dataclass(frozen=True)
class Corpus:
    files: list[Path]
    segments: list[Segment]  # in tokenizing order: train, then val (then test)
    unit: str  # what the split counts: "characters", "bytes" or "documents"
    n_bytes: int
    chars: str  # the sorted distinct characters ("" for the byte tokenizer)


def _scan(path: Path, distinct: bool) -> tuple[int, set[str]]:
    """(characters, distinct characters if asked) of a text file: one streamed pass, which also checks
    that it is UTF-8 before any long work starts."""
    n, seen = 0, set()
    for text in read_text(path):
        n += len(text)
        if distinct:  # the char tokenizer's vocabulary (the slow part of the pass: ~130 MB/s)
            seen.update(text)
    return n, seen


def _char_offset_to_byte(path: Path, index: int) -> int:
    position = n = 0
    for text in read_text(path):
        if n + len(text) >= index:
            return position + len(text[: index - n].encode("utf-8"))
        n, position = n + len(text), position + len(text.encode("utf-8"))
    return position


def plan_corpus(files: list[Path], tokenizer: str, names: tuple[str, ...], val_fraction: float) -> Corpus:
    sizes = [source_size(p) for p in files]
    scans = [] if tokenizer == "byte" else [_scan(p, tokenizer == "char") for p in files]
    chars = "".join(sorted(set().union(*(seen for _, seen in scans))))
    if len(files) > 1:
        segments, unit = plan_by_documents(files, sizes, names, val_fraction), "documents"
    elif tokenizer == "byte":
        segments, unit = (
            plan_by_position(files[0], split_bounds(sizes[0], names, val_fraction)),
            "bytes",
        )
    else:
        bounds = split_bounds(scans[0][0], names, val_fraction)
        in_bytes = {s: tuple(_char_offset_to_byte(files[0], i) for i in b) for s, b in bounds.items()}
        segments, unit = plan_by_position(files[0], in_bytes), "characters"
    return Corpus(files, segments, unit, sum(sizes), chars)
