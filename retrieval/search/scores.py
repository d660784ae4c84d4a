"""Score sources: query x database similarities produced block by block.

Metrics never need the whole query x database matrix at once; they ask a score source for the rows of a
few queries against the whole database. Higher score = more similar. New kinds of similarity (Hamming,
MSBD's dissimilarity, max over regions) plug in by implementing :meth:`ScoreSource.rows`.

:meth:`ScoreSource.top_k` is the search that goes with the scores: the k best database items of every query,
exactly as the rows rank them, equal scores in ascending database index. A source whose similarity FAISS
computes bit for bit (Hamming counts) overrides it with a faster index search that keeps that rule; FAISS's
float inner products are not bit for bit torch's, so float sources keep the exact blockwise search. Float
sums can also differ in the last bit between row blocks of different sizes (BLAS picks kernels by size), so
scores closer than rounding may order differently in rows fetched in other blocks.
"""
from __future__ import annotations

import numpy as np
import torch

#: bound on the query x database scores held at once by :meth:`ScoreSource.top_k`
_SEARCH_BLOCK_ELEMENTS = 1 << 22


def as_tensor(array) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))


class ScoreSource:
    """Base class: ``num_queries`` x ``num_database`` similarities, served by query rows."""

    num_queries: int
    num_database: int

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Float tensor (stop - start, num_database): scores of queries ``start:stop`` against all items."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_queries, self.num_database

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices), each (num_queries, min(k, num_database)), best first, equal scores in ascending
        database index: exactly the ranking of :meth:`rows`, computed a block of query rows at a time."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if self.num_database == 0:
            raise ValueError("cannot search an empty database")
        k = min(k, self.num_database)
        step = max(1, _SEARCH_BLOCK_ELEMENTS // self.num_database)
        blocks = [top_k_rows(as_tensor(self.rows(start, min(start + step, self.num_queries))).detach().cpu(), k)
                  for start in range(0, self.num_queries, step)]
        if not blocks:  # no queries
            return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
        return torch.cat([b[0] for b in blocks]).numpy(), torch.cat([b[1] for b in blocks]).numpy()


def top_k_rows(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores of every row and their column indices, best first; equal scores in ascending column
    order (torch.topk alone leaves the order of ties, and which tied items make the cut, unspecified)."""
    if torch.isnan(rows).any():
        raise ValueError("scores contain NaN: the ranking is undefined")
    kth = torch.topk(rows, k, dim=1).values[:, -1:]
    above = rows > kth
    tied = rows == kth
    # every score above the k-th makes the cut; the remaining places go to the first items tied with it
    places = k - above.sum(dim=1, keepdim=True)
    keep = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= places))
    indices = keep.nonzero()[:, 1].view(len(rows), k)  # ascending column within each row
    scores = rows.gather(1, indices)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores.gather(1, order), indices.gather(1, order)


class DenseScores(ScoreSource):
    """An existing similarity matrix (numpy or torch), queries x database."""

    def __init__(self, matrix):
        self.matrix = as_tensor(matrix)
        if not self.matrix.is_floating_point():
            # rows() promises floats; integer scores (e.g. Hamming counts) otherwise break the metrics.
            self.matrix = self.matrix.double()
        if self.matrix.ndim != 2:
            raise ValueError(f"similarity matrix must be 2-D, got shape {tuple(self.matrix.shape)}")
        self.num_queries, self.num_database = self.matrix.shape

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.matrix[start:stop]


class InnerProductScores(ScoreSource):
    """Inner products of float descriptors (cosine similarity for L2-normalised ones)."""

    def __init__(self, queries, database):
        self.queries = as_tensor(queries).float()
        self.database = as_tensor(database).float()
        if self.queries.ndim != 2 or self.database.ndim != 2 or self.queries.shape[1] != self.database.shape[1]:
            raise ValueError(f"descriptor shapes do not match: queries {tuple(self.queries.shape)}, "
                             f"database {tuple(self.database.shape)}")
        self.num_queries, self.num_database = len(self.queries), len(self.database)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.queries[start:stop] @ self.database.T
