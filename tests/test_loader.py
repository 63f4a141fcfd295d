"""The loader: window contents and shift, seeded and resumable streams, ranks, shuffled epochs, the
sequential pass, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from nanogpt.data.loader import BatchLoader, load_split, read_meta, sequential_batches
from nanogpt.data.meta import write_meta
from nanogpt.data.prepare import prepare_dataset
from nanogpt.errors import NanoGPTError

B, T = 6, 16


@pytest.fixture(scope="module")
def ramp(tmp_path_factory) -> object:
    """A byte dataset whose tokens count 0, 1, ..., 255, 0, 1, ...: every window is a visible ramp."""
    root = tmp_path_factory.mktemp("ramp")
    (root / "ramp.bin").write_bytes(bytes(range(256)) * 40)
    return prepare_dataset("ramp", source=root / "ramp.bin", data_dir=root / "data", tokenizer="byte")


def _draws(loader: BatchLoader, splits: list[str]) -> list[torch.Tensor]:
    return [torch.cat(loader.get_batch(split)) for split in splits]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_batches_are_contiguous_windows_shifted_by_one(ramp):
    loader = BatchLoader(ramp, batch_size=B, block_size=T)
    assert loader.vocab_size == 256 and loader.meta == read_meta(ramp)
    train = torch.from_numpy(load_split(ramp, "train").astype(np.int64))
    for split in ("train", "val"):
        x, y = loader.get_batch(split)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous() and x.device.type == "cpu"
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y, (x + 1) % 256)  # each row is one contiguous stretch of the ramp
    x, y = loader.get_batch("train")
    windows = train.unfold(0, T + 1, 1)  # (N-T, T+1): every legal window
    for row in torch.cat([x, y[:, -1:]], dim=1):
        assert (windows == row).all(dim=1).any()


def test_same_seed_same_batches_other_seed_or_rank_other_batches(ramp):
    order = ["train", "val", "train", "train", "val"]
    first = _draws(BatchLoader(ramp, B, T, seed=7), order)
    assert _equal(first, _draws(BatchLoader(ramp, B, T, seed=7), order))
    assert not _equal(first, _draws(BatchLoader(ramp, B, T, seed=8), order))
    ranks = [_draws(BatchLoader(ramp, B, T, seed=7, rank=r, world_size=3), order) for r in range(3)]
    assert _equal(ranks[0], first)
    assert not _equal(ranks[0], ranks[1]) and not _equal(ranks[1], ranks[2])


def test_val_batches_do_not_shift_the_train_stream(ramp):
    a = _draws(BatchLoader(ramp, B, T), ["train", "train", "train"])
    b = BatchLoader(ramp, B, T)
    got = _draws(b, ["train"])
    _draws(b, ["val"] * 4)
    got += _draws(b, ["train", "train"])
    assert _equal(a, got)


def test_saved_state_resumes_the_very_same_batches(ramp):
    loader = BatchLoader(ramp, B, T, seed=3, rank=1, world_size=2)
    _draws(loader, ["train", "train", "val", "train"])
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    upcoming = _draws(loader, ["train", "val", "train"])
    resumed = BatchLoader(ramp, B, T, seed=999, rank=1, world_size=2)  # the saved seed wins
    resumed.load_state_dict(state)
    assert _equal(_draws(resumed, ["train", "val", "train"]), upcoming)
    # rank 0 restoring the state rank 1 saved continues rank 0's own stream, at the same position
    rank0 = BatchLoader(ramp, B, T, seed=3, rank=0, world_size=2)
    _draws(rank0, ["train", "train", "val", "train"])
    other = BatchLoader(ramp, B, T, rank=0, world_size=2)
    other.load_state_dict(state)
    assert _equal(_draws(other, ["train", "val"]), _draws(rank0, ["train", "val"]))


@pytest.fixture
def positions(tmp_path) -> object:
    """Token i of the train split is i: a window's first token is where it starts."""
    (tmp_path / "train.bin").write_bytes(np.arange(1000, dtype=np.uint16).tobytes())
    (tmp_path / "val.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    meta = dict(
        vocab_size=1000, dtype="uint16", train_tokens=1000, val_tokens=100, tokenizer={"name": "byte"}
    )
    write_meta(tmp_path, meta)
    return tmp_path


def _starts(loader: BatchLoader, batches: int) -> list[int]:
    return [s for _ in range(batches) for s in loader.get_batch("train")[0][:, 0].tolist()]


def test_shuffled_epochs_see_each_window_of_a_grid_once(positions):
    """984 valid starts, T = 16: 61 windows of a grid per epoch, 15 batches of 4 (one left out)."""
    loader = BatchLoader(positions, 4, 16, order="epochs")
    epochs = [_starts(loader, 15) for _ in range(3)]
    for starts in epochs:
        assert len(set(starts)) == 60 and all(0 <= s < 1000 - 16 for s in starts)
        assert len({s % 16 for s in starts}) == 1  # one grid offset per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # a new order and offset each epoch
    plain = BatchLoader(positions, 4, 16)
    assert len(set(_starts(plain, 15))) < 60  # random windows repeat and skip: what epochs avoid
    # evaluation batches stay random windows, the same whatever the training order
    assert torch.equal(loader.get_batch("val")[0], BatchLoader(positions, 4, 16).get_batch("val")[0])


