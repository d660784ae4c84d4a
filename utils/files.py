"""Files: atomic writes, and content hashes.

Atomic writes: readers (and a process killed mid-write) see the old file or the whole new one.

The bytes go to a temporary file in the same folder, are flushed and fsynced, the temporary is renamed over the
target (``os.replace``) and the folder is fsynced, so the rename itself survives a crash. Every file a run, an
export or an index produces is written this way (:func:`atomic_write`, :func:`atomic_write_text`); a folder
that must appear whole (a release) is built in a hidden sibling and renamed into place
(:func:`atomic_directory`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def fsync_directory(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (best effort: some file systems refuse to fsync a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def temporary_name(path: Path, unique: bool = False) -> Path:
    """Where :func:`atomic_write` writes ``path`` before renaming it (same folder: the rename stays atomic).
    ``unique``: a name of this process's own, for files that several processes may write at once."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp") if unique else path.with_name(path.name + ".tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], unique: bool = False) -> None:
    """``write(handle)`` into a temporary file beside ``path``; flush, fsync, rename over ``path``, fsync the
    folder. Until the rename ``path`` keeps its old content; an exception removes the temporary."""
    atomic_write_files({path: write}, unique)


def atomic_write_files(writers: dict[str | Path, Callable[[BinaryIO], None]], unique: bool = False) -> None:
    """:func:`atomic_write` of several files that belong together (an index's rows and its metadata): every
    temporary is written and fsynced before the first rename, so a failure while writing (a full disk) leaves
    all the old files; the renames follow in the given order (the file that describes the others last)."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in writers.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = temporary_name(path, unique)
            staged.append((temporary, path))
            with temporary.open("wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())  # the bytes are on disk before the rename makes them the file
        for temporary, path in staged:
            os.replace(temporary, path)
    except BaseException as error:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None and staged:
            # write() / fsync() errors name no file; a full disk should say which file it stopped
            raise OSError(error.errno, error.strerror, str(staged[-1][1])) from error
        raise
    for folder in {path.parent for _, path in staged}:
        fsync_directory(folder)

def atomic_write_text(path: str | Path, text: str, unique: bool = False) -> None:
    """:func:`atomic_write` of ``text`` encoded as UTF-8."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), unique)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def partial_directory(path: Path) -> Path:
    """Where :func:`atomic_directory` builds ``path``: a hidden sibling named after this process."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a new, empty hidden sibling of ``path`` to fill; when the block ends without an error, rename it to
    ``path`` (which must not exist or be an empty folder) and fsync the parent. An error, or a process killed
    inside the block, leaves ``path`` untouched: there is never a half-written ``path`` that a later run would
    refuse as "not empty". Leftover siblings of processes that died are removed on the next call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    building = partial_directory(path)
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        yield building
        fsync_directory(building)
        try:
            os.replace(building, path)  # replaces an empty folder; a non-empty one is refused
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(f"{path} appeared and is not empty while it was built; "
                                      f"write into a new directory") from None
            raise
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    fsync_directory(path.parent)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
