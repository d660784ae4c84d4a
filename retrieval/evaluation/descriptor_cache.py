"""Descriptors on disk: one entry per (benchmark images, method, role, resize), found again by its key.

**Keys.** An entry's key hashes everything the descriptors depend on (the harness builds it,
:func:`retrieval.evaluation.harness`): the cache format version :data:`CACHE_FORMAT` (bumped when code changes what a
config produces), the method's ``config()`` (its settings, weights fingerprint included; never fitted state),
the benchmark's name and source (the resolved manifest path or data folder), the role, the transform, a
fingerprint of the image list itself (:func:`data.images.image_list_fingerprint`: resolved paths, file sizes and
modification times; ``stat`` only, so a million files cost seconds, not a read of every byte) and, for a fitted
method, the same fingerprint of its training images and labels. Two manifests of the same size, the same set
name under another data root, or a replaced image thus never share descriptors.

**Entries.** An extraction writes ``<method>-<key>.shards/`` (:mod:`retrieval.search.shards`: whole shards only, so an
interrupted extraction resumes from its last finished shard, and several processes may write different shards
at once). The shard folder records the fit that writes it (``fitted_state``, None for a method that is not
fitted): a resumed extraction of another fit starts the folder over. When every shard is there,
:meth:`CacheEntry.finish` streams them, one shard in memory at a time, into ``<method>-<key>.npy`` (renamed into
place when complete), writes ``<method>-<key>.json`` (config, images/s, the shards' ``fitted_state``...) and
removes the shards. An entry is complete when both files are there; it is read back as a memory map, so a large
database is never loaded whole.
"""
from __future__ import annotations

import hashlib
import re
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np


from msretrieval.retrieval.descriptors.extract import Extraction
from msretrieval.utils.files import atomic_write

from msretrieval.retrieval.search.shards import ShardedArray, ShardWriter

log = logging.getLogger(__name__)

#: The cache format, part of every key. Bump it whenever the descriptors that a key's parts describe change
#: without any of those parts changing (a change to a method's code, the extraction, image loading or resizing
#: that ``config()`` and the transform do not name): every earlier entry is then described again, never read.
CACHE_FORMAT = 1


def safe_name(text: str) -> str:
    """A file-name-safe version of a benchmark or method name (``run:runs/x`` -> ``run_runs_x``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "unnamed"


@dataclass(frozen=True)
class CacheEntry:
    """The files of one cached descriptor array (see the module docstring)."""

    array_path: Path
    meta_path: Path
    shard_folder: Path

    def load(self, count: int) -> Extraction | None:
        """The descriptors as a memory map, or None when the entry is missing, incomplete or unreadable."""
        if not (self.array_path.is_file() and self.meta_path.is_file()):
            return None
        try:
            # copy-on-write: torch.from_numpy takes it without a read-only warning; pages are read on demand
            descriptors = np.load(self.array_path, mmap_mode="c")
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable cache entry %s (%s)", self.array_path, error)
            return None
        if len(descriptors) != count:
            log.warning("ignoring cache entry %s: %d descriptors for %d images", self.array_path,
                        len(descriptors), count)
            return None
        return Extraction(descriptors, float(meta["images_per_second"]), from_cache=True,
                          fitted_state=meta.get("fitted_state"))

    def writer(self, count: int, shard_rows: int, fitted_state: str | None) -> ShardWriter:
        """The shard writer of an extraction into this entry by a method whose fit is ``fitted_state`` (None:
        not fitted): finished shards of an earlier attempt are kept if that same fit made them, dropped if
        another one did."""
        return ShardWriter(self.shard_folder, count, shard_rows, origin=fitted_state)

    def finish(self, meta: dict) -> None:
        """Every shard is written: stream them into the entry's array, write its metadata (``meta``, whose
        ``fitted_state`` must be the fit the shards were written by), drop the shards."""
        shards = ShardedArray(self.shard_folder)
        if shards.origin != meta.get("fitted_state"):
            raise RuntimeError(f"{self.shard_folder}: shards of fit {shards.origin} cannot be recorded as fit "
                               f"{meta.get('fitted_state')}")
        header = {"descr": np.lib.format.dtype_to_descr(shards.dtype), "fortran_order": False,
                  "shape": shards.shape}

        def write(handle) -> None:
            np.lib.format.write_array_header_1_0(handle, header)
            for _, rows in shards.blocks():  # one shard in memory at a time
                handle.write(np.ascontiguousarray(rows).tobytes())

        atomic_write(self.array_path, write, unique=True)
        atomic_write(self.meta_path, lambda handle: handle.write(
            json.dumps({**meta, "count": shards.count}, indent=2, default=str).encode()), unique=True)
        shutil.rmtree(self.shard_folder, ignore_errors=True)


class DescriptorCache:
    """Entries under ``root/<benchmark>/``, named by method and key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(*parts) -> str:
        """16 hex digits identifying ``parts`` (JSON-able) under this :data:`CACHE_FORMAT`."""
        blob = json.dumps([f"descriptor cache format {CACHE_FORMAT}", *parts], sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def entry(self, benchmark: str, method: str, key: str) -> CacheEntry:
        folder = self.root / safe_name(benchmark)
        stem = f"{safe_name(method)}-{key}"
        return CacheEntry(folder / f"{stem}.npy", folder / f"{stem}.json", folder / f"{stem}.shards")
