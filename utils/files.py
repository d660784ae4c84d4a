"""Files: atomic writes, and content hashes.

Atomic writes: readers (and a process killed mid-write) see the old file or the whole new one.

The bytes go to a temporary file in the same folder, are flushed and fsynced, the temporary is renamed over the
target (``os.replace``) and the folder is fsynced, so the rename itself survives a crash.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Callable


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path, unique)
    try:
        with temporary.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