def test_shuffled_epochs_deal_each_epoch_out_among_the_ranks_and_resume(positions):
    ranks = [BatchLoader(positions, 4, 16, seed=5, rank=r, world_size=2, order="epochs") for r in (0, 1)]
    first = [_starts(r, 7) for r in ranks]  # 61 // 8 * 2 = 14 batches per epoch: 7 each
    assert not set(first[0]) & set(first[1]) and len(set(first[0] + first[1])) == 56
    state = ranks[1].state_dict()
    upcoming = _starts(ranks[1], 10)  # into the next epoch
    resumed = BatchLoader(positions, 4, 16, rank=1, world_size=2, order="epochs")
    resumed.load_state_dict(state)
    assert _starts(resumed, 10) == upcoming


def test_shuffled_epochs_need_one_batch_of_windows(positions):
    with pytest.raises(NanoGPTError, match="fewer than one batch of 64 per process"):
        BatchLoader(positions, 64, 32, order="epochs").get_batch("train")
    with pytest.raises(NanoGPTError, match="'random' or 'epochs'"):
        BatchLoader(positions, 4, 16, order="sorted")


def test_a_split_of_exactly_block_size_plus_one_has_one_window(tmp_path):
    (tmp_path / "s.txt").write_text("abcdefghijklmnopqrst")  # 18 train, 2 val characters
    out = prepare_dataset("s", source=tmp_path / "s.txt", data_dir=tmp_path, tokenizer="char")
    x, y = BatchLoader(out, batch_size=4, block_size=17).get_batch("train")
    assert x.tolist() == [list(range(17))] * 4 and y.tolist() == [list(range(1, 18))] * 4
    with pytest.raises(
        NanoGPTError, match=r"the val split of .* has 2 tokens, fewer than block_size \+ 1 = 18"
    ):
        BatchLoader(out, batch_size=4, block_size=17).get_batch("val")


def test_missing_data_and_splits_are_clear_errors(tmp_path, ramp):
    with pytest.raises(NanoGPTError, match=r"no prepared data in .*nothing: run `nanogpt prepare nothing`"):
        BatchLoader(tmp_path / "nothing", B, T)
    with pytest.raises(NanoGPTError, match=r"has no 'test' split \(it has train, val\)"):
        load_split(ramp, "test")
    with pytest.raises(NanoGPTError, match="rank must be in"):
        BatchLoader(ramp, B, T, rank=2, world_size=2)


def test_truncated_bin_is_detected(tmp_path):
    (tmp_path / "t.txt").write_text("hello world, " * 20)
    out = prepare_dataset("t", source=tmp_path / "t.txt", data_dir=tmp_path, tokenizer="char")
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(NanoGPTError, match="not the size meta.json says"):
        BatchLoader(out, 2, 4).get_batch("train")


@pytest.mark.parametrize("n", [103, 101, 2])
def test_sequential_pass_targets_every_token_once(n):
    tokens = (np.arange(n) * 7 % 50).astype(np.uint16)
    batches = list(sequential_batches(tokens, block_size=10, batch_size=4))
    windows = -(-(n - 1) // 10)
    assert [x.shape[0] for x, _ in batches] == [4] * (windows // 4) + ([windows % 4] if windows % 4 else [])
    x = torch.cat([x for x, _ in batches]).flatten()
    y = torch.cat([y for _, y in batches]).flatten()
    assert x.dtype == y.dtype == torch.int64
    targets = y[y != -1]
    assert targets.tolist() == tokens[1:].tolist()  # each token after the first, once, in order
    assert x[: n - 1].tolist() == tokens[:-1].tolist()  # inputs line up with the targets
    assert (y[n - 1 :] == -1).all() and (x[n:] == 0).all()  # padding


def test_sequential_pass_needs_two_tokens():
    with pytest.raises(NanoGPTError, match="at least 2 tokens"):
        next(sequential_batches(np.zeros(1, np.uint16), 4, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu_batches(ramp):
    cpu = _draws(BatchLoader(ramp, B, T), ["train", "val"])
    cuda = _draws(BatchLoader(ramp, B, T, device="cuda"), ["train", "val"])
    assert all(c.device.type == "cuda" for c in cuda)
    assert _equal(cpu, [c.cpu() for c in cuda])
    x, y = next(sequential_batches(np.arange(40, dtype=np.uint16), 8, 2, device="cuda"))
    assert x.device.type == "cuda" and y[0].tolist() == list(range(1, 9))
