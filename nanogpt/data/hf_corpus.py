"""Document corpora through Hugging Face `datasets` (openwebtext, FineWeb-Edu): the optional `datasets` extra.

Documents come from the hub or from local .txt (one document per file), .jsonl/.json or .parquet files
with a "text" column. They are split into train/val by document (nanoGPT's seeded shuffle), encoded with
GPT-2 BPE and an end-of-text token after each document by several processes (results live in the
`datasets` on-disk cache, not in memory), and handed back shard by shard for writing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanogpt.data.sources import sources_sha256
from nanogpt.data.tokenizers import GPT2Tokenizer
from nanogpt.errors import NanoGPTError
from nanogpt.processes import die_with_parent

SPLIT_SEED = 2357  # nanoGPT's openwebtext/prepare.py seed: the same documents land in val
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise NanoGPTError(
            "document corpora need Hugging Face datasets: pip install 'nanogpt[datasets]'"
        ) from None
    return datasets


def load_documents(files: list[Path] | None, hub: tuple[str, str | None]):
    """(documents, sha256): a `datasets.Dataset` with a "text" column, and a hash identifying its source.

    For local files the hash is their sha256 (sources.sources_sha256); for the hub, one over the hub
    id and the dataset's own fingerprint.
    """
    datasets = _datasets()
    if files is None:
        path, name = hub
        try:
            ds = datasets.load_dataset(path, name, split="train")
        except OSError as e:  # ConnectionError (offline, no network, timeouts), a hub file not found
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NanoGPTError(
                f"cannot download {path} from the Hugging Face hub ({reason}): check the network, "
                "or prepare it on a machine that can and copy its data folder here"
            ) from None
        return ds, hashlib.sha256(f"{path}:{name}:{ds._fingerprint}".encode()).hexdigest()
    builders = {_BUILDERS.get(p.suffix.lower(), "text") for p in files}
    if len(builders) > 1:
        raise NanoGPTError(
            f"a document source must be all text, all JSON or all parquet files, not {builders}"
        )
    builder = builders.pop()
    options = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **options)
    if "text" not in ds.column_names:
        raise NanoGPTError(f"{files[0]} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return ds.select_columns(["text"]), sources_sha256(files)


_PREPARING_PID = os.getpid()  # a forked `datasets` worker inherits it: the pid of its parent


def _encode(batch: dict, num_threads: int) -> dict:
    if (
        os.getpid() != _PREPARING_PID
    ):  # in a worker of map(num_proc=...): end with the prepare, however it ends
        die_with_parent(_PREPARING_PID)
    tok = GPT2Tokenizer()
    ids = [doc + [tok.eot] for doc in tok.encode_batch(batch["text"], num_threads=num_threads)]
    return {"ids": ids, "len": [len(doc) for doc in ids]}


def tokenize(ds, val_fraction: float, num_proc: int | None = None) -> dict:
    """{"train": ..., "val": ...} datasets of "ids" (a document's tokens then eot) and "len"."""
    if len(ds) < 2:
        raise NanoGPTError(f"a document corpus needs at least 2 documents for train and val, got {len(ds)}")
    num_proc = num_proc or max(1, min((os.cpu_count() or 1) // 2, len(ds) // 10_000))
    split = ds.train_test_split(test_size=val_fraction, seed=SPLIT_SEED, shuffle=True)
    return {
        name: split[key].map(
            _encode,
            batched=True,
            remove_columns=["text"],
            num_proc=num_proc if num_proc > 1 else None,
            fn_kwargs={"num_threads": 1 if num_proc > 1 else (os.cpu_count() or 1)},
            desc=f"tokenize {name}",
        )
        for name, key in (("train", "train"), ("val", "test"))
    }


def token_shards(tokenized, desc: str, max_shards: int = 1024) -> Iterator[np.ndarray]:
    """The split's tokens in document order, one contiguous shard at a time (bounded memory)."""
    num_shards = min(max_shards, len(tokenized))
    for index in tqdm(range(num_shards), desc=desc, delay=2):
        shard = tokenized.shard(num_shards, index, contiguous=True).with_format("numpy")
        yield np.concatenate(list(shard["ids"]))
