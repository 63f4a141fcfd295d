"""The data layer: raw text -> tokenizer -> token files + meta.json (prepare, meta) -> batches (loader)."""

from nanogpt.data.loader import BatchLoader, load_split, sequential_batches
from nanogpt.data.meta import read_meta
from nanogpt.data.prepare import DATASETS, prepare_dataset
from nanogpt.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    get_tokenizer,
    tokenizer_from_meta,
)

__all__ = [
    "DATASETS",
    "BPETokenizer",
    "BatchLoader",
    "ByteTokenizer",
    "CharTokenizer",
    "GPT2Tokenizer",
    "Tokenizer",
    "get_tokenizer",
    "load_split",
    "prepare_dataset",
    "read_meta",
    "sequential_batches",
    "tokenizer_from_meta",
]
