"""Files written whole or not at all: to a temporary name beside the target, then renamed over it, so a
crash, kill -9 or Ctrl-C at any moment leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from nanogpt.errors import NanoGPTError

_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")  # what atomic_open names its files: .NAME.PID.tmp


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", durable: bool = False) -> Iterator[IO]:
    """Open a temporary file for writing ("w" text in UTF-8, or "wb"); on a clean exit rename it to
    `path`, on an exception delete it. durable: fsync the file and its folder too, so the new file
    survives a power cut (checkpoints)."""
    path = Path(path)
    make_folder(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # beside it: the rename stays on one disk
    try:
        with writing(path):
            with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(
            OSError
        ):  # a read-only disk refuses even this: the first error is the one to tell
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # make the rename itself durable
        finally:
            os.close(folder)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def make_folder(folder: str | Path) -> Path:
    """mkdir -p, with a one-line error when it cannot be made (a file in the way, read-only, ...)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NanoGPTError(
            f"cannot make folder {folder}: a file is in the way (choose another path)"
        ) from None
    except OSError as e:
        raise write_error(e, folder) from None
    return folder


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Inside, a file-system fault while writing `path` (a file or a folder being filled) becomes one
    clear line (write_error); any other exception passes as it is."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        error = write_error(e, Path(path))
        if error is e:
            raise
        raise error from None


def write_error(e: BaseException, path: Path) -> BaseException:
    """A file-system fault while writing `path` as one clear line (NanoGPTError); anything else as it is.
    torch.save reports a full disk as a RuntimeError ("unexpected pos"): the free space tells."""
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or (isinstance(e, RuntimeError) and _disk_full(path)):
        return NanoGPTError(f"no space left on device while writing {path}")
    if code == errno.EDQUOT:
        return NanoGPTError(f"disk quota exceeded while writing {path}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return NanoGPTError(f"cannot write to {path}: {os.strerror(code).lower()}")
    if isinstance(e, OSError):
        return NanoGPTError(f"cannot write {path}: {e.strerror or e}")
    return e


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < (1 << 20)
    except OSError:
        return False


def umask() -> int:
    """This process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_folder(target: Path, kind: str) -> Path:
    """A new empty folder beside `target` to fill and rename over it: .NAME.KIND-PID-XXXXXXXX, with the
    mode mkdir gives (mkdtemp's is 0700), so the renamed folder is as readable as any other.
    remove_stale_folders finds it once its process is dead."""
    with writing(target.parent):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~umask())
    return tmp


def normal_modes(folder: Path) -> None:
    """Give the files in `folder` the mode open() gives (some writers make theirs 0600)."""
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask())


def remove_stale_folders(target: Path, kind: str) -> list[Path]:
    """Delete the temporary folders beside `target` (temporary_folder's, of this `kind`) whose process is
    no longer alive (a kill -9 leaves them behind); returns them. Nothing else is touched: only a folder
    named as this project names them, holding a pid that no process has."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{re.escape(kind)}-(\d+)(-[A-Za-z0-9_]+)?$")
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that processes no longer alive left in `folder` (a kill -9 during a
    save leaves a full-size one); returns them. A live process's temporary is left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an OS lock on folder/.lock while inside, so that two processes never write one folder (what:
    the kind of work, for the message). The kernel releases it at any exit, kill -9 included: a lock
    left by a dead process never blocks. Where the OS has no flock (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = make_folder(folder) / ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_error(e, lock) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise NanoGPTError(
                f"{folder} is in use by another process ({what}, pid {holder}): wait for it to finish, or use "
                "another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_utf8(path: str | Path, what: str) -> str:
    """The text of a UTF-8 file that the user named (`what` says which option), or a one-line error."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a FIFO, a device, ...)"
        raise NanoGPTError(f"{what} {str(path)!r} is {kind}: give a text file")
    if not path.is_file():
        raise NanoGPTError(f"{what} {str(path)!r} not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NanoGPTError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}): convert it to UTF-8"
        ) from None
