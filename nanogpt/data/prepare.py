"""`nanogpt prepare NAME`: raw text -> DATA_DIR/NAME/{train,val[,test]}.bin + meta.json.

The bins are flat arrays of token ids (uint16 when the vocabulary fits, else uint32) that the loader
memory-maps. Every file is written under a temporary name and renamed into place, meta.json last: a folder
without meta.json is never valid, so an interrupted prepare leaves nothing that looks prepared. Re-running
on an unchanged source (same sha256, tokenizer and split) is a no-op.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanogpt.data.sources import (
    ENWIK8,
    TEXT8,
    TINY_SHAKESPEARE,
    RawSource,
    decode_utf8,
    fetch,
    read_bytes,
    source_files,
    sources_sha256,
)
from nanogpt.data.tokenizers import (
    TOKENIZERS,
    CharTokenizer,
    Tokenizer,
    UnknownCharacterError,
    get_tokenizer,
    safe_pieces,
    token_dtype,
)
from nanogpt.errors import NanoGPTError
from nanogpt.files import write_text_atomic

FORMAT = 1  # meta.json's layout version; a prepared folder of another version is prepared again
_PIECE = 1 << 23  # characters (or bytes) encoded per step: bounds memory and paces the progress bar


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset `nanogpt prepare` knows by name."""

    description: str
    tokenizer: str  # default tokenizer; --tokenizer overrides it
    val_fraction: float  # share of the corpus in val (and in test, where there is one)
    splits: tuple[str, ...] = ("train", "val")  # in corpus order: train first
    raw: RawSource | None = None  # the canonical source; None: --source is required
    alphabet: str | None = None  # a fixed character vocabulary instead of the corpus's own
    hub: tuple[str, str | None] | None = None  # (path, config) of a document corpus on the HF hub


