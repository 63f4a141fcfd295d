"""Raw sources: find, download (sha256-checked, cached) and read the text that `nanogpt prepare` tokenizes.

A canonical source is looked up, in order, in the folder named by NANOGPT_DATA_SOURCES
(`$NANOGPT_DATA_SOURCES/tinyshakespeare/input.txt`, `.../enwik8/enwik8.zip`, `.../text8/text8.zip`), in
the download cache (NANOGPT_CACHE, default ~/.cache/nanogpt), and finally downloaded from its URL.
Canonical files are checked against their known sha256; a path the user names with `--source` is
trusted as given (its own sha256 is recorded in meta.json).
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import math
import os
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from nanogpt.errors import NanoGPTError


@dataclass(frozen=True)
class RawSource:
    """A canonical corpus file: where it lives on the web and what it must hash to."""

    folder: str  # its folder under NANOGPT_DATA_SOURCES and the cache
    filename: str
    url: str
    sha256: str
    size: int  # bytes, for the download progress bar


TINY_SHAKESPEARE = RawSource(
    "tinyshakespeare",
    "input.txt",
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    1_115_394,
)
ENWIK8 = RawSource(
    "enwik8",
    "enwik8.zip",
    "http://mattmahoney.net/dc/enwik8.zip",
    "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
    36_445_475,
)
TEXT8 = RawSource(
    "text8",
    "text8.zip",
    "http://mattmahoney.net/dc/text8.zip",
    "a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
    31_344_016,
)


def sources_dir() -> Path | None:
    value = os.environ.get("NANOGPT_DATA_SOURCES")
    return Path(value) if value else None


def cache_dir() -> Path:
    return Path(os.environ.get("NANOGPT_CACHE") or Path.home() / ".cache" / "nanogpt")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    except OSError as e:  # EIO from a failing disk, or a special file a glob reached (/proc/self/mem)
        raise NanoGPTError(f"cannot read {path}: {e.strerror or e}") from None
    return digest.hexdigest()


def stamps(files: list[Path]) -> list[tuple[int, int]]:
    """(size, mtime in ns) of each file: equal before and after a read when nothing wrote to them."""
    return [(stat.st_size, stat.st_mtime_ns) for stat in map(os.stat, files)]


def check_unchanged(files: list[Path], before: list[tuple[int, int]]) -> None:
    """Refuse the result of reading `files` if one changed meanwhile (another program writing it)."""
    for path, was in zip(files, before, strict=True):
        try:
            now = stamps([path])[0]
        except OSError:
            raise NanoGPTError(f"{path} was removed while it was read: nothing written") from None
        if was != now:
            raise NanoGPTError(
                f"{path} changed while it was read (size {was[0]:,} -> {now[0]:,} bytes): nothing written; "
                "prepare again once it no longer changes"
            )


def _check(path: Path, raw: RawSource) -> Path:
    actual = file_sha256(path)
    if actual != raw.sha256:
        raise NanoGPTError(
            f"{path} is not the canonical {raw.filename} (sha256 {actual}, expected {raw.sha256}); "
            f"delete it to download again, or pass it with --source to use it as it is"
        )
    return path


def download(url: str, dest: Path, size: int | None = None) -> None:
    """Fetch `url` to `dest` through a temporary name, so an interrupted download leaves nothing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or size or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise NanoGPTError(
            f"could not download {url} ({e}); pass --source PATH, or set NANOGPT_DATA_SOURCES to a "
            f"folder holding {dest.parent.name}/{dest.name}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch(raw: RawSource) -> Path:
    """The canonical file, sha256-checked: from NANOGPT_DATA_SOURCES, the cache, or a download."""
    local = sources_dir()
    if local is not None and (local / raw.folder / raw.filename).is_file():
        return _check(local / raw.folder / raw.filename, raw)
    cached = cache_dir() / raw.folder / raw.filename
    if not cached.is_file():
        download(raw.url, cached, raw.size)
    return _check(cached, raw)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def source_files(source: str | Path) -> list[Path]:
    """The files a --source names: a file, every file under a folder, or a glob; sorted, hidden ones skipped."""
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))]
    elif glob.has_magic(str(source)):
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
        if not files:
            raise NanoGPTError(f"source {str(source)!r} matched no files")
    elif path.exists():
        raise NanoGPTError(
            f"source {str(source)!r} is not a regular file (a FIFO, a device, ...): give a text file, a folder or a glob"
        )
    else:
        raise NanoGPTError(f"source {str(source)!r} not found")
    if not files:
        raise NanoGPTError(f"source folder {str(source)!r} holds no files")
    files = sorted(files)
    if all(p.stat().st_size == 0 for p in files):
        raise NanoGPTError(f"source {str(source)!r} is empty: {len(files)} file(s) of 0 bytes")
    return files


def sources_sha256(files: list[Path]) -> str:
    """A single file's sha256; for several, the sha256 of their sha256s, one a line, in order."""
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("\n".join(file_sha256(p) for p in files).encode()).hexdigest()


BLOCK = 1 << 22  # bytes read at once when streaming a source


def _zip_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    return [info for info in archive.infolist() if not info.is_dir()]


@contextlib.contextmanager
def _open_stream(path: Path) -> Iterator[IO[bytes]]:
    """A file's bytes as one stream; a .zip's members' bytes, in archive order (enwik8.zip holds one)."""
    if path.suffix.lower() != ".zip":
        with open(path, "rb") as f:
            yield f
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = _zip_members(archive)
            if len(members) != 1:
                raise NanoGPTError(f"{path} holds {len(members)} files: a zip source must hold exactly one")
            with archive.open(members[0]) as f:
                yield f
    except zipfile.BadZipFile:
        raise NanoGPTError(f"{path} is not a valid zip file") from None


def source_size(path: Path) -> int:
    """The bytes of text a source holds (a .zip: its member's size uncompressed)."""
    if path.suffix.lower() != ".zip":
        return path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(info.file_size for info in _zip_members(archive))
    except zipfile.BadZipFile:
        raise NanoGPTError(f"{path} is not a valid zip file") from None


def read_blocks(path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The bytes [start, end) of a source, BLOCK at a time: never the whole file in memory."""
    try:
        with _open_stream(path) as f:
            f.seek(start)  # a zip member seeks by decompressing up to `start`
            left = math.inf if end is None else end - start
            while left > 0 and (block := f.read(int(min(BLOCK, left)))):
                left -= len(block)
                yield block
    except OSError as e:
        raise NanoGPTError(f"cannot read {path}: {e.strerror or e}") from None


def read_text(path: Path, start: int = 0, end: int | None = None) -> Iterator[str]:
    """The text of bytes [start, end) (both at character boundaries), decoded block by block; a byte that
    is not UTF-8 raises a NanoGPTError saying where it is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = start
    buffered = lambda: consumed - len(decoder.getstate()[0])  # where the decoder's input starts
    try:
        for block in read_blocks(path, start, end):
            at = buffered()
            yield decoder.decode(block)
            consumed += len(block)
        at = buffered()
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, at + e.start, e.object[e.start : e.start + 1], e.reason) from None


def _not_utf8(path: Path, position: int, byte: bytes, reason: str) -> NanoGPTError:
    line, line_start, offset = 1, 0, 0
    for block in read_blocks(path, 0, position):
        line += block.count(b"\n")
        if (newline := block.rfind(b"\n")) >= 0:
            line_start = offset + newline + 1
        offset += len(block)
    return NanoGPTError(
        f"{path} is not UTF-8 text: byte {byte!r} at offset {position} (line {line}, column "
        f"{position - line_start + 1}): {reason}; use --tokenizer byte for binary data"
    )
