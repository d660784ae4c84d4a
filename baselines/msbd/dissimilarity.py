"""MSBD's dissimilarity (Eq. 7-8): Hamming distance plus a class-level term from softmax probabilities.

    D(I1, I2) = (1 - W) * L1(p1, p2) + Hamming(H1, H2),   W = <p1, p2> * max(p2)

I1 is the query; W estimates the probability that both images belong to one class (the inner product of
their class distributions, weighted by how confident the classifier is about the database image). The
Hamming term is an integer in [0, L], the class term lies in [0, 2]: it mostly orders images at equal
Hamming distance, which is what the paper introduces it for.
"""
from __future__ import annotations

import numpy as np
import torch

from msretrieval.retrieval.search.binary import hamming_distances
from msretrieval.retrieval.search.scores import ScoreSource

#: query rows per dissimilarity computation
_ROWS = 256


def class_dissimilarity(query_probs: torch.Tensor, database_probs: torch.Tensor) -> torch.Tensor:
    """(1 - W) * L1(p1, p2) for every query x database pair: (Q, N)."""
    weight = (query_probs @ database_probs.T) * database_probs.amax(dim=1)[None, :]
    return (1 - weight) * torch.cdist(query_probs, database_probs, p=1)


def msbd_dissimilarity(query_codes: np.ndarray, query_probs, database_codes: np.ndarray, database_probs
                       ) -> torch.Tensor:
    """Eq. 7 for packed codes (uint8) and class probabilities: (Q, N) float64 dissimilarities."""
    query_probs = torch.as_tensor(np.asarray(query_probs), dtype=torch.float64)
    database_probs = torch.as_tensor(np.asarray(database_probs), dtype=torch.float64)
    hamming = torch.from_numpy(hamming_distances(query_codes, database_codes)).double()
    return class_dissimilarity(query_probs, database_probs) + hamming


class DissimilarityScores(ScoreSource):
    """Scores = -D over all database items, computed for a block of query rows at a time."""

    def __init__(self, query_codes: np.ndarray, query_probs: np.ndarray, database_codes: np.ndarray,
                 database_probs: np.ndarray):
        if len(query_codes) != len(query_probs) or len(database_codes) != len(database_probs):
            raise ValueError("codes and class probabilities must have one row per image")
        if np.shape(query_probs)[1] != np.shape(database_probs)[1]:
            raise ValueError(f"class probability sizes differ: {np.shape(query_probs)[1]} vs "
                             f"{np.shape(database_probs)[1]}")
        self.query_codes, self.query_probs = query_codes, query_probs
        self.database_codes, self.database_probs = database_codes, database_probs
        self.num_queries, self.num_database = len(query_codes), len(database_codes)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        # float64 keeps the small class term exact next to Hamming counts; sub-blocks bound cdist's memory
        return torch.cat([-msbd_dissimilarity(self.query_codes[i:min(i + _ROWS, stop)],
                                              self.query_probs[i:min(i + _ROWS, stop)],
                                              self.database_codes, self.database_probs)
                          for i in range(start, stop, _ROWS)])
