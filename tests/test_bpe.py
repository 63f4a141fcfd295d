"""A BPE trained on your text: rustbpe's ids equal tiktoken's, the saved file round-trips, transformers'
AutoTokenizer gives the same ids, the split patterns, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nanogpt.data.bpe import compression_report, hf_tokenizer, load_bpe, save_bpe, show_tokens, train_bpe
from nanogpt.data.synthetic import documents
from nanogpt.data.tokenizers import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    PATTERNS,
    BPETokenizer,
    GPT2Tokenizer,
    cut_stream,
    tokenizer_from_meta,
)
from nanogpt.errors import NanoGPTError

SPECIALS = {ENDOFTEXT: 1021, IM_START: 1022, IM_END: 1023}  # a trained BPE reserves ChatML's two tokens

TRICKY = (
    "a  \n\n  b\n\nc   d\t\ne\n \n'f 's  12 34!!  \r\nx y\n\n\nz   \u00a0w\u3000v  1234567 HELLO'LL don't"
)


@pytest.fixture(scope="module")
def corpus(shakespeare_text) -> str:
    stream = documents(seed=1)
    return shakespeare_text[:100_000] + "".join(next(stream)[1] for _ in range(60)) + TRICKY


@pytest.fixture(scope="module")
def bpe(corpus) -> BPETokenizer:
    return train_bpe([corpus], 1024)


def test_tiktoken_encoding_equals_rustbpe_own(corpus, bpe):
    """The reference: rustbpe, trained the same way, encodes with its own merges; tiktoken must agree."""
    import rustbpe

    reference = rustbpe.Tokenizer()
    reference.train_from_iterator(iter([corpus]), 1021, pattern=PATTERNS["gpt4"])  # + 3 special
    ranks = sorted(reference.get_mergeable_ranks(), key=lambda item: item[1])
    assert [bytes(token) for token, _ in ranks] == bpe.ranks  # training is deterministic
    for text in (corpus[:50_000], corpus[-30_000:], TRICKY):
        assert bpe.encode(text) == reference.encode(text)


def test_vocabulary_eot_and_exact_round_trip(corpus, bpe):
    assert (bpe.vocab_size, bpe.eot, bpe.special_tokens) == (1024, 1021, SPECIALS)
    assert len(bpe.ranks) == 1021 and all(bytes([b]) in bpe.ranks for b in range(256))
    ids = bpe.encode(corpus)
    assert bpe.decode(ids) == corpus and bpe.decode_bytes(ids) == corpus.encode()
    assert len(ids) < len(corpus.encode()) / 2  # it learnt something
    assert bpe.encode(ENDOFTEXT) != [bpe.eot]  # special tokens in text are text
    assert bpe.decode([bpe.eot]) == ENDOFTEXT


def test_saved_file_is_versioned_json_and_round_trips(tmp_path, bpe, corpus):
    save_bpe(bpe, tmp_path / "bpe.json")
    raw = json.loads((tmp_path / "bpe.json").read_text(encoding="utf-8"))
    assert raw == bpe.to_meta()
    assert (raw["name"], raw["format"], raw["version"]) == ("bpe", "nanogpt-bpe", 1)
    assert raw["pattern"] == PATTERNS["gpt4"] and raw["special_tokens"] == SPECIALS
    again = load_bpe(tmp_path / "bpe.json")
    assert again.to_meta() == bpe.to_meta() and again.encode(corpus) == bpe.encode(corpus)
    assert tokenizer_from_meta(json.loads(json.dumps(bpe.to_meta()))).encode(TRICKY) == bpe.encode(TRICKY)
    with pytest.raises(NanoGPTError, match="unsupported BPE tokenizer format 'nanogpt-bpe' version 2"):
        tokenizer_from_meta({**raw, "version": 2})
    with pytest.raises(NanoGPTError, match="names a file .* read the dataset's meta.json"):
        tokenizer_from_meta({"name": "bpe", "file": "bpe_tokenizer.json"})
    (tmp_path / "other.json").write_text('{"name": "char"}')
    with pytest.raises(NanoGPTError, match="is not a nanogpt BPE tokenizer file"):
        load_bpe(tmp_path / "other.json")


def test_patterns_gpt4_keeps_digits_in_threes_gpt2_does_not(corpus):
    text = corpus + " 1234567890 98765432" * 200
    gpt4, gpt2 = train_bpe([text], 600, "gpt4"), train_bpe([text], 600, "gpt2")
    assert gpt2.pattern == PATTERNS["gpt2"] and gpt4.pattern == PATTERNS["gpt4"]
    longest_number = lambda tok: max(len(t) for t in tok.ranks if t.strip().isdigit())
    assert longest_number(gpt4) <= 3 < longest_number(gpt2)
    for tok in (gpt4, gpt2):
        assert tok.decode(tok.encode(TRICKY)) == TRICKY


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_pieces_cut_in_stream_encode_like_the_whole(bpe, corpus, size):
    """prepare cuts the corpus in pieces where neither pattern joins characters: ids must not change."""
    text = corpus[-40_000:] + TRICKY
    chunks = [text[i : i + 333] for i in range(0, len(text), 333)]
    pieces = list(cut_stream(chunks, size))
    assert "".join(pieces) == text and len(pieces) > 1
    assert sum((bpe.encode(p) for p in pieces), []) == bpe.encode(text)
    gpt2 = GPT2Tokenizer()
    assert sum((gpt2.encode(p) for p in pieces), []) == gpt2.encode(text)


def test_too_small_or_bad_pattern_or_bad_ranks():
    with pytest.raises(NanoGPTError, match="vocab_size 200 is too small"):
        train_bpe(["hello"], 200)
    with pytest.raises(NanoGPTError, match="unknown BPE pattern 'gpt3'"):
        train_bpe(["hello"], 300, "gpt3")
    with pytest.raises(NanoGPTError, match="all 256 single bytes"):
        BPETokenizer([bytes([b]) for b in range(255)], PATTERNS["gpt4"], {})
    with pytest.raises(NanoGPTError, match="special token ids must follow the 256 ranks"):
        BPETokenizer([bytes([b]) for b in range(256)], PATTERNS["gpt4"], {ENDOFTEXT: 300})


def test_report_and_examples(bpe, corpus):
    report = compression_report(bpe, corpus[-20_000:], seconds=0.5)
    rates = report["tokens_per_byte"]
    assert set(rates) == {"bpe", "gpt2", "char"} and rates["bpe"] < rates["char"]
    assert len(report["examples"]) == 3 and report["vocab_size"] == 1024
    tiny = train_bpe(["abc abc"], 262)  # too few merges for 日: its bytes stay apart
    assert show_tokens(tiny, "日 abc") == "日{3}| abc"


@pytest.mark.parametrize("which", ["bpe", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_transformers_tokenizer_gives_the_same_ids(tmp_path, bpe, corpus, which):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    tok = bpe if which == "bpe" else GPT2Tokenizer()
    hf_tokenizer(tok).save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in (corpus[:20_000], corpus[-20_000:], TRICKY, "日本語 😀 naïve ΑΒΓ"):
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text)
        assert loaded.decode(tok.encode(text)) == text
    assert loaded.eos_token == ENDOFTEXT and loaded.eos_token_id == tok.eot
    ids = np.asarray(loaded.encode("x" + ENDOFTEXT + "y", add_special_tokens=False))
    assert tok.eot in ids  # transformers reads the marker as the special token (tiktoken's encode would not)


def test_hf_export_writes_the_tokenizer_of_a_bpe_model(tmp_path, bpe):
    transformers = pytest.importorskip("transformers")
    from nanogpt import GPT, GPTConfig
    from nanogpt.hf import export

    model = GPT(GPTConfig(vocab_size=bpe.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    folder = export(model, tmp_path / "hf", tokenizer=bpe)
    loaded = transformers.AutoTokenizer.from_pretrained(str(folder))
    text = TRICKY + " Привет 日本"
    assert loaded.encode(text, add_special_tokens=False) == bpe.encode(text)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(folder))
    assert hf_model.config.eos_token_id == bpe.eot == loaded.eos_token_id
    export(model, tmp_path / "chars", tokenizer=tokenizer_from_meta({"name": "char", "chars": "ab"}))
    chars = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "chars"))  # characters have one too
    assert chars.encode("abba") == [0, 1, 1, 0] and chars.decode([1, 0]) == "ba"
