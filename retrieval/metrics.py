"""Ranking metrics from a score source.

Every metric here (revisitop AP with junk and mP@k, standard AP, mAP@R, Recall@K) depends only on where each
positive lands in the ranking once junk is removed. :func:`rank_items` finds exactly those ranks without an
argsort: each query row's *values* are sorted (NumPy's SIMD sort, several times faster than argsort), and
each positive or junk item is placed in it with a binary search. Rows are processed in bounded blocks on
several threads, so memory stays at one block of scores whatever the database size.

Ties: the ranking is descending score, ties broken by ascending database index (the order a stable sort
gives). Ties are resolved exactly.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .scores import ScoreSource

#: Default number of scores held per block (query rows x database), 4 bytes each plus one sorted row per thread.
BLOCK_ELEMENTS = 8_000_000


@dataclass(frozen=True)
class RankedPositives:
    """Per query, the 0-based ranks of its positives after junk removal, ascending.

    Query ``q`` owns ``ranks[indptr[q]:indptr[q + 1]]``.
    """

    indptr: np.ndarray
    ranks: np.ndarray

    @property
    def num_queries(self) -> int:
        return len(self.indptr) - 1

    @property
    def num_positives(self) -> np.ndarray:
        return np.diff(self.indptr)

    def query(self, q: int) -> np.ndarray:
        return self.ranks[self.indptr[q]:self.indptr[q + 1]]

    @classmethod
    def from_lists(cls, ranks_per_query: Sequence[Sequence[int]]) -> "RankedPositives":
        lengths = [len(r) for r in ranks_per_query]
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = [np.sort(np.asarray(r, dtype=np.int64)) for r in ranks_per_query]
        ranks = np.concatenate(flat) if flat else np.zeros(0, np.int64)
        return cls(indptr=indptr, ranks=ranks.astype(np.int64))


def _rank_in_row(row: np.ndarray, items: np.ndarray) -> np.ndarray:
    """0-based rank of ``row[items]`` in the descending order of ``row``, ties by ascending index."""
    ascending = np.sort(row)
    values = row[items]
    right = np.searchsorted(ascending, values, side="right")
    ranks = len(row) - right  # items scoring strictly higher
    tied = right - np.searchsorted(ascending, values, side="left") > 1
    if tied.any():  # exact ties with other items: those with a smaller index come first
        for value in np.unique(values[tied]):
            same_score = np.flatnonzero(row == value)
            selected = values == value
            ranks[selected] += np.searchsorted(same_score, items[selected])
    return ranks.astype(np.int64)


def rank_items(scores: ScoreSource, items: Sequence[np.ndarray], block_elements: int = BLOCK_ELEMENTS,
               threads: int | None = None) -> list[np.ndarray]:
    """For every query ``q``, the 0-based rank of each database index in ``items[q]`` (same order).

    Query rows are fetched in blocks of about ``block_elements`` scores and ranked on ``threads`` threads
    (NumPy's sort releases the GIL).
    """
    num_queries, num_items = scores.shape
    if len(items) != num_queries:
        raise ValueError(f"ground truth for {len(items)} queries, scores for {num_queries}")
    items = [np.asarray(i, dtype=np.int64).reshape(-1) for i in items]
    for q, ids in enumerate(items):
        if len(ids) and (ids.min() < 0 or ids.max() >= num_items):
            raise ValueError(f"query {q}: ground-truth index out of range [0, {num_items})")
    rows_per_block = max(1, block_elements // max(num_items, 1))
    threads = threads or min(os.cpu_count() or 1, 8)
    ranks: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, num_queries, rows_per_block):
            stop = min(num_queries, start + rows_per_block)
            block = scores.rows(start, stop)
            if isinstance(block, torch.Tensor):
                block = block.detach().cpu()
                block = (block.float() if block.dtype in (torch.float16, torch.bfloat16) else block).numpy()
            block = np.asarray(block)
            if not np.isfinite(block).all():
                raise ValueError(f"scores of queries {start}:{stop} contain NaN or infinity")
            ranks += pool.map(_rank_in_row, block, items[start:stop])
    return ranks


def positive_ranks(scores: ScoreSource, positives: Sequence[np.ndarray], junk: Sequence[np.ndarray] | None = None,
                   block_elements: int = BLOCK_ELEMENTS) -> RankedPositives:
    """Ranks of each query's positives once its junk items are removed from the ranking.

    ``positives[q]`` and ``junk[q]`` are database indices; an index in both counts as a positive (as in the
    revisitop code). Scores must be finite.
    """
    junk = junk if junk is not None else [np.zeros(0, np.int64)] * len(positives)
    if len(junk) != len(positives):
        raise ValueError(f"{len(positives)} positive lists but {len(junk)} junk lists")
    positives = [np.unique(np.asarray(p, dtype=np.int64)) for p in positives]
    junk = [np.unique(np.asarray(j, dtype=np.int64)) for j in junk]
    both = rank_items(scores, [np.concatenate([p, j]) for p, j in zip(positives, junk)], block_elements)
    return _drop_junk([r[:len(p)] for r, p in zip(both, positives)], [r[len(p):] for r, p in zip(both, positives)])


def _drop_junk(positive_ranks_per_query: list[np.ndarray], junk_ranks_per_query: list[np.ndarray]
               ) -> RankedPositives:
    """Shift each positive's rank up by the junk ranked before it."""
    adjusted = []
    for pos, junk in zip(positive_ranks_per_query, junk_ranks_per_query):
        adjusted.append(pos - np.searchsorted(np.sort(junk), pos))
    return RankedPositives.from_lists(adjusted)


# ---------------------------------------------------------------------------------------------------------
# Metrics over ranked positives. Queries without positives give NaN and are left out of every mean.

def _positions(ranked: RankedPositives) -> tuple[np.ndarray, np.ndarray]:
    """(query id, 0-based position among the query's positives) for every entry of ``ranked.ranks``."""
    counts = ranked.num_positives
    query_ids = np.repeat(np.arange(ranked.num_queries), counts)
    position = np.arange(len(ranked.ranks)) - ranked.indptr[:-1][query_ids]
    return query_ids, position


def _per_query_sum(ranked: RankedPositives, values: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    return np.bincount(query_ids, weights=values, minlength=ranked.num_queries)


def _with_nan(ranked: RankedPositives, values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    values[ranked.num_positives == 0] = np.nan
    return values


def revisitop_average_precision(ranked: RankedPositives) -> np.ndarray:
    """AP as in the revisitop code: trapezoid rule (mean of the precisions just before and at each hit)."""
    query_ids, j = _positions(ranked)
    r = ranked.ranks.astype(np.float64)
    before = np.where(r > 0, j / np.maximum(r, 1), 1.0)
    at = (j + 1) / (r + 1)
    total = _per_query_sum(ranked, (before + at) / 2, query_ids)
    return _with_nan(ranked, total / np.maximum(ranked.num_positives, 1))


def average_precision(ranked: RankedPositives) -> np.ndarray:
    """Standard (non-interpolated) AP over the full ranking: mean precision at each positive."""
    query_ids, j = _positions(ranked)
    total = _per_query_sum(ranked, (j + 1) / (ranked.ranks + 1.0), query_ids)
    return _with_nan(ranked, total / np.maximum(ranked.num_positives, 1))


def map_at_r(ranked: RankedPositives) -> np.ndarray:
    """mAP@R (Musgrave et al. 2020): precision at each positive within the top R, R = number of positives."""
    query_ids, j = _positions(ranked)
    num_pos = ranked.num_positives
    inside = ranked.ranks < num_pos[query_ids]
    total = _per_query_sum(ranked, np.where(inside, (j + 1) / (ranked.ranks + 1.0), 0.0), query_ids)
    return _with_nan(ranked, total / np.maximum(num_pos, 1))


def recall_at_k(ranked: RankedPositives, k: int) -> np.ndarray:
    """1 if a positive is among the top k, else 0 (the metric-learning Recall@K)."""
    first = np.full(ranked.num_queries, np.iinfo(np.int64).max)
    has = ranked.num_positives > 0
    first[has] = ranked.ranks[ranked.indptr[:-1][has]]
    return _with_nan(ranked, (first < k).astype(np.float64))


def revisitop_precision_at_k(ranked: RankedPositives, k: int) -> np.ndarray:
    """mP@k of the revisitop code: precision at min(k, rank of the last positive + 1)."""
    query_ids, _ = _positions(ranked)
    has = ranked.num_positives > 0
    last = np.zeros(ranked.num_queries, dtype=np.int64)
    last[has] = ranked.ranks[ranked.indptr[1:][has] - 1] + 1
    cutoff = np.maximum(np.minimum(last, k), 1)
    hits = _per_query_sum(ranked, (ranked.ranks + 1 <= cutoff[query_ids]).astype(np.float64), query_ids)
    return _with_nan(ranked, hits / cutoff)


def nan_mean(values: np.ndarray) -> float:
    """Mean over queries that have positives (NaN if none has)."""
    values = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(values)
    return float(values[valid].mean()) if valid.any() else float("nan")


# ---------------------------------------------------------------------------------------------------------
# Benchmark protocols.

def revisitop_metrics(scores: ScoreSource, truth_by_protocol: dict[str, tuple[list, list]],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``mAP_<protocol>`` and ``mP@k_<protocol>`` for each protocol's (positives, junk) lists.

    The protocols share their images (easy, hard, junk), so each query's ranking is computed once.
    """
    protocols = list(truth_by_protocol)
    if not protocols:
        return {}
    num_queries = scores.shape[0]
    for protocol in protocols:
        if any(len(lists) != num_queries for lists in truth_by_protocol[protocol]):
            raise ValueError(f"protocol {protocol}: ground truth for a different number of queries than {num_queries}")
    union = [np.unique(np.concatenate([np.asarray(lst[q], dtype=np.int64).reshape(-1)
                                       for p in protocols for lst in truth_by_protocol[p]]))
             for q in range(num_queries)]
    union_ranks = rank_items(scores, union)
    metrics: dict[str, float] = {}
    for protocol in protocols:
        positives, junk = truth_by_protocol[protocol]
        def ranks_of(q: int, ids) -> np.ndarray:
            return union_ranks[q][np.searchsorted(union[q], np.unique(np.asarray(ids, np.int64)))]

        ranked = _drop_junk([ranks_of(q, positives[q]) for q in range(num_queries)],
                            [ranks_of(q, junk[q]) for q in range(num_queries)])
        metrics[f"mAP_{protocol}"] = nan_mean(revisitop_average_precision(ranked))
        for k in ks:
            metrics[f"mP@{k}_{protocol}"] = nan_mean(revisitop_precision_at_k(ranked, k))
    return metrics


def labelled_metrics(scores: ScoreSource, query_labels: np.ndarray, database_labels: np.ndarray,
                     exclude_self: bool = True, ks: Sequence[int] = (1, 2, 4, 8)) -> dict[str, float]:
    """Recall@K, mAP@R and mAP over the full ranking for a labelled set.

    With ``exclude_self`` the queries are the database (leave-one-out): each query's own entry is junk.
    """
    query_labels = np.asarray(query_labels)
    database_labels = np.asarray(database_labels)
    order = np.argsort(database_labels, kind="stable")
    sorted_labels = database_labels[order]
    lo = np.searchsorted(sorted_labels, query_labels, side="left")
    hi = np.searchsorted(sorted_labels, query_labels, side="right")
    positives = [order[a:b] for a, b in zip(lo, hi)]
    junk = None
    if exclude_self:
        if len(query_labels) != len(database_labels):
            raise ValueError("exclude_self needs queries == database")
        positives = [p[p != q] for q, p in enumerate(positives)]
        junk = [np.array([q]) for q in range(len(query_labels))]
    ranked = positive_ranks(scores, positives, junk)
    metrics = {"mAP": nan_mean(average_precision(ranked)), "mAP@R": nan_mean(map_at_r(ranked))}
    for k in ks:
        metrics[f"R@{k}"] = nan_mean(recall_at_k(ranked, k))
    return metrics
