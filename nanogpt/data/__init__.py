"""The data layer: raw text -> tokenizer -> token files (prepare) -> batches (loader)."""

from nanogpt.data.loader import BatchLoader, load_split, read_meta, sequential_batches
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
