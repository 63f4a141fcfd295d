"""`nanogpt prepare NAME`: raw text -> DATA_DIR/NAME/{train,val[,test]}.bin + meta.json.

The bins are flat arrays of token ids (uint16 when the vocabulary fits, else uint32: meta.json's "dtype")
that the loader memory-maps. The corpus is streamed, never read whole: a first pass checks it is UTF-8 and
counts it (and trains the BPE tokenizer on the train split, for --tokenizer bpe), then pieces of about a
million characters, cut where BPE cuts anyway, are encoded by a pool of --num_proc processes and appended
to the bins in order. Everything is written into a temporary folder beside DATA_DIR/NAME, which replaces
it only once complete: a failed, full-disk or interrupted prepare leaves the old dataset as it was.
Re-running on an unchanged source (same sha256, tokenizer, options and split) is a no-op.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanogpt.data.bpe import (
    check_vocab_size,
    compression_report,
    format_report,
    load_bpe,
    save_bpe,
    train_bpe,
)
from nanogpt.data.meta import META_FILE, read_meta, write_meta
from nanogpt.data.parallel import encode_in_order
from nanogpt.data.sources import (
    ENWIK8,
    TEXT8,
    TINY_SHAKESPEARE,
    RawSource,
    check_unchanged,
    fetch,
    file_sha256,
    read_blocks,
    read_text,
    source_files,
    sources_sha256,
    stamps,
)
from nanogpt.data.splits import Corpus, Segment, plan_corpus, split_rule
from nanogpt.data.staging import BPE_FILE, remove_leftovers, staged, write_tokens
from nanogpt.data.tokenizers import (
    PATTERNS,
    TOKENIZERS,
    CharTokenizer,
    Tokenizer,
    UnknownCharacterError,
    cut_stream,
    get_tokenizer,
    token_dtype,
)
from nanogpt.errors import NanoGPTError
from nanogpt.processes import exits_on_sigterm

FORMAT = 1  # meta.json's layout version; a prepared folder of another version is prepared again
_PIECE = 1 << 20  # characters (or bytes) per piece a worker encodes: bounds memory, paces the progress bar
_REPORT_SAMPLE = 1 << 20  # characters of val on which the BPE report counts tokens per byte


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
            f"(or name your own and give --source PATH --tokenizer {'|'.join(TOKENIZERS)})"
        )
    if tokenizer is None:
        raise NanoGPTError(f"your own dataset {name!r} needs --tokenizer ({'|'.join(TOKENIZERS)})")
    return DatasetSpec(f"text from {source}", tokenizer, 0.1)


def _check_val_fraction(val_fraction: float, names: tuple[str, ...]) -> None:
    held = ", ".join(names[1:])
    if not val_fraction > 0:
        raise NanoGPTError(
            f"val_fraction must be above 0: it is the share of the text held out for {held}, got {val_fraction}"
        )
    if val_fraction * (len(names) - 1) >= 1:
        raise NanoGPTError(
            f"val_fraction {val_fraction} leaves no text for train: {held} take {val_fraction} each, "
            f"so it must be below {1 / (len(names) - 1):g}"
        )


@dataclass(frozen=True)
class _Choice:
    """The tokenizer asked for: its name, what else defines it (meta.json's "tokenizer_options", which
    the no-op check compares) and, with --tokenizer_file, the BPE itself (not trained again)."""

    name: str
    options: dict
    given: Tokenizer | None = None


def _choose_tokenizer(
    tokenizer: str, vocab_size: int | None, pattern: str | None, tokenizer_file: str | Path | None
) -> _Choice:
    if tokenizer_file is not None:
        if tokenizer != "bpe" or vocab_size is not None or pattern is not None:
            raise NanoGPTError(
                "--tokenizer_file gives a trained BPE: it goes with --tokenizer bpe, without --vocab_size or --pattern"
            )
        given = load_bpe(tokenizer_file)  # first: it says clearly when the file is missing or not a BPE
        return _Choice("bpe", {"tokenizer_file_sha256": file_sha256(Path(tokenizer_file))}, given)
    if tokenizer != "bpe":
        if vocab_size is not None or pattern is not None:
            raise NanoGPTError("--vocab_size and --pattern are options of --tokenizer bpe")
        return _Choice(tokenizer, {})
    if vocab_size is None:
        raise NanoGPTError(
            "--tokenizer bpe needs --vocab_size N (the tokens it learns, e.g. 4096), or --tokenizer_file PATH "
            "(a dataset's bpe_tokenizer.json) to encode with a BPE trained before"
        )
    check_vocab_size(vocab_size)
    if (pattern or "gpt4") not in PATTERNS:
        raise NanoGPTError(f"unknown --pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    return _Choice("bpe", {"vocab_size": int(vocab_size), "pattern": pattern or "gpt4"})


def _meta_header(
    name: str, source: list[str] | str, sha256: str, tokenizer: str, options: dict, split: dict
) -> dict:
    """The start of meta.json: everything known before tokenizing, including what `_identity` compares."""
    return {
        "format": FORMAT,
        "dataset": name,
        "source": source,
        "source_sha256": sha256,
        "tokenizer": {"name": tokenizer},
        "tokenizer_options": options,
        "split": split,
    }


def _identity(meta: dict) -> tuple:
    """What decides whether a prepared folder is up to date."""
    split = meta.get("split", {})
    return (
        meta.get("format"),
        meta.get("source_sha256"),
        meta.get("tokenizer", {}).get("name"),
        meta.get("tokenizer_options", {}),
        split.get("val_fraction"),
        split.get("unit"),
    )


def _up_to_date(out: Path, wanted: dict) -> bool:
    from nanogpt.data.loader import split_path

    try:
        meta = read_meta(out)  # loads (and checks) a BPE tokenizer's file too
        for split in meta["split"]["names"]:
            split_path(out, meta, split)
    except (NanoGPTError, OSError, KeyError, TypeError):
        return False
    return _identity(meta) == _identity(wanted)


def _finish(folder: Path, meta: dict, tok: Tokenizer, counts: dict[str, int]) -> dict:
    """meta.json (and a BPE's tokenizer file) into the staged folder."""
    tokenizer = tok.to_meta()
    if tok.name == "bpe":
        save_bpe(tok, folder / BPE_FILE)
        tokenizer = {"name": "bpe", "file": BPE_FILE, "sha256": file_sha256(folder / BPE_FILE)}
    meta |= {
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "eot": tok.eot,
        "dtype": token_dtype(tok.vocab_size).name,
    }
    meta |= {f"{split}_tokens": n for split, n in counts.items()}
    write_meta(folder, meta)
    return meta


def _announce(meta: dict, out: Path) -> Path:
    tokens = ", ".join(f"{split} {meta[f'{split}_tokens']:,}" for split in meta["split"]["names"])
    print(f"{meta['dataset']}: {tokens} tokens (vocab {meta['vocab_size']}, {meta['dtype']}) -> {out}")
    return out


# --- text files: plan the splits, build the tokenizer, encode in parallel ---


def _pieces(segments: list[Segment], tokenizer: str) -> Iterator[tuple[tuple[str, bool, int], str | bytes]]:
    """((split, first piece of its document, bytes), piece) for every piece of the segments, in order."""
    for seg in segments:
        raw = tokenizer == "byte"
        chunks = read_blocks(seg.path, seg.start, seg.end) if raw else read_text(seg.path, seg.start, seg.end)
        for i, piece in enumerate(cut_stream(chunks, _PIECE, anywhere=tokenizer in ("char", "byte"))):
            yield (seg.split, i == 0, len(piece) if raw else len(piece.encode("utf-8"))), piece


def _check_alphabet(corpus: Corpus, alphabet: str) -> None:
    """Name the first character of the corpus outside a fixed alphabet, and where it is."""
    if not set(corpus.chars) - set(alphabet):
        return
    tok = CharTokenizer(alphabet)
    for path in corpus.files:
        n = 0
        for text in read_text(path):
            try:
                tok.encode_array(text)
            except UnknownCharacterError as e:
                raise UnknownCharacterError(e.char, n + e.position, e.vocab_size, str(path)) from None
            n += len(text)


def _counted(pieces: Iterator[tuple[tuple, str]], bar: tqdm) -> Iterator[str]:
    """The pieces' text, moving the progress bar by their bytes."""
    for (_, _, size), piece in pieces:
        bar.update(size)
        yield piece


def _bpe(corpus: Corpus, choice: _Choice, num_proc: int) -> tuple[Tokenizer, dict]:
    """The BPE (trained on the train split, or the one given) and its report: tokens per byte on val
    against GPT-2 and characters, a few lines as tokens."""
    tok, seconds = choice.given, None
    if tok is None:
        train = [seg for seg in corpus.segments if seg.split == "train"]
        start = time.perf_counter()
        with tqdm(
            total=sum(s.end - s.start for s in train), unit="B", unit_scale=True, desc="train bpe", delay=2
        ) as bar:
            texts = _counted(_pieces(train, "bpe"), bar)
            tok = train_bpe(
                texts, choice.options["vocab_size"], choice.options["pattern"], num_threads=num_proc
            )
        seconds = time.perf_counter() - start
        if tok.vocab_size < choice.options["vocab_size"]:
            print(
                f"note: the train split allowed only {tok.vocab_size} tokens ({choice.options['vocab_size']} asked)"
            )
    sample = ""
    for _, piece in _pieces([seg for seg in corpus.segments if seg.split != "train"], "bpe"):
        sample += piece
        if len(sample) >= _REPORT_SAMPLE:
            break
    report = compression_report(tok, sample[:_REPORT_SAMPLE], seconds)
    print(format_report(report))
    return tok, report


def _encoded(
    corpus: Corpus, tok: Tokenizer, tokenizer: str, num_proc: int, desc: str
) -> Iterator[tuple[str, np.ndarray]]:
    """(split, ids) in order, with one eot between the documents of a split where the tokenizer has one."""
    eot = None if tok.eot is None else np.array([tok.eot])
    seen: set[str] = set()
    with tqdm(total=corpus.n_bytes, unit="B", unit_scale=True, desc=desc, delay=2) as bar:
        for (split, first, size), ids in encode_in_order(tok, _pieces(corpus.segments, tokenizer), num_proc):
            if first and split in seen and eot is not None:
                yield split, eot
            seen.add(split)
            yield split, ids
            bar.update(size)


def _prepare_text(
    name: str,
    spec: DatasetSpec,
    files: list[Path],
    choice: _Choice,
    val_fraction: float,
    out: Path,
    num_proc: int | None,
) -> Path:
    unit = "bytes" if choice.name == "byte" else "characters"
    split = {
        "val_fraction": val_fraction,
        "names": list(spec.splits),
        "unit": "documents" if len(files) > 1 else unit,
    }
    before = stamps(files)  # checked again once everything is read: a source written meanwhile is refused
    sha256 = sources_sha256(files)
    meta = _meta_header(name, [str(p) for p in files], sha256, choice.name, choice.options, split)
    if _up_to_date(out, meta):
        print(f"{name}: up to date ({out})")
        return out
    corpus = plan_corpus(files, choice.name, spec.splits, val_fraction)
    if spec.alphabet:
        _check_alphabet(corpus, spec.alphabet)
    num_proc = num_proc or os.cpu_count() or 1
    workers = max(1, min(num_proc, -(-corpus.n_bytes // _PIECE)))  # no more processes than pieces
    if choice.name == "char":
        tok = CharTokenizer(spec.alphabet or corpus.chars)
    elif choice.name == "bpe":
        tok, meta["tokenizer_report"] = _bpe(corpus, choice, num_proc)
    else:
        tok = get_tokenizer(choice.name)
    meta["split"] |= {"rule": split_rule(spec.splits, val_fraction, corpus.unit)}
    if corpus.unit == "documents":
        meta["split"]["documents"] = {s: sum(seg.split == s for seg in corpus.segments) for s in spec.splits}
    else:
        meta["split"]["ranges"] = {seg.split: [seg.start, seg.end] for seg in corpus.segments}
    with staged(out) as folder:
        items = _encoded(corpus, tok, choice.name, workers, f"tokenize {name} ({workers} proc)")
        counts = write_tokens(folder, spec.splits, items, token_dtype(tok.vocab_size))
        check_unchanged(files, before)
        _check_counts(counts)
        meta = _finish(folder, meta, tok, counts)
    return _announce(meta, out)


def _check_counts(counts: dict[str, int]) -> None:
    """Every split must hold a window of at least one token and its target (2 tokens)."""
    for split, n in counts.items():
        if n < 2:
            raise NanoGPTError(
                f"the {split} split holds {n} token(s): training and evaluation need at least 2 (a window and "
                "its next token); give more text, or change --val_fraction"
            )


def _num_proc(num_proc: int | None) -> int | None:
    """--num_proc checked: at least 1, at most the cores there are (more only share them); None: the default."""
    cores = os.cpu_count() or 1
    if num_proc is None:
        return None
    if num_proc < 1:
        raise NanoGPTError(f"--num_proc must be at least 1 (the encoding processes), got {num_proc}")
    if num_proc > cores:
        print(f"note: --num_proc {num_proc} is more than the {cores} cores here: using {cores}")
        return cores
    return num_proc


def _prepare_documents(
    name: str,
    spec: DatasetSpec,
    source: str | Path | None,
    tokenizer: str,
    val_fraction: float,
    out: Path,
    num_proc: int | None,
) -> Path:
    from nanogpt.data import hf_corpus

    if tokenizer != "gpt2":
        raise NanoGPTError(
            f"{name} separates documents with GPT-2's end-of-text token: it needs --tokenizer gpt2"
        )
    files = source_files(source) if source is not None else None
    before = stamps(files) if files else None
    docs, sha256 = hf_corpus.load_documents(files, spec.hub)
    described = [str(p) for p in files] if files else "hf:" + "/".join(filter(None, spec.hub))
    split = {"val_fraction": val_fraction, "names": list(spec.splits), "unit": "documents"}
    meta = _meta_header(name, described, sha256, tokenizer, {}, split)
    if _up_to_date(out, meta):
        print(f"{name}: up to date ({out})")
        return out
    tok = get_tokenizer(tokenizer)
    tokenized = hf_corpus.tokenize(docs, val_fraction, num_proc)
    items = (
        (s, shard) for s, d in tokenized.items() for shard in hf_corpus.token_shards(d, desc=f"write {s}.bin")
    )
    meta["split"] |= {
        "rule": f"documents shuffled (seed {hf_corpus.SPLIT_SEED}), {val_fraction:.4%} of them to val",
        "documents": {s: len(d) for s, d in tokenized.items()},
    }
    with staged(out) as folder:
        counts = write_tokens(folder, spec.splits, items, token_dtype(tok.vocab_size))
        if files:
            check_unchanged(files, before)
        meta = _finish(folder, meta, tok, counts)
    return _announce(meta, out)


def prepare_dataset(
    name: str,
    source: str | Path | None = None,
    data_dir: str | Path = "data",
    tokenizer: str | None = None,
    val_fraction: float | None = None,
    vocab_size: int | None = None,
    pattern: str | None = None,
    num_proc: int | None = None,
    tokenizer_file: str | Path | None = None,
) -> Path:
    """Prepare dataset `name` into DATA_DIR/NAME and return that folder.

    `source`: a file, folder or glob to read instead of the canonical source (required for a name not in
    DATASETS); `tokenizer`: char | gpt2 | byte | bpe instead of the dataset's own; `val_fraction`: the share
    of the corpus in val (and in test, where there is one), None: the dataset's default; `vocab_size`,
    `pattern` ("gpt4" default, or "gpt2"): the BPE to train (--tokenizer bpe); `num_proc`: encoding
    processes (default: every core); `tokenizer_file`: a BPE trained before (a dataset's
    bpe_tokenizer.json) to encode with instead of training one.
    """
    tokenizer = tokenizer or ("bpe" if tokenizer_file is not None else None)
    spec = _spec(name, source, tokenizer)
    tokenizer = tokenizer or spec.tokenizer
    if tokenizer not in TOKENIZERS:
        raise NanoGPTError(f"unknown tokenizer {tokenizer!r}; known: {', '.join(TOKENIZERS)}")
    choice = _choose_tokenizer(tokenizer, vocab_size, pattern, tokenizer_file)
    val_fraction = spec.val_fraction if val_fraction is None else float(val_fraction)
    _check_val_fraction(val_fraction, spec.splits)
    num_proc = _num_proc(num_proc)
    out = (Path(data_dir) / name).resolve()  # a symlinked dataset folder is replaced where it really is
    for path in remove_leftovers(out):
        print(f"removed {path.name}, left in {out.parent} by a prepare that was killed")
    if spec.hub is not None:
        return _prepare_documents(name, spec, source, tokenizer, val_fraction, out, num_proc)
    files = source_files(source) if source is not None else [fetch(spec.raw)]
    return _prepare_text(name, spec, files, choice, val_fraction, out, num_proc)


def ensure_prepared(name: str, data_dir: str | Path) -> Path:
    """DATA_DIR/NAME, prepared first if it is a known dataset that is not there yet (a dataset of your own
    must be prepared with `nanogpt prepare NAME --source PATH`)."""
    path = Path(data_dir) / name
    if not (path / META_FILE).is_file() and name in DATASETS:
        print(f"{path} is not prepared: running `nanogpt prepare {name} --data_dir={data_dir}`")
        prepare_dataset(name, data_dir=data_dir)
    return path


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line through the CLI (NanoGPTError, exit 1), not usage + exit 2."""

    def error(self, message: str):
        raise NanoGPTError(f"{message} (`nanogpt prepare --help` lists the options and datasets)")


def _parser() -> argparse.ArgumentParser:
    known = "\n".join(f"  {name:<17} {spec.description}" for name, spec in DATASETS.items())
    parser = _Parser(
        prog="nanogpt prepare",
        description="Tokenize a dataset into DATA_DIR/NAME/{train,val}.bin + meta.json.",
        epilog=f"datasets:\n{known}\n\nor any NAME with --source PATH --tokenizer {'|'.join(TOKENIZERS)}.\n"
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
    parser.add_argument(
        "--vocab_size",
        "--vocab-size",
        type=int,
        help="--tokenizer bpe: tokens to learn (256 bytes + merges + eot)",
    )
    parser.add_argument(
        "--pattern", choices=list(PATTERNS), help="--tokenizer bpe: split pattern (default gpt4)"
    )
    parser.add_argument("--num_proc", "--num-proc", type=int, help="encoding processes (default: every core)")
    parser.add_argument(
        "--tokenizer_file",
        "--tokenizer-file",
        help="encode with this trained BPE (DATA_DIR/OTHER/bpe_tokenizer.json) instead of training one",
    )
    return parser


@exits_on_sigterm
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    prepare_dataset(
        args.name,
        args.source,
        args.data_dir,
        args.tokenizer,
        args.val_fraction,
        args.vocab_size,
        args.pattern,
        args.num_proc,
        args.tokenizer_file,
    )
    return 0
