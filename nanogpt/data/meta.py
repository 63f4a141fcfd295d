"""meta.json: what a prepared dataset folder holds (its tokenizer, the token count of each split, the bins'
dtype, where the text came from and how it was split). `nanogpt prepare` writes it, everything that reads
the data reads it here, as nanogpt/checkpoint.py owns ckpt.pt.

A trained BPE's file beside it (meta["tokenizer"]["file"]) is read in and checked against its sha256, so
read_meta's meta["tokenizer"] is always a self-contained tokenizer_from_meta input (the very dict a
checkpoint stores).
"""

from __future__ import annotations

import json
from pathlib import Path

from nanogpt.data.sources import file_sha256
from nanogpt.errors import NanoGPTError
from nanogpt.files import write_text_atomic

META_FILE = "meta.json"


def read_meta(dataset_dir: str | Path) -> dict:
    """meta.json of a prepared dataset folder, its tokenizer whole."""
    path = Path(dataset_dir) / META_FILE
    if not path.is_file():
        raise NanoGPTError(
            f"no prepared data in {dataset_dir}: run `nanogpt prepare {Path(dataset_dir).name}`"
        )
    meta = _read_json(path)
    file = meta.get("tokenizer", {}).get("file")
    if file is not None:
        tokenizer = Path(dataset_dir) / file
        if not tokenizer.is_file() or file_sha256(tokenizer) != meta["tokenizer"].get("sha256"):
            raise NanoGPTError(
                f"{tokenizer} is missing or not the file {META_FILE} names: run `nanogpt prepare` again"
            )
        meta["tokenizer"] = _read_json(tokenizer)
    return meta


def write_meta(folder: Path, meta: dict) -> Path:
    """meta.json into `folder`, whole or not at all (a temporary file renamed into place)."""
    path = folder / META_FILE
    write_text_atomic(path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NanoGPTError(f"{path} is not valid JSON ({e}): run `nanogpt prepare` again") from None
