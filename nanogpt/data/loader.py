"""Batches from prepared token files: random (x, y) windows for training, a sequential pass for evaluation.

Random windows follow nanoGPT: start i uniform in [0, len - block_size), x = data[i : i+T],
y = data[i+1 : i+1+T]. Shuffled epochs (order="epochs", training only) take every window of a grid
o + k T once per epoch instead, in a random order, with a random offset o per epoch: no text is seen
twice before all of it is seen once. Each batch's starts come from a torch.Generator seeded from
(seed, rank, split, batch number) (epochs: from (seed, split, epoch), the ranks taking turns), so
- a resumed run draws the very same batches: the state is just the batch count per split;
- each DDP rank draws its own windows, and a state saved by rank 0 restores every rank's stream;
- evaluating val never shifts the train stream.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nanogpt.data.meta import read_meta
from nanogpt.errors import NanoGPTError


def split_path(dataset_dir: Path, meta: dict, split: str) -> tuple[Path, int]:
    """The split's .bin and its token count, checked against meta.json."""
    if f"{split}_tokens" not in meta:
        known = [key.removesuffix("_tokens") for key in meta if key.endswith("_tokens")]
        raise NanoGPTError(f"{dataset_dir} has no {split!r} split (it has {', '.join(known)})")
    path, length = dataset_dir / f"{split}.bin", int(meta[f"{split}_tokens"])
    size = path.stat().st_size if path.is_file() else None
    if size != length * np.dtype(meta["dtype"]).itemsize:
        raise NanoGPTError(f"{path} is missing or not the size meta.json says: run `nanogpt prepare` again")
    return path, length


def load_split(dataset_dir: str | Path, split: str) -> np.memmap:
    """The token array of `split` ("train", "val" or "test"), memory-mapped read-only.

    Meant for a pass over the split (evaluation); training batches map the file afresh per batch instead.
    """
    dataset_dir = Path(dataset_dir)
    meta = read_meta(dataset_dir)
    path, _ = split_path(dataset_dir, meta, split)
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str, chunk: int = 1 << 26) -> None:
    """Every id of `tokens` must be one a model of vocab_size has (a damaged file, or text tokenized for
    another model, would crash it with an IndexError, or silently on a GPU): one pass, in chunks, so a
    memory-mapped split is never read into memory whole."""
    for start in range(0, len(tokens), chunk):
        largest = int(tokens[start : start + chunk].max())
        if largest >= vocab_size:
            raise NanoGPTError(
                f"token id {largest} in {where} is outside the model's vocabulary ({vocab_size} tokens): "
                "was it tokenized for another model, or is the file damaged? Prepare it again"
            )


def _map_tokens(path: str, dtype: str) -> np.ndarray:
    """A read-only view of a token file; the mapping goes away with the last reference to the array."""
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=dtype)


