"""Top-k search with FAISS: inner product for float descriptors, Hamming for packed binary codes.

The index is chosen by a FAISS factory string, as ``release/image_index.py`` does for float indexes:
``"Flat"`` (exact, the default), ``"IVF64,Flat"``, ``"HNSW32"``... for float descriptors, and for packed
codes (``faiss.index_binary_factory``):

- ``"BFlat"`` (the default): exact Hamming search;
- ``"BIVF{nlist}"``: inverted file over ``nlist`` k-means cells of the codes, trained on the database (or a
  sample of ``train_size`` rows); ``nprobe`` cells are visited per query, ``nprobe = nlist`` is exhaustive;
- ``"BHash{nhash}x{bits}"``: multi-index hashing (``IndexBinaryMultiHash``), ``nhash`` tables keyed by
  ``bits``-bit slices of the code; a query visits the buckets within ``nflip`` bit flips of its own slices.

``factory="auto"`` picks the index from the database size (:func:`choose_index`): exact (``Flat`` / ``BFlat``)
up to ``flat_limit`` rows, where an exact scan is still fast and needs no training; above it an inverted file,
``IVF{nlist},PQ{m}np`` (optionally OPQ-rotated, or ``HNSW32`` on request) for float descriptors and
``BIVF{nlist}`` for packed codes, with nlist ~ 4 sqrt(N) as a power of two. The parameters chosen (factory,
nlist, m, nprobe, train size) are in :attr:`SearchIndex.parameters`, for results files.

The database may be an array or a :class:`~retrieval.search.shards.ShardedArray`: a sharded one is added to the index
shard by shard (each shard memory-mapped in turn) and a trained index learns from a fixed random sample of its
rows, so the database is never one array in memory; only the index's own copy is (for IVF-PQ, m bytes a row).

A GPU index is used for float descriptors when FAISS sees a GPU (``use_gpu="auto"``); with several GPUs the
database is sharded across them (``GpuMultipleClonerOptions.shard``: each holds 1/n of the rows), which
divides the memory instead of replicating it. The index is trained and filled on the CPU, then cloned (one
coarse quantizer for every shard; no GPU was available to test this path). Queries are
searched in chunks so that the result buffers stay bounded however large the query set is. An approximate
index may find fewer than k neighbours: the missing ones are index -1, score -inf.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from typing import Callable

import faiss
import numpy as np

from msretrieval.utils.errors import UserError

from .shards import ShardedArray

log = logging.getLogger(__name__)

METRICS = ("inner_product", "hamming")
DEFAULT_FACTORY = {"inner_product": "Flat", "hamming": "BFlat"}
#: databases up to this many rows are searched exactly by ``factory="auto"``
DEFAULT_FLAT_LIMIT = 200_000
#: k-means wants at least 39 training points per cell (FAISS warns below); 40 keeps training affordable.
#: The product quantizer's k-means has 256 cells per sub-quantizer: at least 40 x 256 points for it.
TRAIN_POINTS_PER_LIST, MIN_TRAIN_SIZE = 40, 40 * 256
#: product quantizer: about 8 dimensions per sub-quantizer (m bytes a row), at most 64 sub-quantizers
DIMS_PER_SUBQUANTIZER, MAX_SUBQUANTIZERS = 8, 64
APPROXIMATE_KINDS = ("ivfpq", "hnsw")
Database = np.ndarray | ShardedArray


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _power_of_two_at_most(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1)))))


def choose_index(count: int, dim: int, metric: str = "inner_product", flat_limit: int = DEFAULT_FLAT_LIMIT,
                 kind: str = "ivfpq", opq: bool = False) -> dict:
    """The FAISS index for ``count`` rows of ``dim`` dimensions (bytes per code for ``metric="hamming"``), as a
    dict of its parameters: ``factory`` and, for an inverted file, ``nlist``, ``nprobe``, ``train_size`` (and
    ``m`` for PQ), for :class:`SearchIndex` and for the results file.

    Exact up to ``flat_limit`` rows. Above: nlist = 4 sqrt(N) rounded to a power of two (FAISS's guideline),
    at most N / 39 so that k-means has enough points per cell; nprobe = nlist / 32 cells visited per query;
    k-means on 40 points per cell (at least 10,240, for the PQ's 256-cell k-means). ``kind="hnsw"`` (float
    only) is a graph instead: no training, but it holds the full vectors (no compression). ``opq`` rotates the
    vectors before PQ (better codes, longer training)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if kind not in APPROXIMATE_KINDS:
        raise UserError(f"index kind must be one of {APPROXIMATE_KINDS}, got {kind!r}")
    if count < 1 or dim < 1:
        raise ValueError(f"cannot choose an index for {count} rows of {dim} dimensions")
    chosen = {"metric": metric, "count": count, "dim": dim, "flat_limit": flat_limit}
    if count <= flat_limit:
        return {**chosen, "factory": DEFAULT_FACTORY[metric]}
    if kind == "hnsw":
        if metric == "hamming":
            raise UserError("kind='hnsw' is for float descriptors; packed codes use an inverted file (BIVF)")
        return {**chosen, "factory": "HNSW32", "efSearch": 128}
    nlist = min(_power_of_two_at_most(4 * math.sqrt(count) * math.sqrt(2)),  # nearest power of two of 4 sqrt(N)
                _power_of_two_at_most(count / 39))
    train_size = min(count, max(TRAIN_POINTS_PER_LIST * nlist, MIN_TRAIN_SIZE))
    ivf = {"nlist": nlist, "nprobe": max(1, nlist // 32), "train_size": train_size}
    if metric == "hamming":
        return {**chosen, "factory": f"BIVF{nlist}", **ivf}
    m = max(d for d in range(1, min(MAX_SUBQUANTIZERS, max(1, dim // DIMS_PER_SUBQUANTIZER)) + 1) if dim % d == 0)
    # "np": no polysemous training (it orders PQ centroids for Hamming filtering, which inner-product search
    # does not use, and costs minutes: FAISS's factory turns it on by default)
    factory = f"{'OPQ%d,' % m if opq else ''}IVF{nlist},PQ{m}np"
    return {**chosen, "factory": factory, "m": m, **ivf}


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


def _training_rows(rows: Database, train_size: int | None) -> np.ndarray:
    """The database, or a fixed random sample of it (k-means cost grows with the training set)."""
    if train_size is None or train_size >= len(rows):
        return rows.to_array() if isinstance(rows, ShardedArray) else rows
    chosen = np.sort(np.random.default_rng(0).choice(len(rows), train_size, replace=False))
    return rows.take(chosen) if isinstance(rows, ShardedArray) else rows[chosen]


def _blocks(database: Database) -> Iterator[np.ndarray]:
    """The database in pieces that are added to the index one after the other."""
    if isinstance(database, ShardedArray):
        for _, rows in database.blocks():
            yield rows
    else:
        yield database


class SearchIndex:
    """Search over a database of float descriptors (inner product) or packed binary codes (Hamming).

    ``factory`` picks the FAISS index (see the module docstring); the default is exact, ``"auto"`` chooses by
    size (``flat_limit``, ``kind``, ``opq``: see :func:`choose_index`). ``nprobe`` sets the cells visited by
    an IVF index, ``nflip`` the bit flips probed by a multi-hash index; given, they override the auto choice.
    """

    def __init__(self, database: Database, metric: str = "inner_product", use_gpu: str | bool = "auto",
                 factory: str | None = None, train_size: int | None = None, nprobe: int | None = None,
                 nflip: int | None = None, flat_limit: int = DEFAULT_FLAT_LIMIT, kind: str = "ivfpq",
                 opq: bool = False):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        check = (lambda rows: check_codes(rows, "database codes", self.dim)) if metric == "hamming" else \
            (lambda rows: check_vectors(rows, "database descriptors", self.dim))
        self.dim = None  # from the first row; every block added later is checked against it
        first = database.rows(0, 1) if isinstance(database, ShardedArray) else database[:1]
        self.dim = check(first).shape[1]  # bytes per code for packed codes
        if len(database) == 0:
            raise ValueError("cannot index an empty database")
        if factory == "auto":
            self.parameters = choose_index(len(database), self.dim, metric, flat_limit, kind, opq)
        else:
            self.parameters = {"metric": metric, "count": len(database), "dim": self.dim,
                               "factory": factory or DEFAULT_FACTORY[metric]}
        given = {"train_size": train_size, "nprobe": nprobe, "nflip": nflip}
        self.parameters.update({name: value for name, value in given.items() if value is not None})
        self.factory = self.parameters["factory"]
        if metric == "hamming":
            index = self._build(lambda: faiss.index_binary_factory(self.dim * 8, self.factory), "binary")
        else:
            index = self._build(lambda: faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT),
                                "float")
        started = time.perf_counter()
        if not index.is_trained:
            index.train(check(_training_rows(database, self.parameters.get("train_size"))))
        trained = time.perf_counter()
        for rows in _blocks(database):
            index.add(check(rows))
        #: seconds spent training (sample read included) and adding the database
        self.seconds = {"train": trained - started, "add": time.perf_counter() - trained}
        # filled on the CPU, then cloned: every GPU shard shares one quantizer, and FAISS's sharded flat index
        # takes only one add; the CPU copy is compact for IVF-PQ (m bytes a row) and freed after cloning
        self.gpus = 0
        self.index = self._to_gpus(index, use_gpu) if metric == "inner_product" else index
        for name in ("nprobe", "nflip", "efSearch"):
            self._set_parameter(name, self.parameters.get(name))

    def _to_gpus(self, index, use_gpu: str | bool):
        gpus = _gpu_count()
        if use_gpu is True and gpus == 0:
            raise RuntimeError("use_gpu=True but FAISS sees no GPU (is faiss-gpu installed?)")
        if use_gpu not in (True, "auto") or gpus == 0:
            return index
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True  # each GPU holds 1/gpus of the rows (replicas would each hold all of them)
        options.useFloat16 = True  # GPU IVF-PQ needs half-precision lookup tables for many sub-quantizers
        self.gpus = gpus
        log.info("FAISS index sharded over %d GPU(s)", gpus)
        return faiss.index_cpu_to_all_gpus(index, co=options)

    def _build(self, make: Callable[[], object], kind: str):
        try:
            return make()
        except RuntimeError as error:  # drop FAISS's "Error in <C++ signature> at <file:line>: " prefix
            reason = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(error).strip())
            raise UserError(f"FAISS cannot build a {kind} index from factory {self.factory!r}: {reason}") from None

    def _set_parameter(self, name: str, value: int | None) -> None:
        if value is None:
            return
        if self.metric == "hamming":  # binary indexes have no ParameterSpace
            if not hasattr(self.index, name):
                raise ValueError(f"{name} does not apply to {type(self.index).__name__} (factory {self.factory!r})")
            setattr(self.index, name, value)
            return
        # ParameterSpace reaches through an OPQ pre-transform and into every GPU shard
        space = faiss.GpuParameterSpace() if self.gpus else faiss.ParameterSpace()
        try:
            space.set_index_parameter(self.index, name, value)
        except RuntimeError:
            raise ValueError(f"{name} does not apply to {type(faiss.downcast_index(self.index)).__name__} "
                             f"(factory {self.factory!r})") from None

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
