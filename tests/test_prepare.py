"""`nanogpt prepare`: known token counts, exact file contents, no-op and atomic rewrites, sources, bad input."""

from __future__ import annotations

import os
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import process_running

from nanogpt import cli
from nanogpt.data import sources
from nanogpt.data.loader import load_split, read_meta
from nanogpt.data.prepare import DATASETS, prepare_dataset
from nanogpt.data.splits import split_bounds
from nanogpt.data.tokenizers import CharTokenizer, GPT2Tokenizer, tokenizer_from_meta
from nanogpt.errors import NanoGPTError


@pytest.fixture(autouse=True)
def offline_sources(monkeypatch, tmp_path):
    """Canonical sources from the shared folder only; a download would land in (and fail from) tmp."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    monkeypatch.setenv("NANOGPT_DATA_SOURCES", str(shared))
    monkeypatch.setenv("NANOGPT_CACHE", str(tmp_path / "cache"))


def _zip(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
    return path


def test_shakespeare_char_known_answer(tmp_path, sources_dir, shakespeare_text, monkeypatch):
    monkeypatch.setenv("NANOGPT_DATA_SOURCES", str(sources_dir))
    out = prepare_dataset("shakespeare_char", data_dir=tmp_path)
    meta = read_meta(out)
    assert out == tmp_path / "shakespeare_char"
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)
    assert meta["dtype"] == "uint16" and meta["eot"] is None
    assert meta["source_sha256"] == sources.TINY_SHAKESPEARE.sha256
    assert meta["split"]["rule"] == "first 90% train, last 10% val (by characters)"
    tok = tokenizer_from_meta(meta["tokenizer"])
    assert tok.decode(load_split(out, "train")) == shakespeare_text[:1_003_854]
    assert tok.decode(load_split(out, "val")) == shakespeare_text[1_003_854:]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_shakespeare_bpe_known_answer(tmp_path, sources_dir, shakespeare_text, monkeypatch):
    monkeypatch.setenv("NANOGPT_DATA_SOURCES", str(sources_dir))
    assert cli.main(["prepare", "shakespeare", "--data_dir", str(tmp_path)]) == 0
    meta = read_meta(tmp_path / "shakespeare")
    assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (301_966, 36_059, 50257)
    assert meta["tokenizer"] == {"name": "gpt2"} and meta["eot"] == 50256
    train = load_split(tmp_path / "shakespeare", "train")
    assert GPT2Tokenizer().decode(train) == shakespeare_text[:1_003_854]


def test_rerun_is_a_no_op_and_a_changed_source_is_prepared_again(tmp_path, capsys):
    source = tmp_path / "notes.txt"
    source.write_text("to be or not to be\n" * 50)
    out = prepare_dataset("notes", source=source, data_dir=tmp_path / "data", tokenizer="char")
    mtime = (out / "train.bin").stat().st_mtime_ns
    prepare_dataset("notes", source=source, data_dir=tmp_path / "data", tokenizer="char")
    assert "notes: up to date" in capsys.readouterr().out
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    source.write_text("that is the question\n" * 10)
    prepare_dataset("notes", source=source, data_dir=tmp_path / "data", tokenizer="char")
    meta = read_meta(out)
    assert meta["train_tokens"] + meta["val_tokens"] == 210
    assert meta["tokenizer"]["chars"] == "\n aehinoqstu"
    prepare_dataset("notes", source=source, data_dir=tmp_path / "data", tokenizer="byte")  # new tokenizer
    assert read_meta(out)["tokenizer"] == {"name": "byte"}


def _folder_hash(folder: Path) -> dict[str, str]:
    return {p.name: sources.file_sha256(p) for p in sorted(folder.iterdir())}


def test_interrupted_re_prepare_keeps_the_old_dataset(tmp_path, monkeypatch):
    source = tmp_path / "a.txt"
    source.write_text("abcdefghij" * 100)
    out = prepare_dataset("a", source=source, data_dir=tmp_path / "data", tokenizer="char")
    before = _folder_hash(out)
    source.write_text("klmnopqrst" * 100)
    calls = []

    def interrupted(self, text):
        calls.append(text)
        if len(calls) == 2:  # train written, val being encoded
            raise KeyboardInterrupt
        return original(self, text)

    original = CharTokenizer.encode_array
    monkeypatch.setattr(CharTokenizer, "encode_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("a", source=source, data_dir=tmp_path / "data", tokenizer="char")
    assert _folder_hash(out) == before  # the old dataset, whole
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["a"]  # no temporary folder left
    assert (
        tokenizer_from_meta(read_meta(out)["tokenizer"]).decode(load_split(out, "val")) == "abcdefghij" * 10
    )


def test_failed_re_prepare_via_the_cli_changes_nothing(tmp_path, capsys):
    """`prepare text8 --source A` then `--source B` with B invalid kept nothing of A."""
    good = _zip(tmp_path / "a.zip", "text8", b"the quick brown fox " * 100)
    bad = _zip(tmp_path / "b.zip", "text8", b"the quick brown fox " * 50 + "caf\xe9".encode("latin-1"))
    data = ["--data_dir", str(tmp_path / "data")]
    assert cli.main(["prepare", "text8", "--source", str(good), *data]) == 0
    before = _folder_hash(tmp_path / "data" / "text8")
    assert cli.main(["prepare", "text8", "--source", str(bad), *data]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "b.zip is not UTF-8 text: byte b'\\xe9' at offset 1003" in err, err
    assert _folder_hash(tmp_path / "data" / "text8") == before
    # a file of your own in the dataset folder survives a re-prepare
    (tmp_path / "data" / "text8" / "notes.md").write_text("mine")
    assert cli.main(["prepare", "text8", "--source", str(good), "--val_fraction", "0.1", *data]) == 0
    assert (tmp_path / "data" / "text8" / "notes.md").read_text() == "mine"


@pytest.fixture
def tiny_fs(tmp_path):
    """A 200 KiB tmpfs (mounting needs root), unmounted after the test."""
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)]).returncode
    ):
        pytest.skip(
            "mounting a small tmpfs needs root (and a system that allows mounts): disk-full not tested"
        )
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_and_read_only_keep_the_old_dataset(tmp_path, tiny_fs, capsys):
    """One clear line, exit 1, the old dataset unchanged."""
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be\n" * 1000)  # 19 KB: 38 KB of uint16 tokens fit
    big = tmp_path / "big.txt"
    big.write_text("that is the question\n" * 20_000)  # 420 KB: 840 KB of tokens do not
    prepare = ["prepare", "mine", "--tokenizer", "char", "--data_dir", str(tiny_fs)]
    assert cli.main([*prepare, "--source", str(small)]) == 0
    before = _folder_hash(tiny_fs / "mine")
    assert cli.main([*prepare, "--source", str(big)]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"nanogpt prepare: error: no space left on device while writing \S+\n", err), err
    assert _folder_hash(tiny_fs / "mine") == before
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["mine"]
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    assert cli.main([*prepare, "--source", str(tmp_path / "small.txt"), "--val_fraction", "0.2"]) == 1
    err = capsys.readouterr().err
    assert err == f"nanogpt prepare: error: cannot write to {tiny_fs}: read-only file system\n", err
    assert _folder_hash(tiny_fs / "mine") == before


def test_data_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "data").write_text("not a folder")
    source = tmp_path / "a.txt"
    source.write_text("hello world\n" * 10)
    argv = [
        "prepare",
        "a",
        "--source",
        str(source),
        "--tokenizer",
        "char",
        "--data_dir",
        str(tmp_path / "data"),
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"{tmp_path / 'data'} is a file, not a folder\n") and err.count("\n") == 1, err
    assert (tmp_path / "data").read_text() == "not a folder"


def test_enwik8_from_a_local_zip_splits_bytes_90_5_5(tmp_path):
    data = bytes(range(256)) * 7 + "é😀".encode() + b"\xff\xfe" * 3  # not valid UTF-8 as a whole
    out = prepare_dataset("enwik8", source=_zip(tmp_path / "enwik8.zip", "enwik8", data), data_dir=tmp_path)
    meta = read_meta(out)
    n = len(data)
    n_train, n_val = int(n * 0.9), int(n * 0.05)
    assert [meta["train_tokens"], meta["val_tokens"], meta["test_tokens"]] == [
        n_train,
        n_val,
        n - n_train - n_val,
    ]
    assert meta["vocab_size"] == 256 and meta["split"]["unit"] == "bytes"
    assert meta["split"]["rule"] == "first 90% train, next 5% val, last 5% test (by bytes)"
    assert meta["source_sha256"] == sources.file_sha256(tmp_path / "enwik8.zip")
    joined = np.concatenate([load_split(out, s) for s in ("train", "val", "test")])
    assert joined.tobytes() == np.frombuffer(data, np.uint8).astype(np.uint16).tobytes()


def test_split_bounds_canonical_sizes():
    assert split_bounds(100_000_000, ("train", "val", "test"), 0.05) == {
        "train": (0, 90_000_000),
        "val": (90_000_000, 95_000_000),
        "test": (95_000_000, 100_000_000),
    }
    assert split_bounds(1_115_394, ("train", "val"), 0.1) == {
        "train": (0, 1_003_854),
        "val": (1_003_854, 1_115_394),
    }
    with pytest.raises(NanoGPTError, match="the val split would be empty: 3 units with val_fraction 0.1"):
        split_bounds(3, ("train", "val", "test"), 0.1)


def test_text8_fixed_alphabet_and_unknown_character(tmp_path):
    text = "anarchism originated as a term of abuse " * 50
    out = prepare_dataset(
        "text8", source=_zip(tmp_path / "text8.zip", "text8", text.encode()), data_dir=tmp_path
    )
    meta = read_meta(out)
    assert meta["vocab_size"] == 27 and meta["tokenizer"]["chars"] == DATASETS["text8"].alphabet
    assert [meta[f"{s}_tokens"] for s in ("train", "val", "test")] == [1800, 100, 100]
    assert tokenizer_from_meta(meta["tokenizer"]).decode(load_split(out, "test")) == text[1900:]
    bad = _zip(tmp_path / "bad.zip", "text8", (text[:1234] + "Q" + text).encode())
    with pytest.raises(
        NanoGPTError, match=r"character 'Q' at position 1234 of .*bad.zip is not in the vocabulary"
    ):
        prepare_dataset("text8", source=bad, data_dir=tmp_path / "other")


def test_folder_split_by_documents_with_eot_between_them(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    texts = {
        "a.txt": "First file: Hello world\n" * 20,
        "b.txt": "Second file.\n",
        "sub/c.md": "Third, sub folder.\n",
    }
    texts |= {f"d{i}.txt": f"Document {i}, more text.\n" * (i + 1) for i in range(8)}
    for name, text in texts.items():
        (folder / name).write_text(text)
    (folder / ".hidden").write_text("never read")
    tok = GPT2Tokenizer()
    out = prepare_dataset(
        "docs", source=folder, data_dir=tmp_path / "data", tokenizer="gpt2", val_fraction=0.2
    )
    meta = read_meta(out)
    assert meta["split"]["unit"] == "documents" and sum(meta["split"]["documents"].values()) == len(texts)
    for split in ("train", "val"):
        documents = _documents_of(np.append(np.asarray(load_split(out, split)), tok.eot), tok.eot)
        assert len(documents) == meta["split"]["documents"][split]
        for doc in documents:  # each document whole, in one split, in name order, one eot between
            assert doc[:-1] in [tok.encode(text) for text in texts.values()]
    assert 0.1 < meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) < 0.4
    out = prepare_dataset("globbed", source=folder / "*.txt", data_dir=tmp_path / "data", tokenizer="char")
    assert read_meta(out)["source"] == [str(folder / n) for n in sorted(texts) if "/" not in n]
    assert read_meta(out)["eot"] is None


def test_canonical_source_is_checked_and_download_is_cached(tmp_path, monkeypatch):
    fake = tmp_path / "sources" / "tinyshakespeare" / "input.txt"
    fake.parent.mkdir(parents=True)
    fake.write_text("not Shakespeare\n")
    monkeypatch.setenv("NANOGPT_DATA_SOURCES", str(tmp_path / "sources"))
    with pytest.raises(NanoGPTError, match="is not the canonical input.txt"):
        prepare_dataset("shakespeare_char", data_dir=tmp_path)
    # a "download" from a file:// URL goes through the temporary name, the hash check and the cache
    monkeypatch.delenv("NANOGPT_DATA_SOURCES")
    raw = sources.RawSource("fake", "input.txt", fake.as_uri(), sources.file_sha256(fake), 16)
    cached = sources.fetch(raw)
    assert cached == tmp_path / "cache" / "fake" / "input.txt" and cached.read_text() == "not Shakespeare\n"
    fake.unlink()
    assert sources.fetch(raw) == cached  # served from the cache now
    with pytest.raises(NanoGPTError, match="could not download .*set NANOGPT_DATA_SOURCES"):
        sources.fetch(sources.RawSource("gone", "x.txt", fake.as_uri(), raw.sha256, 16))
    assert list((tmp_path / "cache" / "gone").iterdir()) == []  # no partial file left behind


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["nosuch"],
            "unknown dataset 'nosuch'; known: shakespeare_char, shakespeare, enwik8, text8, openwebtext",
        ),
        (
            ["mine", "--source", "{tmp}/missing.txt", "--tokenizer", "char"],
            "source '.*missing.txt' not found",
        ),
        (["mine", "--source", "{tmp}/empty.txt", "--tokenizer", "char"], "source '.*empty.txt' is empty"),
        (
            ["mine", "--source", "{tmp}/empty_dir", "--tokenizer", "char"],
            "source folder '.*empty_dir' holds no",
        ),
        (
            ["mine", "--source", "{tmp}/*.nothing", "--tokenizer", "char"],
            r"source '.*\*.nothing' matched no files",
        ),
        (
            ["mine", "--source", "{tmp}/latin1.txt", "--tokenizer", "char", "--val_fraction", "0"],
            "val_fraction must be above 0: it is the share of the text held out for val, got 0.0",
        ),
        (
            ["mine", "--source", "{tmp}/latin1.txt", "--tokenizer", "bpe"],
            "--tokenizer bpe needs --vocab_size N",
        ),
        (
            ["mine", "--source", "{tmp}/latin1.txt", "--tokenizer", "char", "--vocab_size", "9"],
            "options of --tokenizer bpe",
        ),
        (
            ["mine", "--source", "{tmp}/latin1.txt", "--tokenizer", "bpe", "--vocab_size", "9"],
            "vocab_size 9 is too small",
        ),
        (
            ["mine", "--source", "{tmp}/latin1.txt", "--tokenizer", "gpt2"],
            r"latin1.txt is not UTF-8 text: byte b'\\xe9' at offset 10 \(line 2, column 4\)",
        ),
        (["mine", "--source", "{tmp}/latin1.txt"], "your own dataset 'mine' needs --tokenizer"),
        (
            ["shakespeare_char", "--val_fraction", "1.5"],
            "val_fraction 1.5 leaves no text for train: val take",
        ),
        (["enwik8", "--val_fraction", "0.5"], "so it must be below 0.5"),
        (
            ["mine", "--source", "{tmp}/latin1.txt", "--tokenizer_file", "{tmp}/none.json"],
            "cannot read the BPE tokenizer .*none",
        ),
        (
            ["mine", "--source", "{tmp}/latin1.txt", "--tokenizer_file", "{tmp}/empty.txt"],
            "cannot read the BPE tokenizer .*empty",
        ),
        (["openwebtext", "--source", "{tmp}/latin1.txt", "--tokenizer", "char"], "it needs --tokenizer gpt2"),
    ],
)
def test_bad_input_is_a_clear_error_and_exit_1(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "latin1.txt").write_bytes("line 1\ncaf\xe9\n".encode("latin-1"))
    argv = ["prepare", *(a.format(tmp=tmp_path) for a in args), "--data_dir", str(tmp_path / "data")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("nanogpt prepare: error: ")
    assert re.search(message, err), err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert not (tmp_path / "data" / "mine" / "meta.json").exists()


def test_help_lists_every_dataset(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prepare", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in DATASETS), out


# --- document corpora through Hugging Face datasets (optional extra), on local fixtures only ---

DOCS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1) for i in range(40)]


@pytest.fixture
def hf_datasets(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return datasets


def _documents_of(tokens: np.ndarray, eot: int) -> list[list[int]]:
    cuts = np.flatnonzero(tokens == eot)
    assert cuts[-1] == len(tokens) - 1  # every document ends with eot
    return [doc.tolist() for doc in np.split(tokens, cuts[:-1] + 1)]


def test_openwebtext_from_local_text_files(tmp_path, hf_datasets):
    folder = tmp_path / "owt"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"{i:02d}.txt").write_text(doc)
    out = prepare_dataset("openwebtext", source=folder, data_dir=tmp_path / "data", val_fraction=0.1)
    meta = read_meta(out)
    tok = GPT2Tokenizer()
    expected = sorted(tok.encode(doc) + [tok.eot] for doc in DOCS)
    train, val = (_documents_of(np.asarray(load_split(out, s)), tok.eot) for s in ("train", "val"))
    assert (len(train), len(val)) == (36, 4)
    assert sorted(train + val) == expected  # every document once, whole, followed by eot
    assert meta["split"]["documents"] == {"train": 36, "val": 4}
    assert meta["train_tokens"] + meta["val_tokens"] == sum(map(len, expected))
    prepare_dataset("openwebtext", source=folder, data_dir=tmp_path / "data", val_fraction=0.1)
    assert read_meta(out) == meta


@pytest.mark.slow
def test_fineweb_from_parquet_tokenized_by_two_processes(tmp_path, hf_datasets):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanogpt.data import hf_corpus

    path = tmp_path / "sample.parquet"
    pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), path)
    docs, sha256 = hf_corpus.load_documents([path], DATASETS["fineweb_edu"].hub)
    assert sha256 == sources.file_sha256(path) and docs.column_names == ["text"]
    tokenized = hf_corpus.tokenize(docs, val_fraction=0.25, num_proc=2)
    tok = GPT2Tokenizer()
    got = [
        np.concatenate(list(hf_corpus.token_shards(tokenized[s], desc=s, max_shards=3)))
        for s in ("train", "val")
    ]
    documents = _documents_of(got[0], tok.eot) + _documents_of(got[1], tok.eot)
    assert sorted(documents) == sorted(tok.encode(doc) + [tok.eot] for doc in DOCS)
    assert len(_documents_of(got[1], tok.eot)) == 10


@pytest.mark.slow
def test_ctrl_c_during_a_parallel_re_prepare_keeps_the_old_dataset(tmp_path):
    """Ctrl-C reaches the whole process group (the workers too): exit 130, no traceback, the old dataset
    and nothing else in data_dir, no worker left behind."""
    import signal

    child, data, before = _start_parallel_prepare(tmp_path, start_new_session=True)  # a terminal's job
    os.killpg(child.pid, signal.SIGINT)  # 12 MB is 12+ pieces of <= 1 MiB: most of it is still ahead
    assert child.wait(timeout=60) == 130
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err and err.rstrip().endswith("interrupted"), err
    assert sorted(p.name for p in data.iterdir()) == ["mine"]
    assert _folder_hash(data / "mine") == before
    leftover = subprocess.run(["pgrep", "-g", str(child.pid)], capture_output=True, text=True).stdout
    assert not leftover.strip(), leftover


@pytest.mark.parametrize("block", [1, 3, 7, 1 << 22])
def test_non_utf8_byte_located_exactly_whatever_the_block_edges(tmp_path, monkeypatch, capsys, block):
    """The streamed decoder names the file, offset, line and column of the first bad
    byte, however the blocks cut the multi-byte characters before it; one line, exit 1, nothing written."""
    monkeypatch.setattr(sources, "BLOCK", block)
    good = "Ça déjà vu 😀\nПривет, мир\n日本語\n".encode()
    (tmp_path / "bad.txt").write_bytes(good + "ab\xff".encode("latin-1") + b"cd\n")
    argv = [
        "prepare",
        "bad",
        "--source",
        str(tmp_path / "bad.txt"),
        "--tokenizer",
        "bpe",
        "--vocab_size",
        "300",
    ]
    assert cli.main([*argv, "--data_dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    where = f"byte b'\\xff' at offset {len(good) + 2} (line 4, column 3): invalid start byte"
    assert err.count("\n") == 1 and where in err, err
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())


def _start_parallel_prepare(tmp_path: Path, **popen: Any) -> tuple[subprocess.Popen, Path, dict]:
    """A 2-process GPT-2 re-prepare of 12 MB over a small dataset `mine`, once its first encoded pieces
    land in the staging folder (the workers are running then); (process, data_dir, the old folder's hash).
    `popen`: more arguments for subprocess.Popen."""
    import sys
    import time

    from nanogpt.data.synthetic import write_corpus

    data = tmp_path / "data"
    small = tmp_path / "small.txt"
    small.write_text("old text\n" * 1000)
    prepare_dataset("mine", source=small, data_dir=data, tokenizer="gpt2")
    before = _folder_hash(data / "mine")
    write_corpus(tmp_path / "big", 12_000_000, seed=0, docs_per_file=100)
    argv = ["prepare", "mine", "--source", str(tmp_path / "big"), "--tokenizer", "gpt2", "--num_proc", "2"]
    with open(tmp_path / "stderr.txt", "w") as err:  # a file: a worker left alive holds no pipe open
        child = subprocess.Popen(
            [sys.executable, "-m", "nanogpt", *argv, "--data_dir", str(data)],
            stderr=err,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            **popen,
        )
    deadline = time.monotonic() + 60
    while not any(f.stat().st_size for f in data.glob(".mine.new-*/*.bin")):
        assert child.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.01)
    return child, data, before


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if process_running(pid)]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_no_worker_outlives_a_parallel_prepare_however_it_is_stopped(tmp_path, sig):
    """The signal goes to the parent alone (a service manager, `kill PID`): its pool workers end with it
    within 5 s, whether it exits cleanly (SIGINT: 130, SIGTERM: one line and 143) or is killed (-9). The old
    dataset is intact; the staging folder a kill -9 leaves is removed by the next prepare of that name."""
    import signal
    import time

    psutil = pytest.importorskip("psutil")  # in the dev extra

    if (os.cpu_count() or 1) < 2:
        pytest.skip("--num_proc 2 is capped to the one core here: no workers to watch")
    child, data, before = _start_parallel_prepare(tmp_path)
    workers = [p.pid for p in psutil.Process(child.pid).children(recursive=True)]
    assert len(workers) == 2, workers
    os.kill(child.pid, getattr(signal, sig))
    code = child.wait(timeout=60)
    err = (tmp_path / "stderr.txt").read_text()
    deadline = time.monotonic() + 5
    while _alive(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _alive(workers)
    for pid in left:  # so that a failing run leaves nothing behind either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent ({sig})"
    assert code == {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}[sig], err
    if sig != "SIGKILL":
        assert "Traceback" not in err and err.strip().splitlines()[-1] == {"SIGINT": "interrupted"}.get(
            sig, "terminated"
        ), err
        assert sorted(p.name for p in data.iterdir()) == ["mine"]
    else:
        assert [p.name for p in data.glob(".mine.new-*")], "kill -9 leaves its staging folder"
        prepare_dataset("mine", source=tmp_path / "small.txt", data_dir=data, tokenizer="gpt2")
        assert sorted(p.name for p in data.iterdir()) == ["mine"]
    assert _folder_hash(data / "mine") == before


def test_only_dead_prepares_staging_folders_are_removed(tmp_path):
    """A staging folder of a live process, and folders named otherwise, stay; a dead pid's goes."""
    data = tmp_path / "data"
    proc = subprocess.Popen(["true"])  # a pid that has exited
    proc.wait()
    dead = proc.pid
    keep = [f".mine.new-{os.getpid()}-abc", f".other.new-{dead}-abc", ".mine.new-xyz", "mine.new-1-a"]
    for name in [*keep, f".mine.new-{dead}-abc123", f".mine.old-{dead}"]:
        (data / name).mkdir(parents=True)
    (data / f".mine.new-{dead}-file").write_text("a file is never removed")
    (tmp_path / "a.txt").write_text("some text\n" * 50)
    prepare_dataset("mine", source=tmp_path / "a.txt", data_dir=data, tokenizer="char")
    assert sorted(p.name for p in data.iterdir()) == sorted([*keep, f".mine.new-{dead}-file", "mine"])


def test_unreadable_and_special_sources_are_one_line(tmp_path, capsys):
    """A glob reaching /proc/self/mem (reads fail with EIO), a FIFO, /dev/zero: one line each, exit 1,
    no traceback and nothing written (a FIFO is never opened: it would block)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "part00.txt").write_text("some text\n" * 100)
    (src / "mem.txt").symlink_to("/proc/self/mem")
    os.mkfifo(tmp_path / "fifo")
    data = tmp_path / "data"
    for source, message in [
        (f"{src}/*", "cannot read " + str(src / "mem.txt") + ": Input/output error"),
        (str(tmp_path / "fifo"), "is not a regular file"),
        ("/dev/zero", "is not a regular file"),
    ]:
        assert (
            cli.main(["prepare", "x", "--source", source, "--tokenizer", "char", "--data_dir", str(data)])
            == 1
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not data.exists() or not list(data.iterdir())
    from dataclasses import asdict

    from nanogpt import GPT, GPTConfig
    from nanogpt.checkpoint import save_checkpoint

    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    tok = {"name": "char", "chars": "abcdefghijklmnopqrstuvwxyz"}
    save_checkpoint(
        {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": tok}, tmp_path / "out"
    )
    run = [f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    for argv in (
        ["sample", *run, f"--start=FILE:{tmp_path / 'fifo'}"],
        ["eval", *run, f"--file={tmp_path / 'fifo'}"],
    ):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not a regular file" in err, err


def test_a_source_that_changes_while_it_is_read_writes_nothing(tmp_path, monkeypatch, capsys):
    """Another program truncating the source mid-prepare (size/mtime differ after the read): refused,
    the old dataset as it was."""
    from nanogpt.data import prepare as prepare_module

    source = tmp_path / "a.txt"
    source.write_text("first version\n" * 500)
    data = tmp_path / "data"
    prepare_dataset("a", source=source, data_dir=data, tokenizer="char")
    before = _folder_hash(data / "a")
    source.write_text("second version, longer\n" * 500)
    real = prepare_module.write_tokens

    def truncated_meanwhile(*args, **kwargs):
        counts = real(*args, **kwargs)
        with open(source, "r+") as f:
            f.truncate(100)
        return counts

    monkeypatch.setattr(prepare_module, "write_tokens", truncated_meanwhile)
    assert (
        cli.main(["prepare", "a", "--source", str(source), "--tokenizer", "char", "--data_dir", str(data)])
        == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "changed while it was read" in err, err
    assert _folder_hash(data / "a") == before
    assert sorted(p.name for p in data.iterdir()) == ["a"]


def test_num_proc_below_one_refused_and_above_the_cores_capped(tmp_path, capsys):
    source = tmp_path / "a.txt"
    source.write_text("some text\n" * 100)
    args = ["prepare", "a", "--source", str(source), "--tokenizer", "char", "--data_dir", str(tmp_path / "d")]
    for bad in ("-1", "0"):
        assert cli.main([*args, "--num_proc", bad]) == 1
        assert "--num_proc must be at least 1" in capsys.readouterr().err
    assert cli.main([*args, "--num_proc", str((os.cpu_count() or 1) + 62)]) == 0
    assert f"using {os.cpu_count()}" in capsys.readouterr().out


def test_a_split_of_one_token_is_refused_and_dataset_folders_have_normal_modes(tmp_path, capsys):
    source = tmp_path / "a.txt"
    source.write_text("abcdefghij")  # 10 characters: val gets 1
    args = ["prepare", "a", "--source", str(source), "--tokenizer", "char", "--data_dir", str(tmp_path / "d")]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "the val split holds 1 token(s)" in err and err.count("\n") == 1, err
    assert not (tmp_path / "d" / "a").exists()
    source.write_text("abcdefghij" * 10)
    assert cli.main(args) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "d" / "a").stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
    assert (tmp_path / "d" / "a" / "train.bin").stat().st_mode & 0o777 == 0o666 & ~mask
