"""Top-k search with FAISS: inner product for float descriptors, Hamming for packed binary codes.

The index is chosen by a FAISS factory string, as ``release/image_index.py`` does for float indexes:
``"Flat"`` (exact, the default), ``"IVF64,Flat"``, ``"HNSW32"``... for float descriptors, and for packed
codes (``faiss.index_binary_factory``):

- ``"BFlat"`` (the default): exact Hamming search;
- ``"BIVF{nlist}"``: inverted file over ``nlist`` k-means cells of the codes, trained on the database (or a
  sample of ``train_size`` rows); ``nprobe`` cells are visited per query, ``nprobe = nlist`` is exhaustive;
- ``"BHash{nhash}x{bits}"``: multi-index hashing (``IndexBinaryMultiHash``), ``nhash`` tables keyed by
  ``bits``-bit slices of the code; a query visits the buckets within ``nflip`` bit flips of its own slices.

A GPU index is used for float descriptors when FAISS sees a GPU (``use_gpu="auto"``). Queries are searched in
chunks so that the result buffers stay bounded however large the query set is; the database itself lives in
the index. An approximate index may find fewer than k neighbours: the missing ones are index -1, score -inf.
"""
from __future__ import annotations

import logging
import re
from typing import Callable

import faiss
import numpy as np

log = logging.getLogger(__name__)

METRICS = ("inner_product", "hamming")
DEFAULT_FACTORY = {"inner_product": "Flat", "hamming": "BFlat"}


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def check_codes(codes: np.ndarray, role: str, code_bytes: int | None = None) -> np.ndarray:
    """Packed binary codes, (N, bytes) uint8, as FAISS's binary indexes take them; else one clear error."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"{role} must be packed binary codes (uint8, np.packbits), got dtype {codes.dtype}")
    if codes.ndim != 2:
        raise ValueError(f"{role} must be 2-D (codes x bytes), got shape {codes.shape}")
    if code_bytes is not None and codes.shape[1] != code_bytes:
        raise ValueError(f"{role} have {codes.shape[1]} bytes per code, the index holds {code_bytes}-byte codes")
    return np.ascontiguousarray(codes)


def check_vectors(vectors: np.ndarray, role: str, dim: int | None = None) -> np.ndarray:
    """Float descriptors, (N, D), as float32 for FAISS; else one clear error."""
    vectors = np.asarray(vectors)
    if not np.issubdtype(vectors.dtype, np.floating):
        raise ValueError(f"{role} must be float descriptors for an inner-product index, got dtype {vectors.dtype}"
                         f" (packed codes need metric='hamming')")
    if vectors.ndim != 2:
        raise ValueError(f"{role} must be 2-D (descriptors x dimensions), got shape {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"{role} have {vectors.shape[1]} dimensions, the index holds {dim}-dimensional vectors")
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _training_rows(rows: np.ndarray, train_size: int | None) -> np.ndarray:
    """The database, or a fixed random sample of it (k-means cost grows with the training set)."""
    if train_size is None or train_size >= len(rows):
        return rows
    chosen = np.sort(np.random.default_rng(0).choice(len(rows), train_size, replace=False))
    return rows[chosen]


class SearchIndex:
    """Search over a database of float descriptors (inner product) or packed binary codes (Hamming).

    ``factory`` picks the FAISS index (see the module docstring); the default is exact. ``nprobe`` sets the
    cells visited by an IVF index, ``nflip`` the bit flips probed by a multi-hash index.
    """

    def __init__(self, database: np.ndarray, metric: str = "inner_product", use_gpu: str | bool = "auto",
                 factory: str | None = None, train_size: int | None = None, nprobe: int | None = None,
                 nflip: int | None = None):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        self.factory = factory or DEFAULT_FACTORY[metric]
        rows = check_codes(database, "database codes") if metric == "hamming" else \
            check_vectors(database, "database descriptors")
        if len(rows) == 0:
            raise ValueError("cannot index an empty database")
        self.dim = rows.shape[1]  # bytes per code for packed codes
        if metric == "hamming":
            index = self._build(lambda: faiss.index_binary_factory(self.dim * 8, self.factory), "binary")
        else:
            index = self._build(lambda: faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT),
                                "float")
            gpus = _gpu_count()
            if (use_gpu is True or use_gpu == "auto") and gpus > 0:
                index = faiss.index_cpu_to_all_gpus(index)
                log.info("FAISS index on %d GPU(s)", gpus)
            elif use_gpu is True:
                raise RuntimeError("use_gpu=True but FAISS sees no GPU (is faiss-gpu installed?)")
        if not index.is_trained:
            index.train(_training_rows(rows, train_size))
        index.add(rows)
        self.index = index
        self._set_parameter("nprobe", nprobe)
        self._set_parameter("nflip", nflip)

    def _build(self, make: Callable[[], object], kind: str):
        try:
            return make()
        except RuntimeError as error:  # drop FAISS's "Error in <C++ signature> at <file:line>: " prefix
            reason = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(error).strip())
            raise ValueError(f"FAISS cannot build a {kind} index from factory {self.factory!r}: {reason}") from None

    def _set_parameter(self, name: str, value: int | None) -> None:
        if value is None:
            return
        target = faiss.downcast_index(self.index) if self.metric == "inner_product" else self.index
        if not hasattr(target, name):
            raise ValueError(f"{name} does not apply to {type(target).__name__} (factory {self.factory!r})")
        setattr(target, name, value)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices), each (Q, k), best first. Hamming scores are negated distances."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self))
        if self.metric == "hamming":
            queries = check_codes(queries, "query codes", self.dim)
        else:
            queries = check_vectors(queries, "query descriptors", self.dim)
        scores = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), chunk):
            distances, ids = self.index.search(queries[start:start + chunk], k)
            scores[start:start + chunk] = -distances if self.metric == "hamming" else distances
            indices[start:start + chunk] = ids
        scores[indices < 0] = -np.inf
        return scores, indices