def _to_device(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(batch)
    if device.type == "cuda":  # pinned host memory lets the copy run asynchronously with compute
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class BatchLoader:
    """Random (x, y) windows of a prepared dataset, reproducible and resumable."""

    def __init__(
        self,
        dataset_dir: str | Path,
        batch_size: int,
        block_size: int,
        device: str | torch.device = "cpu",
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
        order: str = "random",
    ):
        if batch_size < 1 or block_size < 1:
            raise NanoGPTError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
        if not 0 <= rank < world_size:
            raise NanoGPTError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if order not in ("random", "epochs"):
            raise NanoGPTError(f"the batch order must be 'random' or 'epochs', got {order!r}")
        self.dataset_dir = Path(dataset_dir)
        self.meta = read_meta(self.dataset_dir)
        self.vocab_size: int = int(self.meta["vocab_size"])
        self.batch_size, self.block_size = batch_size, block_size
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.order = order
        # (epoch, its shuffled window starts) of the last epoch drawn from
        self._epoch: tuple[int, np.ndarray] | None = None
        self._batches: dict[str, int] = {}  # split -> batches drawn so far
        self._files: dict[str, tuple[str, int]] = {}  # split -> (its .bin, its token count), once checked
        self._generator = torch.Generator()
        self._offsets = np.arange(block_size + 1)  # (T+1,)

    def _seed(self, name: str) -> None:
        key = hashlib.blake2b(f"{self.seed}/{name}".encode(), digest_size=8).digest()
        self._generator.manual_seed(int.from_bytes(key, "little"))

    def _starts(self, split: str, high: int) -> np.ndarray:
        n = self._batches.get(split, 0)
        self._batches[split] = n + 1
        if self.order == "epochs" and split == "train":
            return self._epoch_starts(n, high)
        self._seed(f"{self.rank}/{split}/{n}")
        return torch.randint(high, (self.batch_size,), generator=self._generator).numpy()  # (B,)

    def _epoch_starts(self, n: int, high: int) -> np.ndarray:
        """This rank's batch n of the shuffled epochs: global batch n * world_size + rank. An epoch is
        the K = high // T windows at o, o + T, ... (o < T, so all start below high) in a random order;
        its batches are the first K // (B * world_size) * world_size slices of B (the rest is left out)."""
        T, B = self.block_size, self.batch_size
        K = high // T
        per_epoch = K // (B * self.world_size) * self.world_size
        if per_epoch == 0:
            raise NanoGPTError(
                f"the train split holds {K} windows of block_size {T}, fewer than one batch of {B} per "
                f"process ({self.world_size}): use batch_order='random' or a smaller batch"
            )
        epoch, j = divmod(n * self.world_size + self.rank, per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._seed(f"train/epoch/{epoch}")
            offset = int(torch.randint(T, (1,), generator=self._generator))
            order = torch.randperm(K, generator=self._generator).numpy()
            self._epoch = (epoch, offset + T * order)
        return self._epoch[1][j * B : (j + 1) * B]  # (B,)

    def _file(self, split: str) -> tuple[str, int]:
        if split not in self._files:
            path, length = split_path(self.dataset_dir, self.meta, split)
            if length < self.block_size + 1:
                raise NanoGPTError(
                    f"the {split} split of {self.dataset_dir} has {length} tokens, fewer than "
                    f"block_size + 1 = {self.block_size + 1}: use a smaller block_size or more data"
                )
            self._files[split] = (str(path), length)
        return self._files[split]

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (B, T) on the device, y = x shifted left by one token."""
        path, length = self._file(split)
        starts = self._starts(split, length - self.block_size)
        # A fresh map per batch (as nanoGPT does): the pages a long-lived mapping touches stay in the
        # process's RSS, up to the whole file (3000 batches of 64 x 1024 from a 200 MB bin: +190 MB with one
        # np.memmap, +11 MB this way). mmap + frombuffer costs ~20 us; np.memmap's Python layer ~5x that.
        data = _map_tokens(path, self.meta["dtype"])
        windows = data[starts[:, None] + self._offsets].astype(np.int64)  # (B, T+1), one vectorised gather
        del data  # unmaps now: `windows` is a copy
        x = _to_device(np.ascontiguousarray(windows[:, :-1]), self.device)
        y = _to_device(np.ascontiguousarray(windows[:, 1:]), self.device)
        return x, y

    def state_dict(self) -> dict:
        """The position in every split's stream: ints and strings only (torch.load(weights_only=True) safe)."""
        return {"seed": self.seed, "batches": dict(self._batches)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved streams: the next batches are those the saved loader would have drawn next."""
        self.seed = int(state["seed"])
        self._batches = {str(split): int(n) for split, n in state["batches"].items()}


def sequential_batches(
    tokens: np.ndarray, block_size: int, batch_size: int, device: str | torch.device = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every token after the first as a target exactly once: windows at stride block_size, batch_size at
    a time (the last batch may have fewer rows). The last window's missing positions hold x = 0 and
    y = -1, which the loss ignores."""
    n = len(tokens)
    if n < 2:
        raise NanoGPTError(f"an evaluation pass needs at least 2 tokens, got {n}")
    device = torch.device(device)
    offsets = np.arange(block_size + 1)
    starts = np.arange(0, n - 1, block_size)
    for i in range(0, len(starts), batch_size):
        index = starts[i : i + batch_size, None] + offsets  # (b, T+1)
        inside = index < n
        windows = np.where(inside, np.asarray(tokens[np.minimum(index, n - 1)], dtype=np.int64), 0)
        x = np.ascontiguousarray(windows[:, :-1])
        y = np.where(inside[:, 1:], windows[:, 1:], -1)
        yield _to_device(x, device), _to_device(y, device)
