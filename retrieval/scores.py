"""Score sources: query x database similarities produced block by block.

Metrics never need the whole query x database matrix at once; they ask a score source for the rows of a
few queries against the whole database. Higher score = more similar. New kinds of similarity (Hamming,
MSBD's dissimilarity, max over regions) plug in by implementing :meth:`ScoreSource.rows`.
"""
from __future__ import annotations

import numpy as np
import torch


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
