"""Images two lists share, by path or by content: nothing is fitted or trained on a benchmark's test images.

Two images are the same if their paths resolve to one file (symlinks, ``..``, relative spellings), or if their
bytes are identical (a copy under another name). Content is compared cheaply: every file is ``stat``-ed, and
only files whose byte size also occurs on the other side are read and hashed (SHA-1), each at most once. A
re-encoded or resized copy is not found (that would need image hashing; the sets used here are copies of one
another's files, not re-encodings). A file that cannot be ``stat``-ed (missing) is compared by path only:
reading it fails later with its own error.

Used by ``scripts/evaluate.py --fit-on`` (:meth:`retrieval.evaluation.benchmarks.Benchmark.use_fit_set`) and by training
(``training.config.check_inputs``: training images vs the final evaluation's benchmark).
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from msretrieval.utils.errors import UserError

#: pairs named in an error message
SHOWN = 3
_CHUNK = 1 << 20


class SharedImagesError(UserError):
    """A set that must be disjoint from a benchmark's images is not."""


@dataclass(frozen=True)
class SharedImage:
    """``candidate`` (of the checked set) is ``protected`` (a benchmark image): the same file or the same bytes."""

    candidate: Path
    protected: Path
    how: str  # "path" | "content"

    def describe(self) -> str:
        if self.how == "path":
            return str(self.candidate)
        return f"{self.candidate} (same bytes as {self.protected})"


def _resolved(paths: Iterable[str | Path]) -> list[str]:
    """Absolute, symlink-free paths; each folder is resolved once (a million files share a few folders)."""
    folders: dict[str, str] = {}
    out = []
    for path in paths:
        folder, name = os.path.split(os.fspath(path))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder or ".")
        out.append(os.path.realpath(os.path.join(folders[folder], name)))
    return out


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def file_sha1(path: str | Path) -> str:
    """SHA-1 of a file's bytes, read in 1 MB chunks."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shared_images(candidates: Sequence[str | Path], protected: Sequence[str | Path]) -> list[SharedImage]:
    """Every candidate that is one of the ``protected`` images, by resolved path or by identical bytes, in
    the candidates' order (a candidate is listed once, a path match before a content match)."""
    protected_resolved = _resolved(protected)
    by_path = {resolved: Path(original) for resolved, original in zip(protected_resolved, protected)}
    by_size: dict[int, list[str]] = defaultdict(list)
    for resolved in by_path:
        size = _size(resolved)
        if size is not None:
            by_size[size].append(resolved)
    hashes: dict[str, str] = {}

    def sha1(path: str) -> str:
        if path not in hashes:
            hashes[path] = file_sha1(path)
        return hashes[path]

    shared = []
    for original, resolved in zip(candidates, _resolved(candidates)):
        if resolved in by_path:
            shared.append(SharedImage(Path(original), by_path[resolved], "path"))
            continue
        size = _size(resolved)
        for other in by_size.get(size, []) if size is not None else []:
            if sha1(resolved) == sha1(other):
                shared.append(SharedImage(Path(original), by_path[other], "content"))
                break
    return shared


def refuse_shared_images(candidates: Sequence[str | Path], protected: Sequence[str | Path], what: str,
                         against: str, advice: str) -> None:
    """Raise :class:`SharedImagesError`, one line naming how many images of ``what`` are images of ``against``
    and the first few, when there are any."""
    shared = shared_images(candidates, protected)
    if not shared:
        return
    shown = "; ".join(item.describe() for item in shared[:SHOWN]) + ("; ..." if len(shared) > SHOWN else "")
    raise SharedImagesError(f"{what} shares {len(shared)} of its {len(candidates)} images with {against} "
                            f"(by path or identical bytes): {shown}. {advice}")
