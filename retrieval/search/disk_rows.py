"""Scattered rows of ``.npy`` files, read with positional reads: nothing of the files stays in the process.

Two-stage search reads a few hundred random rows of a large float file per query. Through a memory map every
row read is a page fault, and the kernel maps the cached pages around it too (fault-around: up to 64 KiB a
fault), so a 2 KiB row costs several microseconds and leaves 64 KiB counted in the process's resident set
until it is released, which costs a walk over the whole mapping (about a millisecond for 2 GB). A positional
read (``os.pread``) copies the row's bytes from the kernel's page cache and maps nothing (docs/hashing.md has
the measurements). Where ``os.pread`` does not exist (Windows), the rows are gathered through a memory map.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .shards import ShardedArray, ascending_rows, shard_path


class DiskRows:
    """Read-only (N, D) rows stored in one ``.npy`` file or in the shards of a :class:`ShardedArray` folder;
    :meth:`take` copies chosen rows into memory."""

    def __init__(self, source: str | Path | ShardedArray):
        if isinstance(source, ShardedArray):
            paths = [shard_path(source.folder, index) for index in range(len(source.ranges))]
        else:
            paths = [Path(source)]
        #: (path, byte offset of row 0, first row) per file
        self._files: list[tuple[Path, int, int]] = []
        count, row_shape, dtype = 0, None, None
        for path in paths:
            mapped = np.load(path, mmap_mode="r")  # reads the header only; the mapping is dropped below
            if mapped.ndim != 2 or not mapped.flags.c_contiguous:
                raise ValueError(f"{path}: expected a C-ordered 2-D array, got shape {mapped.shape}")
            if row_shape is not None and (mapped.shape[1:], mapped.dtype) != (row_shape, dtype):
                raise ValueError(f"{path}: rows {mapped.shape[1:]} {mapped.dtype}, the first file's are "
                                 f"{row_shape} {dtype}")
            row_shape, dtype = mapped.shape[1:], mapped.dtype
            self._files.append((path, int(mapped.offset), count))
            count += len(mapped)
            del mapped
        self.shape = (count, *row_shape)
        self.dtype = dtype
        self._row_bytes = int(row_shape[0]) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows at ``rows`` (ascending, in range), copied into a new (len(rows), D) array."""
        rows = ascending_rows(rows, len(self))
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        file_of = np.searchsorted([first for _, _, first in self._files], rows, side="right") - 1
        for index in np.unique(file_of):
            chosen = np.flatnonzero(file_of == index)
            path, offset, first = self._files[index]
            out[chosen] = self._read(path, offset, rows[chosen] - first)
        return out

    def _read(self, path: Path, offset: int, rows: np.ndarray) -> np.ndarray:
        if not hasattr(os, "pread"):
            return np.load(path, mmap_mode="r")[rows]
        size = self._row_bytes
        handle = os.open(path, os.O_RDONLY)
        try:
            data = b"".join([os.pread(handle, size, position) for position in (offset + rows * size).tolist()])
        finally:
            os.close(handle)
        if len(data) != len(rows) * size:
            raise OSError(f"{path} is shorter than its header says (a truncated file?)")
        return np.frombuffer(data, dtype=self.dtype).reshape(len(rows), *self.shape[1:])
