"""Any language: text in several scripts (Latin with diacritics, Cyrillic, Greek, Chinese, Japanese, emoji)
made here, through every tokenizer, a streamed parallel prepare, uint32 token files, eval's bits per
character and byte, sample's streamed output, and one end-to-end run through the CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogpt import GPT, GPTConfig
from nanogpt.cli import main as cli
from nanogpt.data import prepare, sources
from nanogpt.data.loader import BatchLoader, load_split, read_meta
from nanogpt.data.prepare import prepare_dataset
from nanogpt.data.synthetic import documents, write_corpus
from nanogpt.data.tokenizers import ByteTokenizer, CharTokenizer, GPT2Tokenizer, tokenizer_from_meta

SCRIPTS = "Ça déjà vu, naïve Zoë! Привет, мир. Γειά σου κόσμε; 你好，世界。こんにちは 😀👍🏽🇫🇷 👩‍💻\n"


@pytest.fixture(scope="module")
def multilingual() -> str:
    stream = documents(seed=3)
    return SCRIPTS + "".join(next(stream)[1] for _ in range(24))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, multilingual) -> Path:
    """12 documents, two per script, as files of a folder."""
    root = tmp_path_factory.mktemp("texts")
    stream = documents(seed=4)
    for i in range(12):
        (root / f"{i:02d}.txt").write_text(next(stream)[1], encoding="utf-8")
    return root


def test_every_tokenizer_round_trips_every_script(multilingual, tmp_path):
    out = prepare_dataset(
        "ml",
        source=_write(tmp_path / "ml.txt", multilingual),
        data_dir=tmp_path,
        tokenizer="bpe",
        vocab_size=600,
    )
    bpe = tokenizer_from_meta(read_meta(out)["tokenizer"])
    for tok in (CharTokenizer.from_text(multilingual), ByteTokenizer(), GPT2Tokenizer(), bpe):
        ids = tok.encode(multilingual)
        assert tok.decode(ids) == multilingual, tok.name
        assert tok.decode_bytes(ids) == multilingual.encode("utf-8"), tok.name
        assert tok.encode_array(multilingual).tolist() == ids, tok.name


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _small_pieces(monkeypatch) -> None:
    """Blocks of 64 bytes and pieces of 100 characters: every cut and block edge (inside characters too)
    is exercised on a small corpus. Worker processes are forked, so they see these values."""
    monkeypatch.setattr(sources, "BLOCK", 64)
    monkeypatch.setattr(prepare, "_PIECE", 100)


@pytest.mark.parametrize("tokenizer", ["bpe", "gpt2", "char", "byte"])
def test_folder_prepared_in_parallel_equals_documents_encoded_whole(folder, tmp_path, monkeypatch, tokenizer):
    _small_pieces(monkeypatch)
    options = {"vocab_size": 700} if tokenizer == "bpe" else {}
    one = prepare_dataset("ml", folder, tmp_path / "one", tokenizer, val_fraction=0.2, num_proc=1, **options)
    two = prepare_dataset("ml", folder, tmp_path / "two", tokenizer, val_fraction=0.2, num_proc=2, **options)
    meta = read_meta(two)
    timing = lambda m: {**m, "tokenizer_report": {**m.get("tokenizer_report", {}), "train_seconds": 0}}
    assert timing(read_meta(one)) == timing(meta)
    tok = tokenizer_from_meta(meta["tokenizer"])
    texts = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())}
    docs, seen = meta["split"]["documents"], []
    for split in ("train", "val"):
        tokens = np.asarray(load_split(two, split))
        assert np.array_equal(tokens, load_split(one, split))
        if tok.eot is None:  # characters and bytes: the documents back to back
            text = tok.decode_bytes(tokens).decode("utf-8")
            names = [name for name, t in texts.items() if t in text]
            assert "".join(texts[n] for n in names) == text
        else:  # one eot between documents, none around them
            parts = np.split(tokens, np.flatnonzero(tokens == tok.eot))
            decoded = [tok.decode(p[1:] if i else p) for i, p in enumerate(parts)]
            names = [name for d in decoded for name, t in texts.items() if t == d]
            assert len(names) == len(decoded)
        assert len(names) == docs[split] and names == sorted(names)  # whole documents, in name order
        seen += names
    assert sorted(seen) == sorted(texts)  # each document in exactly one split
    assert docs["val"] >= 1


def test_single_file_split_by_characters_in_any_script(multilingual, tmp_path, monkeypatch):
    _small_pieces(monkeypatch)
    source = _write(tmp_path / "one.txt", multilingual * 3)
    text = multilingual * 3
    out = prepare_dataset("one", source, tmp_path / "data", "gpt2", val_fraction=0.1, num_proc=2)
    meta = read_meta(out)
    n_train = int(len(text) * 0.9)
    assert meta["split"]["unit"] == "characters"
    tok = GPT2Tokenizer()
    assert load_split(out, "train").tolist() == tok.encode(text[:n_train])
    assert load_split(out, "val").tolist() == tok.encode(text[n_train:])
    assert meta["split"]["ranges"]["val"] == [len(text[:n_train].encode()), len(text.encode())]


@pytest.mark.slow
def test_vocabulary_over_65535_stores_uint32(tmp_path):
    """70,000 tokens: ids past 65,535 must survive the file and the loader."""
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(3000)]
    words = ["".join(rng.choices(chars, k=rng.randint(2, 4))) for _ in range(200_000)]
    source = _write(
        tmp_path / "zh.txt", "\n".join(" ".join(words[i : i + 20]) for i in range(0, len(words), 20))
    )
    out = prepare_dataset("zh", source, tmp_path / "data", "bpe", vocab_size=70_000, num_proc=2)
    meta = read_meta(out)
    assert (meta["vocab_size"], meta["dtype"]) == (70_000, "uint32")
    train = load_split(out, "train")
    assert train.dtype == np.uint32 and int(train.max()) > 65_535
    assert (out / "train.bin").stat().st_size == 4 * meta["train_tokens"]
    tok = tokenizer_from_meta(meta["tokenizer"])
    assert tok.decode(load_split(out, "val")) + "" in source.read_text(encoding="utf-8")
    x, y = BatchLoader(out, batch_size=64, block_size=32, seed=1).get_batch("train")
    assert int(x.max()) > 65_535 and torch.equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(train, dtype=np.int64), 33)
    assert any((windows[::1][:, :32] == row.numpy()).all(axis=1).any() for row in x[:2])


def test_eval_bits_per_character_and_byte_in_any_script(folder, tmp_path, capsys):
    """eval's bits per character / byte: the model's total nats over the text's own characters and bytes
    (the eot between documents is no text)."""
    out = prepare_dataset("ml", folder, tmp_path / "data", "bpe", vocab_size=600, val_fraction=0.2)
    meta = read_meta(out)
    tok = tokenizer_from_meta(meta["tokenizer"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    from nanogpt.evaluate import evaluate

    val = np.asarray(load_split(out, "val"))
    result = evaluate(model, tok, val, batch_size=4)
    text_ids = [i for i in val[1:].tolist() if i != tok.eot]  # the first token is never predicted
    chars, n_bytes = len(tok.decode(text_ids)), len(tok.decode_bytes(text_ids))
    bits = result["loss"] * result["tokens"] / math.log(2)
    assert result["bits_per_char"] == pytest.approx(bits / chars, rel=1e-9)
    assert result["bits_per_byte"] == pytest.approx(bits / n_bytes, rel=1e-9)
    assert n_bytes > 1.5 * chars  # multi-byte scripts: characters and bytes differ


def test_sample_stream_never_yields_half_a_character(tmp_path, monkeypatch):
    """A tiny random model over a BPE whose tokens split multi-byte characters: the pieces sample streams
    join to exactly the decode of all generated ids (a U+FFFD for half a character would not)."""
    import nanogpt.sample as sample

    text = "日本語のテキスト 😀🎉 Ελληνικά Привет " * 20
    out = prepare_dataset("split", _write(tmp_path / "s.txt", text), tmp_path / "data", "bpe", vocab_size=270)
    tok = tokenizer_from_meta(read_meta(out)["tokenizer"])
    assert any(not _valid_utf8(tok.decode_bytes([i])) for i in range(256, tok.vocab_size - 1))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    ids: list[int] = []
    original = sample.generate_stream

    def recorded(*args, **kwargs):
        for token in original(*args, **kwargs):
            ids.append(int(token))
            yield token

    monkeypatch.setattr(sample, "generate_stream", recorded)
    cfg = sample.SampleConfig(max_new_tokens=300, temperature=1.0, top_k=None, stop_at_eot=False)
    prompt = tok.encode("日本")
    pieces = list(sample.stream_text(model, tok, prompt, cfg, torch.Generator().manual_seed(0)))
    assert len(ids) == 300 and len(pieces) > 10
    assert "".join(pieces) == tok.decode(ids)
    assert sum(not _valid_utf8(tok.decode_bytes([i])) for i in ids) > 50  # many tokens did split characters


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.slow
def test_end_to_end_prepare_train_sample_eval_in_another_language(tmp_path, capsys):
    """docs/data.md's walk-through, small: a folder of text -> bpe 2048 -> train -> sample -> eval."""
    write_corpus(tmp_path / "texts", 3_000_000, seed=0)
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    assert (
        cli(
            [
                "prepare",
                "mine",
                "--source",
                str(tmp_path / "texts"),
                "--tokenizer",
                "bpe",
                "--vocab_size",
                "2048",
                "--data_dir",
                data,
            ]
        )
        == 0
    )
    common = [f"--out_dir={out}", "--device=cpu"]
    train = ["train", "shakespeare_char_cpu", "--dataset=mine", f"--data_dir={data}", "--max_iters=150"]
    assert cli([*train, "--eval_interval=50", "--eval_iters=10", "--compile=false", *common]) == 0
    capsys.readouterr()
    assert cli(["sample", "--num_samples=1", "--max_new_tokens=50", "--start=Привет", *common]) == 0
    assert "Привет" in capsys.readouterr().out
    assert cli(["eval", "--json", "--max_tokens=20000", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokenizer"] == "bpe" and result["bits_per_byte"] < 8 * 0.6  # it learnt something


def test_tokenizer_file_reuses_a_trained_bpe_and_a_model_refuses_other_data(folder, tmp_path, capsys):
    """A model's BPE travels in its checkpoint; new text prepared with --tokenizer_file gets the same ids,
    and eval refuses data prepared with another BPE."""
    from dataclasses import asdict

    from nanogpt.checkpoint import save_checkpoint

    data = tmp_path / "data"
    first = prepare_dataset("first", folder, data, "bpe", vocab_size=500, val_fraction=0.2)
    other = _write(tmp_path / "other.txt", SCRIPTS * 50)
    again = prepare_dataset("again", other, data, tokenizer_file=first / "bpe_tokenizer.json")
    prepare_dataset("retrained", other, data, "bpe", vocab_size=500)
    meta = read_meta(first)
    assert read_meta(again)["tokenizer"] == meta["tokenizer"]  # the very same tokenizer, ranks and all
    assert read_meta(again)["tokenizer_report"]["train_seconds"] is None
    tok = tokenizer_from_meta(meta["tokenizer"])
    assert load_split(again, "train").tolist() == tok.encode((SCRIPTS * 50)[: int(len(SCRIPTS) * 50 * 0.9)])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    ckpt = {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": meta["tokenizer"]}
    save_checkpoint(ckpt | {"config": {"dataset": "first", "data_dir": str(data)}}, tmp_path / "out")
    evaluate = ["eval", "--device=cpu", "--json", f"--out_dir={tmp_path / 'out'}", f"--data_dir={data}"]
    capsys.readouterr()
    assert cli([*evaluate, "--dataset=again"]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer"] == "bpe"
    assert cli([*evaluate, "--dataset=retrained"]) == 1
    assert "prepare the data with the model's tokenizer" in capsys.readouterr().err.lower()
    with pytest.raises(Exception, match="goes with --tokenizer bpe, without --vocab_size"):
        prepare_dataset("x", other, data, "bpe", vocab_size=300, tokenizer_file=first / "bpe_tokenizer.json")
