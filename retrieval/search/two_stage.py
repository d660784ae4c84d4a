"""Two-stage search: a shortlist from binary codes held in memory, re-ranked by float descriptors on disk.

Stage 1 ranks the database by its packed codes and keeps every query's best ``shortlist`` (R) items, equal
scores in ascending database index:

- Hamming distance (FAISS's exact binary index, built once) of the queries' codes;
- asymmetric scores (:class:`~retrieval.search.binary.AsymmetricScores`): the queries' float projections
  against the codes, over the whole database (exact, but a float product per code);
- asymmetric scores by FAISS's fast scan (``fast_scan=True``, :class:`~retrieval.search.fast_scan.AsymmetricFastScan`):
  the same order up to 8-bit lookup tables (near-equal scores may swap), a third to a half of the time of a
  Hamming scan of the same codes at a million items. The asymmetric order puts the float neighbours much nearer the top
  than Hamming distance does, so the same recall needs a much smaller R (fewer rows read from disk).

Stage 2 reads the R rows of the float descriptors and ranks them exactly by inner product, equal scores in
ascending database index. Only the codes (N x bits / 8 bytes) are held in memory.

**Floats on disk.** A ``.npy`` path or a :class:`~retrieval.search.shards.ShardedArray` is read row by row with
positional reads (:class:`~retrieval.search.disk_rows.DiskRows`): nothing of the file is mapped into the
process, whose resident set stays at the codes plus one chunk of rows (queries go in chunks of at most
``_RERANK_BLOCK_ELEMENTS`` candidate floats). An array (in memory, or memory-mapped by the caller) is indexed
directly: tests and small sets.

Items outside a query's shortlist get no float score: :class:`RerankScores` (the two-stage ranking as a score
source, for metrics over the whole database) ranks them after every shortlisted item, in stage 1's order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .binary import AsymmetricScores, HammingScores
from .disk_rows import DiskRows
from .fast_scan import AsymmetricFastScan
from .index import SearchIndex
from .scores import ScoreSource, top_k_rows
from .shards import ShardedArray

#: bound on the candidate float elements (queries x shortlist x dims) read at once: 4 MiB of float32, small
#: beside the codes of a large database (8 MB for a million 64-bit codes), which is what the index should cost
_RERANK_BLOCK_ELEMENTS = 1 << 20
#: bound on the shortlisted indices (queries x shortlist) held at once: 2 MiB of int64
_SHORTLIST_BLOCK_ELEMENTS = 1 << 18


class TwoStageIndex:
    """Packed ``codes`` (N, bits / 8) in memory, float descriptors ``floats`` (N, D) on disk (a ``.npy`` path or
    a :class:`ShardedArray`; an array is indexed as it is); :meth:`search` shortlists ``shortlist`` items by
    Hamming distance, or with ``asymmetric`` by the queries' projections against the codes (exactly, or with
    ``fast_scan`` by FAISS's fast scan), and re-ranks them by the floats."""

    def __init__(self, codes: np.ndarray, floats: np.ndarray | ShardedArray | str | Path, shortlist: int,
                 asymmetric: bool = False, fast_scan: bool = False):
        if shortlist < 1:
            raise ValueError(f"the shortlist needs at least 1 item, got {shortlist}")
        if fast_scan and not asymmetric:
            raise ValueError("fast_scan computes asymmetric scores: it needs asymmetric=True")
        self.codes = np.ascontiguousarray(codes, dtype=np.uint8)
        self.floats = DiskRows(floats) if isinstance(floats, (str, Path, ShardedArray)) else floats
        if self.codes.ndim != 2 or len(self.floats.shape) != 2 or len(self.floats) != len(self.codes):
            raise ValueError(f"codes {self.codes.shape} and float descriptors {tuple(self.floats.shape)} must be "
                             f"2-D with one row per item")
        if len(self.codes) == 0:
            raise ValueError("cannot search an empty database")
        self.shortlist = min(shortlist, len(self.codes))
        self.asymmetric, self.fast_scan = asymmetric, fast_scan
        self.dim = int(self.floats.shape[1])
        self._hamming = self._fast_scan = None
        if fast_scan:
            self._fast_scan = AsymmetricFastScan(self.codes)
        elif not asymmetric:
            self._hamming = SearchIndex(self.codes, "hamming")
            # FAISS's counting-sort selection: twice as fast as its heap for shortlists of hundreds, with the same
            # neighbours in the same order (ties in ascending index; tests/retrieval/test_two_stage_search.py)
            self._hamming.index.use_heap = False

    def __len__(self) -> int:
        return len(self.codes)

    def first_stage(self, queries: np.ndarray) -> ScoreSource:
        """Stage 1's scores of ``queries`` (packed codes, or float projections if asymmetric)."""
        return AsymmetricScores(queries, self.codes) if self.asymmetric else HammingScores(queries, self.codes)

    def candidates(self, queries: np.ndarray) -> np.ndarray:
        """(Q, R) database rows: every query's shortlist, best first by stage 1."""
        if self._hamming is not None:
            return self._hamming.search(queries, self.shortlist)[1]
        if self._fast_scan is not None:
            return self._fast_scan.search(queries, self.shortlist)[1]
        return self.first_stage(queries).top_k(self.shortlist)[1]

    def rerank(self, query_floats: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(candidates in ascending row order, their inner products with ``query_floats``), both (Q, R).
        The chunk's distinct rows are read once and scored against its queries in one matrix product (BLAS may
        round the last bit differently for another chunk, as every float score source here)."""
        candidates = np.sort(np.asarray(candidates, dtype=np.int64), axis=1)
        rows = np.unique(candidates)
        query_floats = np.asarray(query_floats, dtype=np.float32)
        if query_floats.shape != (len(candidates), self.dim):
            raise ValueError(f"query float descriptors {query_floats.shape} do not match {len(candidates)} queries "
                             f"of {self.dim}-d database descriptors")
        products = self._read(rows) @ query_floats.T  # (distinct rows, queries)
        positions = np.searchsorted(rows, candidates)
        return candidates, np.take_along_axis(products.T, positions, 1).astype(np.float32, copy=False)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """The float descriptors of ``rows`` (ascending) copied into memory."""
        if isinstance(self.floats, DiskRows):
            return self.floats.take(rows).astype(np.float32, copy=False)
        return np.asarray(self.floats[rows], dtype=np.float32)

    def search(self, queries: np.ndarray, query_floats: np.ndarray, k: int, chunk: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices), each (Q, min(k, shortlist)), best first: the float inner products of each query's
        ``k`` best shortlisted items, equal scores in ascending database index. ``queries``: packed codes (or
        float projections if asymmetric); ``query_floats``: (Q, D) float descriptors."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, self.shortlist)
        chunk = chunk or max(1, _RERANK_BLOCK_ELEMENTS // (self.shortlist * self.dim))
        scores = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        # stage 1 for many queries per call (FAISS scans the codes once per call, not once per query chunk),
        # stage 2 a chunk at a time (its rows are what the process holds)
        stage_one = max(chunk, _SHORTLIST_BLOCK_ELEMENTS // self.shortlist)
        for first in range(0, len(queries), stage_one):
            last = min(first + stage_one, len(queries))
            shortlists = self.candidates(queries[first:last])
            for start in range(first, last, chunk):
                stop = min(start + chunk, last)
                candidates, reranked = self.rerank(query_floats[start:stop], shortlists[start - first:stop - first])
                order = np.lexsort((candidates, -reranked), axis=1)[:, :k]
                scores[start:stop] = np.take_along_axis(reranked, order, 1)
                indices[start:stop] = np.take_along_axis(candidates, order, 1)
        return scores, indices


class RerankScores(ScoreSource):
    """The two-stage ranking of ``queries`` (with float descriptors ``query_floats``) over ``index``'s whole
    database: a shortlisted item scores its float inner product; the others score below every shortlisted item
    of the query (the lowest minus 1), shifted by their stage-1 scores (Hamming, or asymmetric over the whole
    database) so they keep that order (and its ties). :meth:`top_k` is :meth:`TwoStageIndex.search` for k up to
    the shortlist."""

    def __init__(self, index: TwoStageIndex, queries: np.ndarray, query_floats: np.ndarray):
        self.index, self.queries = index, queries
        self.query_floats = np.asarray(query_floats, dtype=np.float32)
        if len(self.query_floats) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(self.query_floats)} query float descriptors")
        self.num_queries, self.num_database = len(queries), len(index)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        queries = self.queries[start:stop]
        first = torch.as_tensor(self.index.first_stage(queries).rows(0, stop - start)).float()
        shortlists = (self.index.candidates(queries) if self.index.fast_scan
                      else top_k_rows(first, self.index.shortlist)[1].numpy())
        candidates, reranked = self.index.rerank(self.query_floats[start:stop], shortlists)
        reranked = torch.from_numpy(reranked)
        below = reranked.min(dim=1, keepdim=True).values - 1 - first.max(dim=1, keepdim=True).values
        return (first + below).scatter_(1, torch.from_numpy(candidates), reranked)

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > self.index.shortlist:
            return super().top_k(k)
        return self.index.search(self.queries, self.query_floats, k)
