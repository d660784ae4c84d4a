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

A binary index searches better two ways (:meth:`ImageIndex.search`): ``asymmetric`` scores the queries' float
projections (:meth:`Retriever.encode_queries`) against the codes; ``rerank=R`` shortlists R images by the codes
(Hamming, or asymmetric) and re-ranks them by the float descriptors the codes came from
(:mod:`retrieval.search.two_stage`), which an index built with ``keep_floats`` keeps in ``floats.npy``, read
row by row: the process holds the codes, and only the shortlisted rows of the floats. Both are exact scans
of the codes (stage 1 does not use ``index.faiss``); ``fast_scan`` takes an asymmetric shortlist by FAISS's fast
scan (:mod:`retrieval.search.fast_scan`: several times faster on large indexes, the order up to 8-bit tables).

Searching it (``scripts/search.py``, the search page ``release/search_page.py``): :meth:`ImageIndex.load_retriever`
encodes the queries with the index's own release, :meth:`ImageIndex.top_k` ranks them, leaving a query that is
itself in the index out of its own results, and :class:`PathLabels` (a CSV manifest) marks each hit correct or not.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from msretrieval.utils.errors import UserError, first_line
from msretrieval.utils.files import atomic_write_files

from .load import load_release
from .retriever import Retriever

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
META_FILE, DESCRIPTORS_FILE, FAISS_FILE, FLOATS_FILE = "index.json", "descriptors.npy", "index.faiss", "floats.npy"


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


@dataclass(frozen=True)
class Hit:
    """One search result: its index row, image path and score; ``label`` when the labels know the image,
    ``correct`` when the query's label is known too."""

    row: int
    path: str
    score: float
    label: int | None = None
    correct: bool | None = None


class PathLabels:
    """Class ids of images, looked up by resolved path, from a CSV manifest (``file`` and ``class_id`` columns,
    paths relative to it); ``names`` maps a class id to its ``class_name`` column when the manifest has one."""

    def __init__(self, manifest: str | Path):
        from msretrieval.data.manifest import read_csv_manifest

        images = read_csv_manifest(manifest)
        labels = [int(label) for label in images.labels]
        self.by_path = {str(p.resolve()): label for p, label in zip(images.paths, labels)}
        self.names = dict(zip(labels, images.extra["class_name"])) if "class_name" in images.extra else {}

    def get(self, path: str | Path) -> int | None:
        return self.by_path.get(str(path))


@dataclass
class IndexUpdate:
    added: int
    removed: int
    kept: int
    encode_seconds: float
    total_seconds: float


