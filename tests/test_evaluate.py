"""`nanogpt eval`: the per-token mean over a whole split (checked against a direct computation), the
derived figures (perplexity, bits per character / byte), text files, JSON, and mismatched data."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from nanogpt import GPT, GPTConfig
from nanogpt.checkpoint import save_checkpoint
from nanogpt.cli import main as cli
from nanogpt.data.loader import load_split
from nanogpt.data.prepare import prepare_dataset
from nanogpt.data.tokenizers import ByteTokenizer, CharTokenizer, GPT2Tokenizer, tokenizer_from_meta
from nanogpt.errors import NanoGPTError
from nanogpt.evaluate import evaluate, text_size

TINY = dict(block_size=32, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def char_ckpt(data_dir, tmp_path_factory):
    """A randomly initialised char model whose checkpoint names shakespeare_char as its dataset."""
    meta = json.loads((data_dir / "shakespeare_char" / "meta.json").read_text())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], **TINY))
    out_dir = tmp_path_factory.mktemp("char_model")
    config = {"dataset": "shakespeare_char", "data_dir": str(data_dir)}
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": meta["tokenizer"]}
    save_checkpoint(ckpt | {"config": config}, out_dir)
    return out_dir, model, tokenizer_from_meta(meta["tokenizer"])


def eval_json(capsys, *args: str) -> dict:
    assert cli(["eval", "--device=cpu", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def reference_loss(model: GPT, tokens: np.ndarray, block_size: int) -> float:
    """Mean next-token loss over every token after the first, one window at a time."""
    t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(t) - 1, block_size):
            x = t[start : start + block_size][None]
            y = t[start + 1 : start + 1 + block_size][None]
            logits, _ = model(x[:, : y.size(1)], y)
            total += F.cross_entropy(logits[0], y[0], reduction="sum").item()
            count += y.size(1)
    return total / count


def test_whole_split_loss_and_derived_figures(char_ckpt, data_dir, capsys):
    out_dir, model, _ = char_ckpt
    # the checkpoint's own dataset and the val split by default; batch 5 leaves a short last batch and
    # 111,540 tokens a short last window: a mean of batch means would differ from the per-token mean
    r = eval_json(capsys, f"--out_dir={out_dir}", "--batch_size=5")
    val = load_split(data_dir / "shakespeare_char", "val")
    assert r["tokens"] == len(val) - 1
    assert r["loss"] == pytest.approx(reference_loss(model, val, 32), rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
    assert r["bits_per_char"] == pytest.approx(r["loss"] / math.log(2), rel=1e-12)
    assert r["bits_per_byte"] == pytest.approx(r["bits_per_char"], rel=1e-12)  # Shakespeare is ASCII
    assert r["loss"] == pytest.approx(math.log(65), rel=0.02)  # random init: close to uniform


def test_table_output_and_other_split(char_ckpt, data_dir, capsys):
    out_dir, _, _ = char_ckpt
    args = [f"--out_dir={out_dir}", f"--data_dir={data_dir}", "--dataset=shakespeare_char", "--split=train"]
    assert cli(["eval", "--device=cpu", "--max_tokens=3000", *args]) == 0
    table = capsys.readouterr().out
    assert "2,999 predicted tokens" in table and "train" in table
    assert "bits/char" in table and "perplexity" in table


def test_text_file(char_ckpt, tmp_path, capsys):
    out_dir, model, tok = char_ckpt
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    r = eval_json(capsys, f"--out_dir={out_dir}", f"--file={tmp_path / 't.txt'}")
    assert r["tokens"] == len(text) - 1 and r["data"] == str(tmp_path / "t.txt")
    tokens = np.array(tok.encode(text))
    assert r["loss"] == pytest.approx(reference_loss(model, tokens, 32), rel=1e-5)


def test_unknown_character_in_file(char_ckpt, tmp_path, capsys):
    out_dir, _, _ = char_ckpt
    (tmp_path / "t.txt").write_text("hello ☃", encoding="utf-8")
    assert cli(["eval", "--device=cpu", f"--out_dir={out_dir}", f"--file={tmp_path / 't.txt'}"]) == 1
    assert "'☃' at position 6" in capsys.readouterr().err


def test_dataset_of_another_tokenizer_is_refused(char_ckpt, data_dir, tmp_path, capsys):
    out_dir, _, _ = char_ckpt
    (tmp_path / "corpus.txt").write_text("some text to tokenize as bytes\n" * 50, encoding="utf-8")
    prepare_dataset("bytes_corpus", source=tmp_path / "corpus.txt", data_dir=data_dir, tokenizer="byte")
    args = [f"--out_dir={out_dir}", f"--data_dir={data_dir}", "--dataset=bytes_corpus"]
    assert cli(["eval", "--device=cpu", *args]) == 1
    assert "tokenized with byte, 256 tokens, the model with char, 65 tokens" in capsys.readouterr().err


def test_bits_per_byte_and_per_char_differ_for_multibyte_text():
    """Byte tokens: bits per byte is the loss / ln 2; bits per character counts each é once."""
    tok = ByteTokenizer()
    text = "a café, é è ü, naïve résumé " * 20
    tokens = tok.encode_array(text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, **TINY)).eval()
    r = evaluate(model, tok, tokens, batch_size=4)
    assert r["tokens"] == len(tokens) - 1
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2), rel=1e-9)
    # the first character ("a") is never predicted
    assert r["bits_per_char"] == pytest.approx(
        r["bits_per_byte"] * (len(tokens) - 1) / (len(text) - 1), rel=1e-9
    )


@pytest.mark.parametrize("tokenizer", ["byte", "char", "gpt2"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_text_size_is_exact_whatever_the_chunk_edges(tokenizer, chunk, monkeypatch):
    """Characters and bytes are counted in chunks of tokens; a chunk edge inside a multi-byte character
    (a byte token, or a BPE token holding part of one) must not change the counts."""
    text = "naïve café — 日本語 ünïcödé 🙂 text, " * 5
    makers = {"byte": ByteTokenizer, "char": lambda: CharTokenizer.from_text(text), "gpt2": GPT2Tokenizer}
    tok = makers[tokenizer]()
    tokens = tok.encode_array(text)
    monkeypatch.setattr("nanogpt.evaluate._DECODE_CHUNK", chunk)
    assert text_size(tokens, tok) == (len(text), len(text.encode("utf-8")))


def test_ids_outside_the_models_vocabulary_are_named():
    """A text tokenized for a wider vocabulary is refused before any forward pass (was an IndexError)."""
    model = GPT(GPTConfig(block_size=8, vocab_size=65, n_layer=1, n_head=1, n_embd=8)).eval()
    tokens = np.array([1, 2, 70, 3], dtype=np.uint16)
    with pytest.raises(
        NanoGPTError, match="token id 70 in the text to evaluate is outside the model's vocabulary"
    ):
        evaluate(model, ByteTokenizer(), tokens)


def test_data_dir_given_is_the_one_evaluated(char_ckpt, data_dir, tmp_path, capsys):
    """--data_dir names where the checkpoint's own dataset is read from (it evaluated the data_dir
    saved in the checkpoint whatever was given); a data_dir without it is refused, naming the folder."""
    out_dir, model, tok = char_ckpt
    other = tmp_path / "other" / "shakespeare_char"
    other.mkdir(parents=True)
    text = "To be, or not to be, that is the question:\n" * 20
    meta = json.loads((data_dir / "shakespeare_char" / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps(meta | {"train_tokens": len(text), "val_tokens": len(text)}))
    for split in ("train", "val"):
        tok.encode_array(text).tofile(other / f"{split}.bin")
    r = eval_json(capsys, f"--out_dir={out_dir}", f"--data_dir={other.parent}")
    assert r["data"] == f"{other} val" and r["tokens"] == len(text) - 1
    assert r["loss"] == pytest.approx(reference_loss(model, tok.encode_array(text), 32), rel=1e-5)
    assert cli(["eval", "--device=cpu", f"--out_dir={out_dir}", f"--data_dir={tmp_path / 'empty'}"]) == 1
    assert str(tmp_path / "empty" / "shakespeare_char") in capsys.readouterr().err
