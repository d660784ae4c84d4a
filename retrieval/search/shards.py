"""Row arrays on disk in shards: written one shard at a time, read back as memory maps.

A million-image database is never held in memory whole: an extraction writes each finished shard of rows
(``shard_rows`` consecutive rows) to its own ``.npy`` file, and readers map the files instead of loading them.
A shard file appears only when it is complete (written to a temporary name, flushed, renamed), so an
interrupted writer leaves only whole shards behind and a restarted one skips them (resumable extraction).
Several processes may write different shards of one folder at once: no file is shared between writers.

A folder's rows must all come from one producer: a writer names its ``origin`` (a fingerprint of what makes the
rows, e.g. the fitted state of the method that describes the images) and discards, with a warning, the shards
of a folder whose layout records another one, instead of completing them with rows of another fit.

Folder layout::

    layout.json          {"count": N, "shard_rows": S, "shape": [D, ...], "dtype": "float32", "origin": str|null}
    shard-00000.npy      rows 0 .. S-1
    shard-00001.npy      rows S .. 2S-1
    ...
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from msretrieval.utils.files import atomic_write

log = logging.getLogger(__name__)

LAYOUT = "layout.json"


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.npy"


def shard_ranges(count: int, shard_rows: int) -> list[range]:
    """Row ranges of the shards of ``count`` rows (the last one may be shorter)."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
    return [range(start, min(start + shard_rows, count)) for start in range(0, count, shard_rows)]


def ascending_rows(indices, count: int) -> np.ndarray:
    """``indices`` as int64, checked to be ascending row numbers of a ``count``-row array (what a read of
    chosen rows in file order takes)."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) and (indices[0] < 0 or indices[-1] >= count or (np.diff(indices) < 0).any()):
        raise ValueError(f"take needs ascending row indices in 0..{count - 1}")
    return indices


class ShardWriter:
    """Writes the shards of a ``count``-row array into ``folder``; shards already there are kept (resume).

    The row shape and dtype are fixed by the first shard written (or found); a folder holding another layout
    (other count or shard size) or rows of another ``origin`` (None: unnamed; a folder written before origins
    were recorded has None) is an earlier, different extraction and is started over.
    """

    def __init__(self, folder: str | Path, count: int, shard_rows: int, origin: str | None = None):
        if count < 1:
            raise ValueError(f"an array needs at least one row, got count={count}")
        self.folder = Path(folder)
        self.count = count
        self.shard_rows = shard_rows
        self.origin = origin
        self.ranges = shard_ranges(count, shard_rows)
        self.folder.mkdir(parents=True, exist_ok=True)
        layout = self._layout()
        if layout is None:
            return
        if (layout["count"], layout["shard_rows"]) != (count, shard_rows):
            log.warning("%s holds shards of another layout (%d rows by %d); starting over", self.folder,
                        layout["count"], layout["shard_rows"])
        elif layout.get("origin") != origin:
            log.warning("%s holds shards made by another fit (origin %s; this extraction's is %s); starting over",
                        self.folder, layout.get("origin"), origin)
        else:
            return
        for path in self.folder.glob("shard-*.npy"):
            path.unlink()
        (self.folder / LAYOUT).unlink()

    def _layout(self) -> dict | None:
        path = self.folder / LAYOUT
        return json.loads(path.read_text()) if path.is_file() else None

    def done(self, index: int) -> bool:
        return shard_path(self.folder, index).is_file()

    def pending(self) -> list[int]:
        """Shards still to write, in order."""
        return [i for i in range(len(self.ranges)) if not self.done(i)]

    def write(self, index: int, rows: np.ndarray) -> None:
        expected = len(self.ranges[index])
        if len(rows) != expected:
            raise ValueError(f"shard {index} holds rows {self.ranges[index].start}..{self.ranges[index].stop - 1}"
                             f" ({expected}), got {len(rows)}")
        rows = np.ascontiguousarray(rows)
        if self._layout() is None:  # every writer writes the same layout; the rename makes it whole
            layout = {"count": self.count, "shard_rows": self.shard_rows, "shape": list(rows.shape[1:]),
                      "dtype": rows.dtype.str, "origin": self.origin}
            atomic_write(self.folder / LAYOUT, lambda handle: handle.write(json.dumps(layout).encode()), unique=True)
        atomic_write(shard_path(self.folder, index), lambda handle: np.save(handle, rows), unique=True)

    def complete(self) -> bool:
        return not self.pending()


class ShardedArray:
    """A read-only (count, ...) array over the shard files of a folder, memory-mapped shard by shard."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / LAYOUT
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} holds no sharded array ({LAYOUT} is missing)")
        layout = json.loads(path.read_text())
        self.count, self.shard_rows = int(layout["count"]), int(layout["shard_rows"])
        self.row_shape, self.dtype = tuple(layout["shape"]), np.dtype(layout["dtype"])
        self.origin: str | None = layout.get("origin")  # what made the rows (see ShardWriter)
        self.ranges = shard_ranges(self.count, self.shard_rows)
        missing = [i for i in range(len(self.ranges)) if not shard_path(self.folder, i).is_file()]
        if missing:
            raise ValueError(f"{self.folder}: {len(missing)} of {len(self.ranges)} shards are missing "
                             f"(first: {shard_path(self.folder, missing[0]).name}); the extraction did not finish")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, *self.row_shape)

    @property
    def nbytes(self) -> int:
        return int(self.count * np.prod(self.row_shape, dtype=np.int64) * self.dtype.itemsize)

    def __len__(self) -> int:
        return self.count

    def shard(self, index: int) -> np.ndarray:
        array = np.load(shard_path(self.folder, index), mmap_mode="r")
        if array.shape != (len(self.ranges[index]), *self.row_shape) or array.dtype != self.dtype:
            raise ValueError(f"{shard_path(self.folder, index)}: shape {array.shape} {array.dtype}, the layout "
                             f"says {(len(self.ranges[index]), *self.row_shape)} {self.dtype}")
        return array

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, memory-mapped rows) for every shard, in order."""
        for index, rows in enumerate(self.ranges):
            yield rows.start, self.shard(index)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` copied into memory."""
        start, stop = max(start, 0), min(stop, self.count)
        out = np.empty((max(stop - start, 0), *self.row_shape), dtype=self.dtype)
        for index in range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1 if stop > start else 0):
            first = self.ranges[index].start
            lo, hi = max(start, first), min(stop, self.ranges[index].stop)
            out[lo - start:hi - start] = self.shard(index)[lo - first:hi - first]
        return out

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The rows at ``indices`` (ascending), copied into memory one shard at a time (a training sample
        from a database that does not fit in memory)."""
        indices = ascending_rows(indices, self.count)
        out = np.empty((len(indices), *self.row_shape), dtype=self.dtype)
        shard_of = indices // self.shard_rows
        for index in np.unique(shard_of):
            chosen = np.flatnonzero(shard_of == index)
            out[chosen] = self.shard(int(index))[indices[chosen] - self.ranges[index].start]
        return out

    def to_array(self) -> np.ndarray:
        return self.rows(0, self.count)