class ImageIndex:
    """Load with :meth:`open`, make or refresh with :meth:`update`, query with :meth:`search`."""

    def __init__(self, directory: Path, meta: dict, descriptors: np.ndarray, index, gpus: int = 0):
        self.directory, self.meta, self.descriptors, self.index = directory, meta, descriptors, index
        self.gpus = gpus  # GPUs the FAISS index is searched on (0: the CPU)

    @property
    def paths(self) -> list[Path]:
        return [Path(entry["path"]) for entry in self.meta["images"]]

    @classmethod
    def open(cls, directory: str | Path, use_gpu: str | bool = False) -> "ImageIndex":
        """The index in ``directory``; ``use_gpu`` (``retrieval.search.index.to_gpus``: False, "auto", True) searches
        a float index on the GPU(s) FAISS sees (packed codes stay on the CPU). Update only a CPU index."""
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
        gpus = 0
        if binary:
            if use_gpu is True:
                log.info("%s holds packed codes: searched on the CPU", directory)
        else:
            from msretrieval.retrieval.search.index import to_gpus

            factory = meta.get("index", {}).get("factory", meta.get("factory", ""))
            index, gpus = to_gpus(index, use_gpu, float16="PQ" in str(factory), name=f"image index {directory}")
        return cls(directory, meta, descriptors, index, gpus)

    def load_retriever(self, release: str | Path | None = None, device: str = "cpu") -> Retriever:
        """The release that encodes queries for this index: the one recorded in it, or ``release``, which must
        hold the same weights."""
        retriever = load_release(release or self.meta["release"], device=device)
        if retriever.config["weights_sha256"] != self.meta["weights_sha256"]:
            raise UserError(f"the release's weights differ from those {self.directory} was built with")
        return retriever

    @property
    def floats_path(self) -> Path | None:
        """``floats.npy``: the float descriptors of a binary index built with ``keep_floats`` (else None)."""
        return self.directory / FLOATS_FILE if self.meta.get("floats") else None

    @classmethod
    def update(cls, directory: str | Path, folder: str | Path, retriever: Retriever, release: str | Path,
               factory: str = "Flat", batch_size: int = 16, keep_floats: bool = False
               ) -> tuple["ImageIndex", IndexUpdate]:
        """Index ``folder`` into ``directory``: a new index, or the existing one brought up to date (it must
        have been made with the same release, factory and ``keep_floats``). ``keep_floats`` (hashing releases):
        also write the float descriptors the codes come from, for two-stage search."""
        started = time.perf_counter()
        directory = Path(directory)
        release_id = retriever.config["weights_sha256"]
        if keep_floats and not retriever.binary:
            raise UserError("keeping float descriptors beside the codes is for a hashing release; this release's "
                            "index holds float descriptors already")
        images = list_images(folder)
        old = cls.open(directory) if (directory / META_FILE).is_file() else None
        if old is not None and (old.meta["weights_sha256"] != release_id or old.meta["factory"] != factory
                                or bool(old.meta.get("floats")) != keep_floats):
            raise UserError(f"{directory} was built with another release or factory ({old.meta['factory']}) or "
                             f"float setting (floats kept: {bool(old.meta.get('floats'))}); index into a new "
                             f"directory")
        known = {entry["path"]: (row, entry["stamp"]) for row, entry in enumerate(old.meta["images"])} if old else {}
        stamps = {str(path): file_stamp(path) for path in images}
        kept_rows = [known[p][0] for p in stamps if p in known and known[p][1] == stamps[p]]
        kept_paths = {old.meta["images"][row]["path"] for row in kept_rows} if old else set()
        new_paths = [p for p in stamps if p not in kept_paths]
        encode_start = time.perf_counter()
        new, *new_floats = retriever.encode_outputs(new_paths, ("descriptor", "floats") if keep_floats else
                                                    ("descriptor",), batch_size=batch_size)
        encode_seconds = time.perf_counter() - encode_start
        removed = (len(old.meta["images"]) - len(kept_rows)) if old else 0
        entries = ([old.meta["images"][row] for row in kept_rows] if old else []) + \
            [{"path": p, "stamp": stamps[p]} for p in new_paths]
        descriptors = np.concatenate([old.descriptors[kept_rows] if old else new[:0], new]).astype(retriever.dtype)
        floats = None
        if keep_floats:  # the kept rows' floats read from the old file (memory-mapped), the new ones appended
            kept = np.load(old.floats_path, mmap_mode="r")[kept_rows] if old else new_floats[0][:0]
            floats = np.concatenate([kept, new_floats[0]]).astype(np.float32)
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
                "index": parameters, "binary": retriever.binary, "floats": keep_floats,
                "dim": int(descriptors.shape[1]), "folder": str(Path(folder).resolve()), "images": entries}
        directory.mkdir(parents=True, exist_ok=True)
        cls._write(directory, meta, descriptors, index, floats)
        update = IndexUpdate(len(new_paths), removed, len(kept_rows), encode_seconds, time.perf_counter() - started)
        return cls(directory, meta, descriptors, index), update

    @staticmethod
    def _write(directory: Path, meta: dict, descriptors: np.ndarray, index, floats: np.ndarray | None = None
               ) -> None:
        """The files are written together (:func:`utils.files.atomic_write_files`): all are on disk before the
        first replaces its old version, so a failed update (a full disk) leaves the previous index; the row
        counts are checked on open."""
        import faiss

        serialize = faiss.serialize_index_binary if meta.get("binary") else faiss.serialize_index
        files = {directory / DESCRIPTORS_FILE: lambda handle: np.save(handle, descriptors),
                 directory / FAISS_FILE: lambda handle: handle.write(serialize(index).tobytes()),
                 directory / META_FILE: lambda handle: handle.write(json.dumps(meta, indent=1).encode())}
        if floats is not None:
            files[directory / FLOATS_FILE] = lambda handle: np.save(handle, floats)
        atomic_write_files(files)

    def search(self, queries: np.ndarray, k: int, asymmetric: bool = False, rerank: int | None = None,
               query_floats: np.ndarray | None = None, fast_scan: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k), best first (inner products of L2-normalised descriptors, or negated
        Hamming distances of packed codes). A binary index also takes ``asymmetric`` queries (float
        projections; scores are their inner products with the codes as {-1, +1}) and ``rerank=R`` (with
        ``query_floats``, the queries' float descriptors; scores are float inner products; at most R results),
        whose asymmetric shortlist FAISS's fast scan may take (``fast_scan``)."""
        if fast_scan and not (asymmetric and rerank is not None):
            raise UserError("the fast scan takes the asymmetric shortlist of a two-stage search: it needs "
                            "asymmetric and rerank")
        if asymmetric or rerank is not None:
            return self._search_codes(queries, k, asymmetric, rerank, query_floats, fast_scan)
        k = min(k, self.index.ntotal)
        if self.gpus:
            from msretrieval.retrieval.search.index import GPU_MAX_K

            if k > GPU_MAX_K:
                raise UserError(f"k={k}: FAISS's GPU search returns at most {GPU_MAX_K} neighbours; ask for fewer "
                                f"or search on the CPU")
        if self.meta.get("binary"):
            distances, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.uint8), k)
            return -distances.astype(np.float32), rows
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows

    def _search_codes(self, queries: np.ndarray, k: int, asymmetric: bool, rerank: int | None,
                      query_floats: np.ndarray | None, fast_scan: bool = False) -> tuple[np.ndarray, np.ndarray]:
        from msretrieval.retrieval.search.binary import AsymmetricScores
        from msretrieval.retrieval.search.two_stage import TwoStageIndex

        if not self.meta.get("binary"):
            raise UserError(f"{self.directory} holds float descriptors: asymmetric and two-stage search are for "
                            f"the packed codes of a hashing release")
        if rerank is None:
            return AsymmetricScores(queries, self.descriptors).top_k(k)
        if self.floats_path is None:
            raise UserError(f"{self.directory} keeps no float descriptors to re-rank with: build it with "
                            f"scripts/index.py --keep-floats (into a new directory)")
        if query_floats is None:
            raise ValueError("two-stage search needs the queries' float descriptors (query_floats)")
        return TwoStageIndex(self.descriptors, self.floats_path, rerank, asymmetric,
                             fast_scan).search(queries, query_floats, k)

    def top_k(self, queries: np.ndarray, k: int, exclude: Sequence[str | None] | None = None,
              labels: PathLabels | None = None, query_labels: Sequence[int | None] | None = None,
              **search) -> list[list[Hit]]:
        """The ``k`` best hits of each query descriptor, best first. ``exclude[q]``: an image path left out of
        query ``q``'s hits (the query itself when it is in the index). With ``labels``, hits carry their label,
        and ``correct`` where ``query_labels[q]`` is known. ``search``: :meth:`search`'s ``asymmetric``,
        ``rerank``, ``query_floats`` and ``fast_scan``."""
        exclude = exclude if exclude is not None else [None] * len(queries)
        query_labels = query_labels if query_labels is not None else [None] * len(queries)
        # one more when a query may find itself, so k remain after leaving it out
        scores, rows = self.search(queries, k + any(path is not None for path in exclude), **search)
        images = self.meta["images"]
        hits = []
        for q in range(len(queries)):
            found = [(int(r), images[r]["path"], float(s)) for s, r in zip(scores[q], rows[q])
                     if r >= 0 and images[r]["path"] != exclude[q]][:k]
            query_label = query_labels[q]
            hits.append([])
            for row, path, score in found:
                label = labels.get(path) if labels is not None else None
                correct = label == query_label if label is not None and query_label is not None else None
                hits[-1].append(Hit(row, path, score, label, correct))
        return hits
