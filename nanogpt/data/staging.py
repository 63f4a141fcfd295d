"""Write a dataset folder whole or not at all: into a temporary folder beside it, swapped in once complete.

A failed, interrupted (Ctrl-C, kill) or full-disk prepare leaves the old dataset exactly as it was, and
file-system faults become one line that says where ("no space left on device while writing PATH"). The
temporary folder (.NAME.new-PID-XXXX) of a prepare killed with -9 is removed by the next prepare of NAME.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from nanogpt.data.meta import META_FILE
from nanogpt.errors import NanoGPTError
from nanogpt.files import remove_stale_folders, temporary_folder, writing

BPE_FILE = "bpe_tokenizer.json"  # a trained BPE, beside the bins (nanogpt/data/bpe.py: its format)
OWN_FILES = {META_FILE, BPE_FILE, "train.bin", "val.bin", "test.bin"}  # what a re-prepare replaces


def replace_folder(new: Path, out: Path) -> None:
    """Put the complete dataset `new` where `out` is. Files of your own in the old folder move to the new one."""
    if not out.exists():
        os.rename(new, out)
        return
    for entry in out.iterdir():
        if entry.name not in OWN_FILES:
            os.rename(entry, new / entry.name)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)  # from here to the next line (microseconds) there is no DATA_DIR/NAME
    os.rename(new, out)
    shutil.rmtree(old)


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporary folders that killed prepares of `out` left beside it (their pid is gone)."""
    return [path for kind in ("new", "old") for path in remove_stale_folders(out, kind)]


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write the new dataset into; on success it replaces `out`, on
    any error or interrupt it is deleted and `out` is untouched."""
    for path in (out.parent, out):
        if path.exists() and not path.is_dir():
            raise NanoGPTError(f"cannot write the dataset to {out}: {path} is a file, not a folder")
    with writing(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(out, "new")
    try:
        with writing(out):
            yield tmp
        with writing(out):
            replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_tokens(
    folder: Path, names: tuple[str, ...], items: Iterable[tuple[str, np.ndarray]], dtype
) -> dict:
    """Append each (split, ids) to folder/SPLIT.bin as `dtype`; the token count of each split."""
    counts = dict.fromkeys(names, 0)
    with contextlib.ExitStack() as stack:
        files = {split: stack.enter_context(open(folder / f"{split}.bin", "wb")) for split in names}
        for split, ids in items:
            files[split].write(np.ascontiguousarray(ids, dtype=dtype).data)
            counts[split] += len(ids)
    return counts
