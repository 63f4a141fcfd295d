"""Train a byte-level BPE on your text, save it, say how well it compresses, write it for `transformers`.

Training is rustbpe's (Rust, nanochat's trainer: it counts the pattern's pieces of the text on all cores
and learns merges); its ranks and the split pattern then build a `tiktoken.Encoding`, which encodes
(tokenizers.BPETokenizer). A trained tokenizer is saved as JSON, format "nanogpt-bpe" version 1, which is
exactly its `to_meta()` (so a checkpoint carries it whole):

    {"name": "bpe", "format": "nanogpt-bpe", "version": 1, "vocab_size": 2048,
     "pattern": "<the pre-tokenizer regex: text is split by it, merges never cross its pieces>",
     "special_tokens": {"<|endoftext|>": 2045, "<|im_start|>": 2046, "<|im_end|>": 2047},  # after the ranks
     "ranks": ["AA==", "AQ==", ...]}                 # base64 of token i's bytes; i = its id = its merge rank

Ids 0..255 are the single bytes, so every text encodes. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from nanogpt.data.tokenizers import (
    ENDOFTEXT,
    GPT2_CHAT_TOKENS,
    IM_END,
    IM_START,
    PATTERNS,
    BPETokenizer,
    GPT2Tokenizer,
    Tokenizer,
    tokenizer_from_meta,
)
from nanogpt.errors import NanoGPTError
from nanogpt.files import write_text_atomic

# <|endoftext|> goes between documents; ChatML's two turn markers are reserved for chat fine-tuning
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)


def check_vocab_size(vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> None:
    if vocab_size < 256 + len(special_tokens) + 1:
        raise NanoGPTError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs the 256 bytes, "
            f"{len(special_tokens)} special token(s) and at least one merge ({257 + len(special_tokens)}+)"
        )


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = "gpt4",
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
    num_threads: int | None = None,
) -> BPETokenizer:
    """A BPE of `vocab_size` tokens (256 bytes + merges + special tokens) learnt from `texts` (an iterator of
    documents or pieces cut where the pattern cuts; it is streamed, never held whole).

    pattern: "gpt4" or "gpt2" (tokenizers.PATTERNS). A corpus with too few distinct pairs ends with fewer
    merges than asked: the vocabulary is then smaller (check .vocab_size)."""
    import rustbpe

    if pattern not in PATTERNS:
        raise NanoGPTError(f"unknown BPE pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    check_vocab_size(vocab_size, special_tokens)
    if num_threads:  # rayon sizes its pool once per process, at its first use
        os.environ.setdefault("RAYON_NUM_THREADS", str(num_threads))
    trainer = rustbpe.Tokenizer()
    # rustbpe gathers buffer_size texts before counting them (default 8192): with pieces of ~1M characters
    # that would be the whole corpus in memory; a few per thread keep every core busy and memory flat
    buffer = 4 * (num_threads or os.cpu_count() or 1)
    trainer.train_from_iterator(
        iter(texts), vocab_size - len(special_tokens), buffer_size=buffer, pattern=PATTERNS[pattern]
    )
    ranks = [bytes(token) for token, _ in sorted(trainer.get_mergeable_ranks(), key=lambda item: item[1])]
    return BPETokenizer(ranks, PATTERNS[pattern], {t: len(ranks) + i for i, t in enumerate(special_tokens)})


def save_bpe(tok: BPETokenizer, path: str | Path) -> None:
    write_text_atomic(path, json.dumps(tok.to_meta(), ensure_ascii=False) + "\n")


def load_bpe(path: str | Path) -> BPETokenizer:
    """A tokenizer saved by save_bpe (or a dataset's bpe_tokenizer.json)."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NanoGPTError(f"cannot read the BPE tokenizer {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("name") != "bpe":
        raise NanoGPTError(f"{path} is not a nanogpt BPE tokenizer file (format nanogpt-bpe)")
    return tokenizer_from_meta(meta)


def show_tokens(tok: Tokenizer, text: str) -> str:
    """`text` with a | between tokens. Tokens that split a character are shown together, followed by their
    count in braces: "日{2}" is two tokens holding the three bytes of 日."""
    units, pending, count = [], b"", 0
    for i in tok.encode(text):
        pending, count = pending + tok.decode_bytes([i]), count + 1
        try:
            shown = pending.decode("utf-8")
        except UnicodeDecodeError:  # ends inside a character: wait for the rest of it
            continue
        units.append(shown if count == 1 else f"{shown}{{{count}}}")
        pending, count = b"", 0
    return "|".join(units)


def compression_report(tok: Tokenizer, sample: str, seconds: float | None, examples: int = 3) -> dict:
    """Tokens per byte of `sample` for `tok`, GPT-2's BPE and characters (fewer is better), and a few lines
    of it as tokens. seconds: how long training took (None: loaded, not trained)."""
    n_bytes = max(1, len(sample.encode("utf-8")))
    per_byte = {tok.name: len(tok.encode(sample)) / n_bytes}
    try:
        per_byte["gpt2"] = len(GPT2Tokenizer().encode(sample)) / n_bytes
    except NanoGPTError:  # GPT-2's files unavailable offline: compare with characters only
        pass
    per_byte["char"] = len(sample) / n_bytes
    lines = [line.strip()[:60] for line in sample.splitlines() if line.strip()]
    lines = [lines[len(lines) * i // examples] for i in range(examples)] if lines else []  # spread out
    return {
        "vocab_size": tok.vocab_size,
        "train_seconds": None if seconds is None else round(seconds, 3),
        "sample_bytes": n_bytes,
        "tokens_per_byte": {name: round(value, 4) for name, value in per_byte.items()},
        "examples": [show_tokens(tok, line) for line in lines],
    }


def format_report(report: dict) -> str:
    rates = ", ".join(f"{name} {value:.3f}" for name, value in report["tokens_per_byte"].items())
    seconds = report["train_seconds"]
    how = "loaded from --tokenizer_file" if seconds is None else f"trained in {seconds:.1f} s"
    lines = [
        f"bpe: {report['vocab_size']} tokens, {how}",
        f"tokens per byte on val ({report['sample_bytes']:,} bytes): {rates}",
    ]
    return "\n".join(lines + [f"  {example}" for example in report["examples"]])


# --- transformers: a tokenizer.json that AutoTokenizer reads, giving the ids tiktoken gives ---


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the alphabet of byte-level vocabularies)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: BPE of its bytes using only the merges before `rank`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise NanoGPTError(f"token {token!r} (rank {rank}) is not the merge of two earlier tokens")
    return parts[0], parts[1]


def hf_tokenizer(tok: Tokenizer):
    """A `transformers.PreTrainedTokenizerFast` equal to `tok` (a trained BPE or GPT-2's): the same ids;
    a chat model's tokenizer also brings its `chat_template`, which apply_chat_template renders to our ids."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    # a chat model's tokenizer (nanogpt.chat.template.ChatTokenizer): its base's vocabulary, its template
    template, tok = getattr(tok, "template", None), getattr(tok, "base", tok)
    tokens = tok.token_bytes()
    specials = dict(tok.special_tokens) if isinstance(tok, BPETokenizer) else {ENDOFTEXT: tok.eot}
    if not isinstance(tok, BPETokenizer):  # GPT-2's chat tokens: the padded vocabulary's first unused ids
        specials.update(GPT2_CHAT_TOKENS)
    pattern = tok.pattern if isinstance(tok, BPETokenizer) else PATTERNS["gpt2"]
    n_ranks = min(specials.values())  # the special tokens follow the ranks
    ranks = {token: i for i, token in enumerate(tokens[:n_ranks])}
    alphabet = byte_to_unicode()
    show = lambda token: "".join(alphabet[b] for b in token)
    merges = [tuple(map(show, _merge_of(t, i, ranks))) for i, t in enumerate(tokens[:n_ranks]) if len(t) > 1]
    model = models.BPE(vocab={show(t): i for t, i in ranks.items()}, merges=merges, ignore_merges=True)
    hf = HFTokenizer(model)
    # Oniguruma reads "{1,3}+" as "({1,3})+", not as a possessive interval; a plain interval splits the same
    split = pre_tokenizers.Split(Regex(pattern.replace("}+", "}")), behavior="isolated", invert=False)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)]
    )
    eot = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT} if ENDOFTEXT in specials else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=hf, **eot)
    if template is not None:  # saved as chat_template.jinja (older transformers: in tokenizer_config.json)
        from nanogpt.chat.template import jinja

        hf.chat_template = jinja(template)
    return hf


def write_hf_tokenizer(tok: Tokenizer, directory: str | Path) -> bool:
    """Write tokenizer.json (+ its config) for `transformers` into `directory`; False (nothing written) for
    a tokenizer that is not a byte-level BPE (characters, bytes)."""
    if tok.name not in ("bpe", "gpt2"):
        return False
    hf_tokenizer(tok).save_pretrained(str(directory))
    return True