DATASETS: dict[str, DatasetSpec] = {
    "shakespeare_char": DatasetSpec(
        "tiny Shakespeare (1.1 MB), characters; first 90% train, last 10% val",
        "char",
        0.1,
        raw=TINY_SHAKESPEARE,
    ),
    "shakespeare": DatasetSpec("tiny Shakespeare, GPT-2 BPE; 90% / 10%", "gpt2", 0.1, raw=TINY_SHAKESPEARE),
    "enwik8": DatasetSpec(
        "first 100 MB of an English Wikipedia dump, bytes; 90M / 5M / 5M",
        "byte",
        0.05,
        ("train", "val", "test"),
        raw=ENWIK8,
    ),
    "text8": DatasetSpec(
        "enwik8 cleaned to 27 symbols (space, a-z); 90M / 5M / 5M",
        "char",
        0.05,
        ("train", "val", "test"),
        raw=TEXT8,
        alphabet=" abcdefghijklmnopqrstuvwxyz",
    ),
    "openwebtext": DatasetSpec(
        "OpenWebText (8M documents, ~9B tokens), GPT-2 BPE + eot per document; needs `datasets`",
        "gpt2",
        0.0005,
        hub=("Skylion007/openwebtext", None),
    ),
    "fineweb_edu": DatasetSpec(
        "FineWeb-Edu 10B-token sample, GPT-2 BPE + eot per document; needs `datasets`",
        "gpt2",
        0.0005,
        hub=("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    ),
}


def _spec(name: str, source: str | Path | None, tokenizer: str | None) -> DatasetSpec:
    if name in DATASETS:
        return DATASETS[name]
    if source is None:
        raise NanoGPTError(
            f"unknown dataset {name!r}; known: {', '.join(DATASETS)} "
            "(or name your own and give --source PATH --tokenizer char|gpt2|byte)"
        )
    if tokenizer is None:
        raise NanoGPTError(f"your own dataset {name!r} needs --tokenizer ({'|'.join(TOKENIZERS)})")
    return DatasetSpec(f"text from {source}", tokenizer, 0.1)


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


def _split_rule(splits: tuple[str, ...], val_fraction: float, unit: str) -> str:
    train = 1 - val_fraction * (len(splits) - 1)
    held = [f"{'last' if s == splits[-1] else 'next'} {val_fraction:.4%} {s}" for s in splits[1:]]
    return f"first {train:.4%} {splits[0]}, {', '.join(held)} (by {unit})".replace(".0000%", "%")


def _meta_header(
    name: str,
    source: list[str] | str,
    sha256: str,
    tokenizer: str,
    val_fraction: float,
    splits: tuple[str, ...],
) -> dict:
    """The start of meta.json: everything known before tokenizing, including what `_identity` compares."""
    return {
        "format": FORMAT,
        "dataset": name,
        "source": source,
        "source_sha256": sha256,
        "tokenizer": {"name": tokenizer},
        "split": {"val_fraction": val_fraction, "names": list(splits)},
    }


def _identity(meta: dict) -> tuple:
    """What decides whether a prepared folder is up to date."""
    return (
        meta.get("format"),
        meta.get("source_sha256"),
        meta.get("tokenizer", {}).get("name"),
        meta.get("split", {}).get("val_fraction"),
    )


def _up_to_date(out: Path, wanted: dict) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes_ok = all(
            (out / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * itemsize
            for split in meta["split"]["names"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return sizes_ok and _identity(meta) == _identity(wanted)


def _write_bins(out: Path, streams: dict[str, Iterable[np.ndarray]], dtype: np.dtype) -> dict[str, int]:
    """Stream each split's token arrays to SPLIT.bin through a temporary name; the token count of each."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the folder is invalid until the new meta.json lands
    tmps = {split: out / f".{split}.bin.{os.getpid()}.tmp" for split in streams}
    counts = dict.fromkeys(streams, 0)
    try:
        for split, stream in streams.items():
            with open(tmps[split], "wb") as f:
                for tokens in stream:
                    tokens.astype(dtype, copy=False).tofile(f)
                    counts[split] += len(tokens)
        for split, tmp in tmps.items():
            os.replace(tmp, out / f"{split}.bin")
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return counts


def _finish(out: Path, meta: dict, tok: Tokenizer, counts: dict[str, int]) -> Path:
    meta |= {
        "tokenizer": tok.to_meta(),
        "vocab_size": tok.vocab_size,
        "eot": tok.eot,
        "dtype": token_dtype(tok.vocab_size).name,
    }
    meta |= {f"{split}_tokens": n for split, n in counts.items()}
    write_text_atomic(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    tokens = ", ".join(f"{split} {n:,}" for split, n in counts.items())
    print(f"{meta['dataset']}: {tokens} tokens (vocab {tok.vocab_size}, {meta['dtype']}) -> {out}")
    return out


def _read_corpus(files: list[Path], tokenizer: str) -> tuple[str | bytes, list[int]]:
    """The files joined, and where each starts. The byte tokenizer keeps raw bytes: enwik8's standard
    split is by bytes, even where it cuts a multi-byte character."""
    if tokenizer == "byte":
        parts: list = [read_bytes(p) for p in files]
        corpus: str | bytes = b"".join(parts)
    else:
        parts = [decode_utf8(read_bytes(p), p) for p in files]
        corpus = "".join(parts)
    return corpus, np.cumsum([0] + [len(p) for p in parts[:-1]]).tolist()


def _encode_split(
    tok: Tokenizer,
    corpus: str | bytes,
    bounds: tuple[int, int],
    bar: tqdm,
    files: list[Path],
    starts: list[int],
) -> Iterator[np.ndarray]:
    start, end = bounds
    for offset, piece in safe_pieces(corpus[start:end], _PIECE):
        try:
            yield tok.encode_array(piece)
        except UnknownCharacterError as e:
            position = start + offset + e.position
            i = bisect.bisect_right(starts, position) - 1
            raise UnknownCharacterError(e.char, position - starts[i], e.vocab_size, str(files[i])) from None
        bar.update(len(piece))


def _prepare_text(
    name: str, spec: DatasetSpec, files: list[Path], tokenizer: str, val_fraction: float, out: Path
) -> Path:
    unit = "bytes" if tokenizer == "byte" else "characters"
    source = [str(p) for p in files]
    meta = _meta_header(name, source, sources_sha256(files), tokenizer, val_fraction, spec.splits)
    if _up_to_date(out, meta):
        print(f"{name}: up to date ({out})")
        return out
    corpus, starts = _read_corpus(files, tokenizer)
    if tokenizer == "char":
        tok = CharTokenizer(spec.alphabet) if spec.alphabet else CharTokenizer.from_text(corpus)
    else:
        tok = get_tokenizer(tokenizer)
    bounds = split_bounds(len(corpus), spec.splits, val_fraction)
    with tqdm(
        total=len(corpus), unit=unit[0].upper(), unit_scale=True, desc=f"tokenize {name}", delay=2
    ) as bar:
        streams = {s: _encode_split(tok, corpus, b, bar, files, starts) for s, b in bounds.items()}
        counts = _write_bins(out, streams, token_dtype(tok.vocab_size))
    meta["split"] |= {
        "unit": unit,
        "rule": _split_rule(spec.splits, val_fraction, unit),
        "ranges": {s: list(b) for s, b in bounds.items()},
    }
    return _finish(out, meta, tok, counts)


def _prepare_documents(
    name: str, spec: DatasetSpec, source: str | Path | None, tokenizer: str, val_fraction: float, out: Path
) -> Path:
    from nanogpt.data import hf_corpus

    if tokenizer != "gpt2":
        raise NanoGPTError(
            f"{name} separates documents with GPT-2's end-of-text token: it needs --tokenizer gpt2"
        )
    files = source_files(source) if source is not None else None
    docs, sha256 = hf_corpus.load_documents(files, spec.hub)
    described = [str(p) for p in files] if files else "hf:" + "/".join(filter(None, spec.hub))
    meta = _meta_header(name, described, sha256, tokenizer, val_fraction, spec.splits)
    if _up_to_date(out, meta):
        print(f"{name}: up to date ({out})")
        return out
    tok = get_tokenizer(tokenizer)
    tokenized = hf_corpus.tokenize(docs, val_fraction)
    streams = {s: hf_corpus.token_shards(d, desc=f"write {s}.bin") for s, d in tokenized.items()}
    counts = _write_bins(out, streams, token_dtype(tok.vocab_size))
    meta["split"] |= {
        "unit": "documents",
        "rule": f"documents shuffled (seed {hf_corpus.SPLIT_SEED}), {val_fraction:.4%} of them to val",
        "documents": {s: len(d) for s, d in tokenized.items()},
    }
    return _finish(out, meta, tok, counts)


def prepare_dataset(
    name: str,
    source: str | Path | None = None,
    data_dir: str | Path = "data",
    tokenizer: str | None = None,
    val_fraction: float | None = None,
) -> Path:
    """Prepare dataset `name` into DATA_DIR/NAME and return that folder.

    `source`: a file, folder or glob to read instead of the canonical source (required for a name not in
    DATASETS); `tokenizer`: char | gpt2 | byte instead of the dataset's own; `val_fraction`: the share
    of the corpus in val (and in test, where there is one); None: the dataset's default.
    """
    spec = _spec(name, source, tokenizer)
    tokenizer = tokenizer or spec.tokenizer
    if tokenizer not in TOKENIZERS:
        raise NanoGPTError(f"unknown tokenizer {tokenizer!r}; known: {', '.join(TOKENIZERS)}")
    val_fraction = spec.val_fraction if val_fraction is None else float(val_fraction)
    if not 0 < val_fraction * (len(spec.splits) - 1) < 1:
        raise NanoGPTError(
            f"val_fraction must leave room for train: got {val_fraction} for splits {spec.splits}"
        )
    out = Path(data_dir) / name
    if spec.hub is not None:
        return _prepare_documents(name, spec, source, tokenizer, val_fraction, out)
    files = source_files(source) if source is not None else [fetch(spec.raw)]
    return _prepare_text(name, spec, files, tokenizer, val_fraction, out)


def ensure_prepared(name: str, data_dir: str | Path) -> Path:
    """DATA_DIR/NAME, prepared first if it is a known dataset that is not there yet (a dataset of your own
    must be prepared with `nanogpt prepare NAME --source PATH`)."""
    path = Path(data_dir) / name
    if not (path / "meta.json").is_file() and name in DATASETS:
        print(f"{path} is not prepared: running `nanogpt prepare {name} --data_dir={data_dir}`")
        prepare_dataset(name, data_dir=data_dir)
    return path


def _parser() -> argparse.ArgumentParser:
    known = "\n".join(f"  {name:<17} {spec.description}" for name, spec in DATASETS.items())
    parser = argparse.ArgumentParser(
        prog="nanogpt prepare",
        description="Tokenize a dataset into DATA_DIR/NAME/{train,val}.bin + meta.json.",
        epilog=f"datasets:\n{known}\n\nor any NAME with --source PATH --tokenizer char|gpt2|byte.\n"
        "Raw sources are read from $NANOGPT_DATA_SOURCES/<folder>/ when set, else downloaded and cached "
        "in $NANOGPT_CACHE (default ~/.cache/nanogpt).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help="a dataset above, or a name of your own with --source")
    parser.add_argument(
        "--source", help="a text file, folder or glob to read instead of the canonical source"
    )
    parser.add_argument("--data_dir", "--data-dir", default="data", help="output root (default: data)")
    parser.add_argument("--tokenizer", choices=list(TOKENIZERS), help="default: the dataset's own")
    parser.add_argument("--val_fraction", "--val-fraction", type=float, help="default: the dataset's own")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    prepare_dataset(args.name, args.source, args.data_dir, args.tokenizer, args.val_fraction)
    return 0
