"""Exact top-k search over a sharded database, one shard at a time.

A flat index over the whole database would hold all of it in memory (its own copy: as much RAM as the
descriptors take on disk). Searching each shard with a flat index of that shard alone and merging the
per-shard top-k gives the same answer with only one shard in memory at a time (its memory map plus the
index's copy) and a (queries x k) running result, so peak memory does not grow with the database. The price
is that every search reads the whole database from disk (or the page cache) again: this is the exact
reference for large databases, not a serving index (see ``SearchIndex(factory="auto")``).
"""
from __future__ import annotations

import logging

import numpy as np

from .index import SearchIndex, faiss_gpu_count
from .shards import ShardedArray

log = logging.getLogger(__name__)


def merge_top_k(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of several candidate lists laid side by side, best first, equal scores in ascending index
    (a fixed rule, so the merge does not depend on the shard order); missing candidates (-1) come last."""
    ranked_scores = np.where(indices < 0, -np.inf, scores)
    order = np.lexsort((np.where(indices < 0, np.iinfo(np.int64).max, indices), -ranked_scores), axis=1)[:, :k]
    return np.take_along_axis(ranked_scores, order, 1), np.take_along_axis(indices, order, 1)


def exact_search(queries: np.ndarray, database: ShardedArray | np.ndarray, k: int, metric: str = "inner_product",
                 use_gpu: str | bool = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each (Q, min(k, N)), best first: the exact top k of every query over all shards
    (scores are inner products, or negated Hamming distances). ``use_gpu``: as :class:`SearchIndex`'s, decided
    once for every shard."""
    if use_gpu == "auto" and metric == "inner_product":  # one log line, not one per shard
        use_gpu = faiss_gpu_count() > 0
        log.info("exact search shard by shard on the %s", "GPU" if use_gpu else "CPU (FAISS sees no GPU)")
    blocks = database.blocks() if isinstance(database, ShardedArray) else [(0, database)]
    best_scores = best_indices = None
    for start, rows in blocks:
        scores, indices = SearchIndex(rows, metric, use_gpu=use_gpu).search(queries, k)
        indices = np.where(indices >= 0, indices + start, -1)
        if best_scores is not None:  # merged after every shard: the running result stays (Q, k)
            scores = np.concatenate([best_scores, scores], axis=1)
            indices = np.concatenate([best_indices, indices], axis=1)
        best_scores, best_indices = merge_top_k(scores, indices, k)
    return best_scores, best_indices
