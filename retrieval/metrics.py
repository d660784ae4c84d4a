"""Ranking metrics from a score source, without sorting the database.

Every metric here (revisitop AP with junk and mP@k, standard AP, mAP@R, Recall@K) depends only on where each
positive lands in the ranking once junk is removed. :func:`positive_ranks` finds exactly those ranks by
counting, for each positive and junk item, how many database items beat it: the per-query scores of the
positives and junk become sorted thresholds, every database score is placed among them with one
``searchsorted`` and the counts are histogrammed. That is O(N log P) per query instead of the O(N log N)
full sort, and memory stays at a few bytes per score of one block of queries.

Ties: the ranking is descending score, ties broken by ascending database index (the order a stable sort
gives). Ties are resolved exactly, not approximately.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .scores import ScoreSource

#: Default number of scores held per block (query rows x database); about 13 bytes each in flight.
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


def _to_csr(lists: Sequence[np.ndarray], start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local query ids and item ids of ``lists[start:stop]`` (each list de-duplicated)."""
    items = [np.unique(np.asarray(lists[q], dtype=np.int64)) for q in range(start, stop)]
    counts = [len(i) for i in items]
    query_ids = np.repeat(np.arange(stop - start, dtype=np.int64), counts)
    flat = np.concatenate(items) if items else np.zeros(0, np.int64)
    return torch.from_numpy(query_ids), torch.from_numpy(flat.astype(np.int64))


def _ranks_in_block(block: torch.Tensor, query_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of each (query, item) target among all items of its row (descending, ties by index).

    ``block`` is (Q, N); targets are given as flat (query_ids, item_ids) with no duplicate pairs.
    """
    num_rows, num_items = block.shape
    if len(query_ids) == 0:
        return torch.zeros(0, dtype=torch.int64)
    target_scores = block[query_ids, item_ids]
    per_row = torch.bincount(query_ids, minlength=num_rows)
    width = int(per_row.max())
    # Sorted thresholds per row, padded with +inf (which no finite score exceeds).
    thresholds = torch.full((num_rows, width), float("inf"), dtype=block.dtype)
    row_start = torch.cumsum(per_row, 0) - per_row
    order = torch.argsort(target_scores, stable=True)  # by score ...
    order = order[torch.argsort(query_ids[order], stable=True)]  # ... within row
    slot = torch.arange(len(order)) - row_start[query_ids[order]]
    thresholds[query_ids[order], slot] = target_scores[order]
    target_slot = torch.empty_like(slot)
    target_slot[order] = slot

    # Number of thresholds strictly below each score; a score beats threshold k iff it exceeds k.
    below = torch.searchsorted(thresholds, block, out_int32=True)
    offsets = (torch.arange(num_rows, dtype=torch.int64) * (width + 1)).unsqueeze(1)
    histogram = torch.bincount((below + offsets).reshape(-1), minlength=num_rows * (width + 1))
    histogram = histogram.reshape(num_rows, width + 1)
    # beats[q, k] = items whose score exceeds threshold k = sum of histogram bins above k.
    beats = histogram.flip(1).cumsum(1).flip(1)[:, 1:]
    greater = beats[query_ids, target_slot]

    # Exact ties: items whose score equals a threshold, ordered by index inside each (row, score) group.
    candidate = thresholds.gather(1, below.clamp(max=width - 1).long())
    tied_rows, tied_items = torch.nonzero((below < width) & (block == candidate), as_tuple=True)
    tied_scores = block[tied_rows, tied_items]
    # nonzero is row-major, so (row, item) is already sorted; stable sorts add score as the middle key.
    order = torch.argsort(tied_scores, stable=True)
    order = order[torch.argsort(tied_rows[order], stable=True)]
    rows_sorted, scores_sorted = tied_rows[order], tied_scores[order]
    new_group = torch.ones(len(order), dtype=torch.bool)
    new_group[1:] = (rows_sorted[1:] != rows_sorted[:-1]) | (scores_sorted[1:] != scores_sorted[:-1])
    position = torch.arange(len(order))
    group_start = torch.cummax(torch.where(new_group, position, torch.zeros_like(position)), 0).values
    ties_before = torch.empty_like(position)
    ties_before[order] = position - group_start
    # Locate each target among the tied entries (it ties with itself) by its (row, item) key.
    tied_keys = tied_rows * num_items + tied_items
    target_keys = query_ids * num_items + item_ids
    return greater + ties_before[torch.searchsorted(tied_keys, target_keys)]


def positive_ranks(scores: ScoreSource, positives: Sequence[np.ndarray], junk: Sequence[np.ndarray] | None = None,
                   block_elements: int = BLOCK_ELEMENTS) -> RankedPositives:
    """Ranks of each query's positives once its junk items are removed from the ranking.

    ``positives[q]`` and ``junk[q]`` are database indices; an index in both counts as a positive (as in the
    revisitop code). Scores must be finite.
    """
    num_queries, num_items = scores.shape
    if len(positives) != num_queries or (junk is not None and len(junk) != num_queries):
        raise ValueError(f"ground truth for {len(positives)} queries, scores for {num_queries}")
    junk = junk if junk is not None else [np.zeros(0, np.int64)] * num_queries
    rows_per_block = max(1, block_elements // max(num_items, 1))
    all_ranks: list[np.ndarray] = []
    counts = np.zeros(num_queries, dtype=np.int64)
    for start in range(0, num_queries, rows_per_block):
        stop = min(num_queries, start + rows_per_block)
        block = scores.rows(start, stop)
        if not torch.isfinite(block).all():
            raise ValueError(f"scores of queries {start}:{stop} contain NaN or infinity")
        pos_q, pos_i = _to_csr(positives, start, stop)
        junk_q, junk_i = _to_csr(junk, start, stop)
        for ids in (pos_i, junk_i):
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= num_items):
                raise ValueError(f"ground-truth index out of range [0, {num_items})")
        # Rank positives and junk together (the union, so an item in both is ranked once).
        all_q = torch.cat([pos_q, junk_q])
        all_i = torch.cat([pos_i, junk_i])
        keys = all_q * num_items + all_i
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        unique_ranks = _ranks_in_block(block, unique_keys // num_items, unique_keys % num_items)
        ranks = unique_ranks[inverse]
        pos_rank, junk_rank = ranks[:len(pos_q)], ranks[len(pos_q):]
        # Junk ahead of a positive: count junk keys (row, rank) below the positive's key in the same row.
        junk_keys = torch.sort(junk_q * num_items + junk_rank).values
        pos_keys = pos_q * num_items + pos_rank
        junk_ahead = torch.searchsorted(junk_keys, pos_keys) - torch.searchsorted(junk_keys, pos_q * num_items)
        adjusted = pos_rank - junk_ahead
        order = torch.argsort(pos_q * num_items + adjusted)
        all_ranks.append(adjusted[order].numpy())
        counts[start:stop] = torch.bincount(pos_q, minlength=stop - start).numpy()
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ranks = np.concatenate(all_ranks) if all_ranks else np.zeros(0, np.int64)
    return RankedPositives(indptr=indptr, ranks=ranks.astype(np.int64))


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
    """``mAP_<protocol>`` and ``mP@k_<protocol>`` for each protocol's (positives, junk) lists."""
    metrics: dict[str, float] = {}
    for protocol, (positives, junk) in truth_by_protocol.items():
        ranked = positive_ranks(scores, positives, junk)
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
