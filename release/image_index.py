"""A searchable index of a folder of images, made with a release and kept on disk.

``INDEX_DIR`` holds ``index.json`` (the release, the FAISS factory string, the index parameters, one entry per
image: path, size, modification time), ``descriptors.npy`` (N, D float32, the rows of the index) and
``index.faiss``. Updating an index encodes only the images that are new or changed since; removed images are
dropped. A flat index (exact inner product, the default) grows by ``add``; other factories (``IVF64,Flat``,
``HNSW32``...) are rebuilt from the stored descriptors, which costs no image decoding. ``auto`` chooses by the
number of images (``retrieval.search.index.choose_index``: exact up to 200,000, then IVF-PQ / binary IVF) at every
update, so a growing index switches to IVF-PQ once it passes the threshold; ``index.json`` records the
choice (factory, nlist, m, nprobe, train size). A hashing release stores packed codes
(uint8) in a FAISS binary index (Hamming distance; ``Flat`` means ``BFlat``, or ``BIVF64``, ``BHash4x16``...)
and scores are negated Hamming distances.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msretrieval.utils.errors import UserError, first_line

from .retriever import Retriever

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
META_FILE, DESCRIPTORS_FILE, FAISS_FILE = "index.json", "descriptors.npy", "index.faiss"


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, by suffix), sorted, as absolute paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p.resolve() for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def file_stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def build_faiss(descriptors: np.ndarray, factory: str) -> tuple[object, dict]:
    """(CPU FAISS index, its parameters): inner product over float descriptors, Hamming over packed codes
    (uint8 rows); ``factory="auto"`` chooses by size. The nprobe chosen is kept in the written index."""
    from msretrieval.retrieval.search.index import SearchIndex

    binary = descriptors.dtype == np.uint8
    built = SearchIndex(descriptors, "hamming" if binary else "inner_product", use_gpu=False,
                        factory="BFlat" if binary and factory == "Flat" else factory)
    return built.index, built.parameters


@dataclass
class IndexUpdate:
    added: int
    removed: int
    kept: int
    encode_seconds: float
    total_seconds: float


class ImageIndex:
    """Load with :meth:`open`, make or refresh with :meth:`update`, query with :meth:`search`."""

    def __init__(self, directory: Path, meta: dict, descriptors: np.ndarray, index):
        self.directory, self.meta, self.descriptors, self.index = directory, meta, descriptors, index

    @property
    def paths(self) -> list[Path]:
        return [Path(entry["path"]) for entry in self.meta["images"]]

    @classmethod
    def open(cls, directory: str | Path) -> "ImageIndex":
        import faiss

        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: build the index with scripts/index.py first")
        try:  # a damaged or hand-edited index is the user's file: one line, not a traceback
            meta = json.loads(meta_path.read_text())
            images = meta["images"]
            descriptors = np.load(directory / DESCRIPTORS_FILE, allow_pickle=False)
            binary = meta.get("binary", False)
            index = (faiss.read_index_binary if binary else faiss.read_index)(str(directory / FAISS_FILE))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as error:
            raise UserError(f"{directory} is not a readable image index ({type(error).__name__}: "
                            f"{first_line(error)}); rebuild it with scripts/index.py into a new directory") from None
        if not len(images) == len(descriptors) == index.ntotal:
            raise UserError(f"{directory}: {len(images)} images, {len(descriptors)} descriptors and "
                             f"{index.ntotal} index rows disagree; rebuild it into a new directory")
        return cls(directory, meta, descriptors, index)

    @classmethod
    def update(cls, directory: str | Path, folder: str | Path, retriever: Retriever, release: str | Path,
               factory: str = "Flat", batch_size: int = 16) -> tuple["ImageIndex", IndexUpdate]:
        """Index ``folder`` into ``directory``: a new index, or the existing one brought up to date (it must
        have been made with the same release and factory)."""
        started = time.perf_counter()
        directory = Path(directory)
        release_id = retriever.config["weights_sha256"]
        images = list_images(folder)
        old = cls.open(directory) if (directory / META_FILE).is_file() else None
        if old is not None and (old.meta["weights_sha256"] != release_id or old.meta["factory"] != factory):
            raise UserError(f"{directory} was built with another release or factory "
                             f"({old.meta['factory']}); index into a new directory")
        known = {entry["path"]: (row, entry["stamp"]) for row, entry in enumerate(old.meta["images"])} if old else {}
        stamps = {str(path): file_stamp(path) for path in images}
        kept_rows = [known[p][0] for p in stamps if p in known and known[p][1] == stamps[p]]
        kept_paths = {old.meta["images"][row]["path"] for row in kept_rows} if old else set()
        new_paths = [p for p in stamps if p not in kept_paths]
        encode_start = time.perf_counter()
        new = retriever.encode(new_paths, batch_size=batch_size) if new_paths else \
            np.zeros((0, retriever.dim), dtype=retriever.dtype)
        encode_seconds = time.perf_counter() - encode_start
        removed = (len(old.meta["images"]) - len(kept_rows)) if old else 0
        entries = ([old.meta["images"][row] for row in kept_rows] if old else []) + \
            [{"path": p, "stamp": stamps[p]} for p in new_paths]
        descriptors = np.concatenate([old.descriptors[kept_rows] if old else new[:0], new]).astype(retriever.dtype)
        if not len(descriptors):
            raise UserError(f"no images found under {folder} (suffixes {sorted(IMAGE_SUFFIXES)})")
        from msretrieval.retrieval.search.index import (DEFAULT_FACTORY,  # FAISS is imported when it is needed
                                                        DEFAULT_FLAT_LIMIT)

        flat = factory == "Flat" or (factory == "auto" and len(descriptors) <= DEFAULT_FLAT_LIMIT)
        old_factory = old.meta.get("index", {}).get("factory") if old is not None else None
        if old is not None and removed == 0 and flat and old_factory in (None, *DEFAULT_FACTORY.values()):
            index = old.index  # rows kept in order, still exact: grow the flat index in place
            index.add(new)
            parameters = {**old.meta.get("index", {"factory": factory}), "count": len(descriptors)}
        else:
            index, parameters = build_faiss(descriptors, factory)
        meta = {"release": str(Path(release).resolve()), "weights_sha256": release_id, "factory": factory,
                "index": parameters, "binary": retriever.binary,
                "dim": int(descriptors.shape[1]), "folder": str(Path(folder).resolve()), "images": entries}
        directory.mkdir(parents=True, exist_ok=True)
        cls._write(directory, meta, descriptors, index)
        update = IndexUpdate(len(new_paths), removed, len(kept_rows), encode_seconds, time.perf_counter() - started)
        return cls(directory, meta, descriptors, index), update

    @staticmethod
    def _write(directory: Path, meta: dict, descriptors: np.ndarray, index) -> None:
        """Each file is written beside and renamed over the old one, so an interrupted update leaves a
        readable (older or newer) file, and the row counts are checked on open."""
        import faiss

        def save_array(path: Path) -> None:
            with path.open("wb") as handle:  # a handle: np.save would append .npy to the temporary name
                np.save(handle, descriptors)

        write_index = faiss.write_index_binary if meta.get("binary") else faiss.write_index
        for name, write in ((DESCRIPTORS_FILE, save_array), (FAISS_FILE, lambda p: write_index(index, str(p))),
                            (META_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)))):
            temporary = directory / (name + ".tmp")
            write(temporary)
            os.replace(temporary, directory / name)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k), best first (inner products of L2-normalised descriptors, or negated
        Hamming distances of packed codes)."""
        k = min(k, self.index.ntotal)
        if self.meta.get("binary"):
            distances, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.uint8), k)
            return -distances.astype(np.float32), rows
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows
