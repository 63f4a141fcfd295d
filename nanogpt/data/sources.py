"""Raw sources: find, download (sha256-checked, cached) and read the text that `nanogpt prepare` tokenizes.

A canonical source is looked up, in order, in the folder named by NANOGPT_DATA_SOURCES
(`$NANOGPT_DATA_SOURCES/tinyshakespeare/input.txt`, `.../enwik8/enwik8.zip`, `.../text8/text8.zip`), in
the download cache (NANOGPT_CACHE, default ~/.cache/nanogpt), and finally downloaded from its URL.
Canonical files are checked against their known sha256; a path the user names with `--source` is
trusted as given (its own sha256 is recorded in meta.json).
"""

from __future__ import annotations

import glob
import hashlib
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

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
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


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
    else:
        raise NanoGPTError(f"source {str(source)!r} not found")
    files = sorted(files)
    if not files or all(p.stat().st_size == 0 for p in files):
        raise NanoGPTError(f"source {str(source)!r} is empty")
    return files


def sources_sha256(files: list[Path]) -> str:
    """A single file's sha256; for several, the sha256 of their sha256s, one a line, in order."""
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("\n".join(file_sha256(p) for p in files).encode()).hexdigest()


def read_bytes(path: Path) -> bytes:
    """A file's bytes; for a .zip, its members' bytes in archive order (enwik8.zip holds one file)."""
    if path.suffix.lower() != ".zip":
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as archive:
            return b"".join(archive.read(info) for info in archive.infolist() if not info.is_dir())
    except zipfile.BadZipFile:
        raise NanoGPTError(f"{path} is not a valid zip file") from None


def decode_utf8(data: bytes, where: str | Path) -> str:
    """`data` as text, or a NanoGPTError that says where the first undecodable byte is."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise NanoGPTError(
            f"{where} is not UTF-8 text: byte {data[e.start : e.start + 1]!r} at offset {e.start} "
            f"(line {line}, column {column}): {e.reason}; use --tokenizer byte for binary data"
        ) from None
