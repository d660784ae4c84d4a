"""Ranking metrics from a score source.

Labelled sets (standard AP over the full ranking, mAP@R, Recall@K, AP over the top K) need, for each positive,
only its tie group once junk is removed: how many items score strictly higher and how many score the same
(:func:`tied_positives`). The revisitop metrics (AP with junk, mP@k) need each positive's rank
(:func:`positive_ranks`, :func:`rank_items`). Both are found without an argsort. Tie groups: each query row's
*values* are sorted (NumPy's SIMD sort, several times faster than argsort), and each positive or junk item is
placed in it with a binary search. Ranks: a long row is not sorted at all (:func:`_rank_by_bins`): its values
are counted into fine bins of a monotone map, which gives every item the number of items in higher bins, and
only the few items sharing a bin with a ranked item are compared with it (a short row, or one whose ranked items
share crowded bins, is sorted instead). Rows are processed in bounded blocks on several threads, so memory stays
at one block of scores whatever the database size.

Ties: the labelled metrics are tie-aware: each is its expected value over all orders of tied items (McSherry &
Najork, "Computing information retrieval performance measures efficiently in the presence of tied scores",
ECIR 2008), computed exactly in closed form (see :func:`_expected_precision_sum` and :func:`recall_at_k`).
Breaking ties by database index would reward the database order, and Hamming distances tie massively (a
manifest sorted by class then scores better than a shuffled one). Without ties the values are those of the
single ranking. The revisitop metrics (trapezoid-rule AP and mP@k, as the official revisitop code) are NOT
tie-aware: they rank ties by ascending database index (the order a stable sort gives), exactly; mP@k's cutoff
depends on where the last positive lands, which has no cheap exact expectation, and these benchmarks are
evaluated on float descriptors, where exact ties are rare.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from msretrieval.retrieval.search.scores import ScoreSource

#: Default number of scores held per block (query rows x database), 4 bytes each plus one sorted row per thread.
BLOCK_ELEMENTS = 8_000_000
#: Rows of at least this many items are ranked by binning (:func:`_rank_by_bins`), shorter ones by sorting;
#: bins per row (at most one per item).
BINNED_MIN_ITEMS = 4096
RANK_BINS = 1 << 16


class _PerQuery:
    """Entries grouped by query through ``indptr`` (query ``q`` owns ``indptr[q]:indptr[q + 1]``)."""

    indptr: np.ndarray

    @property
    def num_queries(self) -> int:
        return len(self.indptr) - 1

    @property
    def num_positives(self) -> np.ndarray:
        return np.diff(self.indptr)


@dataclass(frozen=True)
class RankedPositives(_PerQuery):
    """Per query, the 0-based ranks of its positives after junk removal, ascending.

    Query ``q`` owns ``ranks[indptr[q]:indptr[q + 1]]``.
    """

    indptr: np.ndarray
    ranks: np.ndarray

    def query(self, q: int) -> np.ndarray:
        return self.ranks[self.indptr[q]:self.indptr[q + 1]]

    @classmethod
    def from_lists(cls, ranks_per_query: Sequence[Sequence[int]]) -> "RankedPositives":
        lengths = [len(r) for r in ranks_per_query]
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = [np.sort(np.asarray(r, dtype=np.int64)) for r in ranks_per_query]
        ranks = np.concatenate(flat) if flat else np.zeros(0, np.int64)
        return cls(indptr=indptr, ranks=ranks.astype(np.int64))


@dataclass(frozen=True)
class TiedPositives(_PerQuery):
    """Per query, the tie group of each positive once junk is removed: ``above`` items score strictly higher
    than it, ``tied`` items (itself included) score the same.

    Query ``q`` owns entries ``indptr[q]:indptr[q + 1]``, sorted by ``above``, so the positives of one group are
    adjacent. A strict ranking is the case ``tied == 1``, ``above == rank`` (:meth:`from_ranks`).
    """

    indptr: np.ndarray
    above: np.ndarray
    tied: np.ndarray

    @classmethod
    def from_lists(cls, above_per_query: Sequence[Sequence[int]], tied_per_query: Sequence[Sequence[int]]
                   ) -> "TiedPositives":
        if len(above_per_query) != len(tied_per_query):
            raise ValueError(f"{len(above_per_query)} 'above' lists but {len(tied_per_query)} 'tied' lists")
        above = [np.asarray(a, dtype=np.int64).reshape(-1) for a in above_per_query]
        tied = [np.asarray(t, dtype=np.int64).reshape(-1) for t in tied_per_query]
        if any(len(a) != len(t) for a, t in zip(above, tied)):
            raise ValueError("'above' and 'tied' lists differ in length")
        orders = [np.argsort(a, kind="stable") for a in above]
        indptr = np.concatenate([[0], np.cumsum([len(a) for a in above])]).astype(np.int64)
        flat_above = np.concatenate([a[o] for a, o in zip(above, orders)]) if above else np.zeros(0, np.int64)
        flat_tied = np.concatenate([t[o] for t, o in zip(tied, orders)]) if tied else np.zeros(0, np.int64)
        return cls(indptr=indptr, above=flat_above.astype(np.int64), tied=flat_tied.astype(np.int64))

    @classmethod
    def from_ranks(cls, ranked: RankedPositives) -> "TiedPositives":
        return cls(indptr=ranked.indptr, above=ranked.ranks, tied=np.ones_like(ranked.ranks))


# ---------------------------------------------------------------------------------------------------------
# Score rows -> ranks / tie groups, block by block.

def _check_items(items: Sequence[np.ndarray], num_queries: int, num_items: int) -> None:
    if len(items) != num_queries:
        raise ValueError(f"ground truth for {len(items)} queries, scores for {num_queries}")
    for q, ids in enumerate(items):
        if len(ids) and (ids.min() < 0 or ids.max() >= num_items):
            raise ValueError(f"query {q}: ground-truth index out of range [0, {num_items})")


def _map_rows(scores: ScoreSource, function: Callable, per_query_args: Sequence[Sequence],
              block_elements: int, threads: int | None) -> list:
    """``function(row, *args of that query)`` for every query row, in order.

    Query rows are fetched in blocks of about ``block_elements`` scores and processed on ``threads`` threads
    (NumPy's sort releases the GIL).
    """
    num_queries, num_items = scores.shape
    rows_per_block = max(1, block_elements // max(num_items, 1))
    threads = threads or min(os.cpu_count() or 1, 8)
    results: list = []
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
            results += pool.map(function, block, *[args[start:stop] for args in per_query_args])
    return results


def _rank_in_row(row: np.ndarray, items: np.ndarray) -> np.ndarray:
    """0-based rank of ``row[items]`` in the descending order of ``row``, ties by ascending index."""
    if not len(items):
        return np.zeros(0, np.int64)
    if len(row) >= BINNED_MIN_ITEMS:
        ranks = _rank_by_bins(row, items, min(RANK_BINS, len(row)), max_members=len(row) // 8)
        if ranks is not None:
            return ranks
    return _rank_by_sort(row, items)


def _rank_by_bins(row: np.ndarray, items: np.ndarray, bins: int, max_members: int) -> np.ndarray | None:
    """:func:`_rank_in_row` without sorting the row; None (sort instead) for a row that is not float32/64, whose
    values from its lowest ranked item up are all equal (nothing to bin), or whose ranked items share their bins
    with more than ``max_members`` items.

    Each value x gets the bin b(x) = trunc(max(0, (x - lo) * s + 1)), clipped to ``bins`` - 1, with lo the lowest
    ranked item's value and s = (bins - 2) / (max - lo): bin 0 holds everything below lo, bins 1.. split
    [lo, max] evenly. Every step is monotone in floating point (a rounded difference, product or sum of a
    larger value is never smaller; a difference that overflows to -inf lands in bin 0), so x > v implies
    b(x) >= b(v), and b(x) > b(v) implies x > v. An item's rank
    is then the count of items in higher bins (a histogram's cumulative sum) plus its place within its own bin,
    where the few members (the items sharing a bin with a ranked item) are ordered exactly: by value descending,
    ties by index (a stable sort of members listed in index order).
    """
    if row.dtype not in (np.float32, np.float64) or bins < 3:
        return None
    lo, hi = row[items].min(), row.max()
    with np.errstate(over="ignore"):  # an overflow to infinity is caught (span, scale) or harmless (key)
        span = hi - lo
        scale = row.dtype.type((bins - 2) / float(span)) if np.isfinite(span) and span > 0 else np.inf
        if not np.isfinite(scale):
            return None
        key = row - lo
        key *= scale
        key += 1
    np.maximum(key, 0, out=key)
    bin_of = key.astype(np.intp)
    np.minimum(bin_of, bins - 1, out=bin_of)
    above = len(row) - np.cumsum(np.bincount(bin_of, minlength=bins))  # items in higher bins, per bin
    item_bins = bin_of[items]
    shared = np.zeros(bins, dtype=bool)
    shared[item_bins] = True
    members = np.flatnonzero(shared[bin_of])  # ascending index
    if len(members) > max_members:
        return None
    member_bins = bin_of[members]
    order = np.lexsort((-row[members], member_bins))  # by bin, then value descending; stable: ties by index
    place = np.empty(len(members), dtype=np.int64)
    place[order] = np.arange(len(members))
    first_in_bin = np.searchsorted(member_bins[order], item_bins, side="left")
    return (above[item_bins] + place[np.searchsorted(members, items)] - first_in_bin).astype(np.int64)


def _rank_by_sort(row: np.ndarray, items: np.ndarray) -> np.ndarray:
    """:func:`_rank_in_row` by sorting the row's values and placing the items with a binary search."""
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
    items = [np.asarray(i, dtype=np.int64).reshape(-1) for i in items]
    _check_items(items, num_queries, num_items)
    return _map_rows(scores, _rank_in_row, [items], block_elements, threads)


def positive_ranks(scores: ScoreSource, positives: Sequence[np.ndarray], junk: Sequence[np.ndarray] | None = None,
                   block_elements: int = BLOCK_ELEMENTS) -> RankedPositives:
    """Ranks of each query's positives once its junk items are removed from the ranking (ties by index).

    ``positives[q]`` and ``junk[q]`` are database indices; an index in both counts as a positive (as in the
    revisitop code). Scores must be finite.
    """
    junk = junk if junk is not None else [np.zeros(0, np.int64)] * len(positives)
    if len(junk) != len(positives):
        raise ValueError(f"{len(positives)} positive lists but {len(junk)} junk lists")
    num_queries, num_items = scores.shape
    if len(positives) != num_queries:
        raise ValueError(f"ground truth for {len(positives)} queries, scores for {num_queries}")
    positive_keys, junk_keys = _query_keys(positives, num_items), _query_keys(junk, num_items)
    keys = _sorted_unique(np.concatenate([positive_keys, junk_keys]))
    ranks = _rank_keys(scores, keys, block_elements)
    return _ranked_after_junk(keys, ranks, positive_keys, junk_keys, num_queries, num_items)


def _query_keys(lists: Sequence, num_items: int) -> np.ndarray:
    """Each query's distinct database indices as one sorted array of keys ``q * num_items + index`` (query by
    query, indices ascending), so that per-query steps are single array operations over all queries."""
    arrays = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in lists]
    if not arrays:
        return np.zeros(0, np.int64)
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays)
    outside = np.flatnonzero((flat < 0) | (flat >= num_items))
    if len(outside):
        query = int(np.searchsorted(np.cumsum(lengths), outside[0], side="right"))
        raise ValueError(f"query {query}: ground-truth index out of range [0, {num_items})")
    return _sorted_unique(flat + np.repeat(np.arange(len(arrays), dtype=np.int64) * num_items, lengths))


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique of int64 keys by one sort (NumPy 2's hash-based unique is several times slower on these)."""
    values = np.sort(values)
    keep = np.ones(len(values), dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _rank_keys(scores: ScoreSource, keys: np.ndarray, block_elements: int = BLOCK_ELEMENTS) -> np.ndarray:
    """The rank of each key's item in its query's row (keys from :func:`_query_keys`)."""
    num_queries, num_items = scores.shape
    bounds = np.searchsorted(keys, np.arange(num_queries + 1, dtype=np.int64) * num_items)
    per_query = np.split(keys - keys // max(num_items, 1) * num_items, bounds[1:-1])
    ranks = _map_rows(scores, _rank_in_row, [per_query], block_elements, None)
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def _ranked_after_junk(keys: np.ndarray, ranks: np.ndarray, positive_keys: np.ndarray, junk_keys: np.ndarray,
                       num_queries: int, num_items: int) -> RankedPositives:
    """Each query's positive ranks once the junk ranked above them is removed (``ranks[i]``: the rank of
    ``keys[i]``, sorted keys holding every positive and junk key). An item both positive and junk is a positive,
    and as junk it moves up the positives ranked after it (as in the revisitop code)."""
    width = max(num_items, 1)

    def ranked(subset: np.ndarray) -> np.ndarray:  # q * num_items + rank
        return subset - subset % width + ranks[np.searchsorted(keys, subset)]

    positive_ranked, junk_ranked = ranked(positive_keys), np.sort(ranked(junk_keys))
    query_start = positive_keys - positive_keys % width
    junk_above = np.searchsorted(junk_ranked, positive_ranked) - np.searchsorted(junk_ranked, query_start)
    adjusted = np.sort(positive_ranked - junk_above)
    indptr = np.searchsorted(adjusted, np.arange(num_queries + 1, dtype=np.int64) * width).astype(np.int64)
    return RankedPositives(indptr=indptr, ranks=adjusted % width)


def _tie_groups_in_row(row: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each positive, by increasing ``above``: the non-junk items scoring strictly higher (``above``) and
    those scoring the same, itself included (``tied``). ``junk`` must be unique and hold no positive."""
    ascending = np.sort(row)
    values = row[positives]
    above = len(row) - np.searchsorted(ascending, values, side="right")
    above_or_tied = len(row) - np.searchsorted(ascending, values, side="left")
    if len(junk):
        junk_ascending = np.sort(row[junk])
        above -= len(junk) - np.searchsorted(junk_ascending, values, side="right")
        above_or_tied -= len(junk) - np.searchsorted(junk_ascending, values, side="left")
    order = np.argsort(above, kind="stable")
    return above[order], (above_or_tied - above)[order]


def _not_in(items: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """``items`` not in ``sorted_unique`` (a binary search: much cheaper than np.setdiff1d for short lists)."""
    if not len(sorted_unique):
        return items
    found = sorted_unique[np.minimum(np.searchsorted(sorted_unique, items), len(sorted_unique) - 1)] == items
    return items[~found]


def tied_positives(scores: ScoreSource, positives: Sequence[np.ndarray], junk: Sequence[np.ndarray] | None = None,
                   block_elements: int = BLOCK_ELEMENTS, threads: int | None = None) -> TiedPositives:
    """Each query's positives with their tie groups once its junk items are removed (for the tie-aware metrics).

    ``positives[q]`` and ``junk[q]`` are database indices; an index in both counts as a positive. Scores must
    be finite; 0.0 and -0.0 are one tie group.
    """
    junk = junk if junk is not None else [np.zeros(0, np.int64)] * len(positives)
    if len(junk) != len(positives):
        raise ValueError(f"{len(positives)} positive lists but {len(junk)} junk lists")
    positives = [np.unique(np.asarray(p, dtype=np.int64)) for p in positives]
    junk = [_not_in(np.unique(np.asarray(j, dtype=np.int64)), p) for j, p in zip(junk, positives)]
    num_queries, num_items = scores.shape
    _check_items(positives, num_queries, num_items)
    _check_items(junk, num_queries, num_items)
    groups = _map_rows(scores, _tie_groups_in_row, [positives, junk], block_elements, threads)
    indptr = np.concatenate([[0], np.cumsum([len(p) for p in positives])]).astype(np.int64)
    above = np.concatenate([a for a, _ in groups]).astype(np.int64) if groups else np.zeros(0, np.int64)
    tied = np.concatenate([t for _, t in groups]).astype(np.int64) if groups else np.zeros(0, np.int64)
    return TiedPositives(indptr=indptr, above=above, tied=tied)


# ---------------------------------------------------------------------------------------------------------
# Metrics. Queries without positives give NaN and are left out of every mean.

def _positions(ranked: RankedPositives) -> tuple[np.ndarray, np.ndarray]:
    """(query id, 0-based position among the query's positives) for every entry of ``ranked.ranks``."""
    counts = ranked.num_positives
    query_ids = np.repeat(np.arange(ranked.num_queries), counts)
    position = np.arange(len(ranked.ranks)) - ranked.indptr[:-1][query_ids]
    return query_ids, position


def _per_query_sum(ranked: RankedPositives, values: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    return np.bincount(query_ids, weights=values, minlength=ranked.num_queries)


def _with_nan(ranked: RankedPositives | TiedPositives, values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    values[ranked.num_positives == 0] = np.nan
    return values


def _as_tied(positives: RankedPositives | TiedPositives) -> TiedPositives:
    return TiedPositives.from_ranks(positives) if isinstance(positives, RankedPositives) else positives


def _tie_groups(positives: TiedPositives) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every entry: its query, the positives strictly above its group (r) and the positives in it (p)."""
    query_ids = np.repeat(np.arange(positives.num_queries), positives.num_positives)
    # Within a query, one group's positives share ``above`` and are adjacent; distinct groups differ in it.
    starts = np.ones(len(positives.above), dtype=bool)
    starts[1:] = (query_ids[1:] != query_ids[:-1]) | (positives.above[1:] != positives.above[:-1])
    group_ids = np.cumsum(starts) - 1
    relevant_above = np.flatnonzero(starts)[group_ids] - positives.indptr[:-1][query_ids]
    relevant_tied = np.bincount(group_ids)[group_ids]
    return query_ids, relevant_above, relevant_tied


def _harmonic_numbers(n: int) -> np.ndarray:
    """H_0 .. H_n, accumulated in long double so differences of large harmonic numbers keep float64 precision."""
    return np.concatenate([np.zeros(1, np.longdouble), np.cumsum(1 / np.arange(1, n + 1, dtype=np.longdouble))])


def _expected_precision_sum(positives: TiedPositives, cutoff: np.ndarray | None = None) -> np.ndarray:
    """Per query, the expectation over all orders of tied items of the sum of precision@i over the relevant
    1-based positions i <= ``cutoff[q]`` (None: the whole ranking).

    A group with c items and r positives strictly above it holds t items, p of them positives. Each of its
    positions i = c+1 .. c+t is relevant with probability p/t; given that, the group's other p-1 positives
    fill its other t-1 slots uniformly, so the expected number of relevant items at positions <= i is
    r + 1 + (i-c-1) s with s = (p-1)/(t-1) (0 if t = 1). The group adds

        sum_{i=c+1..b} (p/t) (r + 1 + (i-c-1) s) / i = (p/t) [(r + 1 - (c+1) s)(H_b - H_c) + s (b - c)],

    b = min(c+t, cutoff), H the harmonic numbers; each of its p entries carries 1/p of that.
    """
    query_ids, relevant_above, relevant_tied = _tie_groups(positives)
    above, tied = positives.above, positives.tied
    last = above + tied
    if cutoff is not None:
        last = np.maximum(np.minimum(last, cutoff[query_ids]), above)  # a group past the cutoff adds nothing
    harmonic = _harmonic_numbers(int(last.max(initial=0)))
    harmonic_span = (harmonic[last] - harmonic[above]).astype(np.float64)
    slope = (relevant_tied - 1) / np.maximum(tied - 1, 1)
    contribution = ((relevant_above + 1 - (above + 1) * slope) * harmonic_span + slope * (last - above)) / tied
    return np.bincount(query_ids, weights=contribution, minlength=positives.num_queries)


def average_precision(positives: TiedPositives | RankedPositives, k: int | None = None) -> np.ndarray:
    """Standard (non-interpolated) AP, expected over the orders of tied items: mean precision at each positive.

    With ``k``, AP over the top k (the Hamming-ranking mAP@K of deep hashing papers): E[sum of precision at the
    relevant positions <= k] / min(R, k), R = number of positives; ``k`` = None (or >= the database size) is plain
    AP. DeepHash-pytorch's ``CalcTopMap`` divides by the number of positives retrieved in the top k instead (a
    query with none counts as 0). We do not: that denominator is random under ties, so its expectation is that of
    a ratio, which is not linear and has no closed form from per-position expectations; and it scores a query
    whose only retrieved positive comes first as 1 however many positives it missed. min(R, k) is the largest
    sum any ranking reaches, so this AP@K lies in [0, 1], is 1 only for an ideal top k, and is exactly tie-aware
    by linearity.
    """
    positives = _as_tied(positives)
    num_positives = positives.num_positives
    if k is None:
        return _with_nan(positives, _expected_precision_sum(positives) / np.maximum(num_positives, 1))
    if k < 1:
        raise ValueError(f"AP@k needs k >= 1, got {k}")
    cutoff = np.full(positives.num_queries, k, dtype=np.int64)
    total = _expected_precision_sum(positives, cutoff)
    return _with_nan(positives, total / np.maximum(np.minimum(num_positives, k), 1))


def map_at_r(positives: TiedPositives | RankedPositives) -> np.ndarray:
    """mAP@R (Musgrave et al. 2020): precision at each positive within the top R, R = number of positives;
    expected over the orders of tied items."""
    positives = _as_tied(positives)
    num_positives = positives.num_positives
    total = _expected_precision_sum(positives, num_positives)
    return _with_nan(positives, total / np.maximum(num_positives, 1))


def recall_at_k(positives: TiedPositives | RankedPositives, k: int) -> np.ndarray:
    """The metric-learning Recall@K (1 if a positive is among the top k, else 0), expected over the orders of
    tied items: the probability that a positive is among the top k.

    Only the first group holding a positive matters. With c items above it, t items and p positives in it,
    k' = clip(k - c, 0, t) of its slots are in the top k, and they all miss its positives with probability
    C(t-p, k') / C(t, k') = prod_{s < k'} (t-p-s) / (t-s): 1 for k' = 0, 0 for k' = t.
    """
    positives = _as_tied(positives)
    _, _, relevant_tied = _tie_groups(positives)
    has = positives.num_positives > 0
    first = positives.indptr[:-1][has]
    above, tied, relevant = positives.above[first], positives.tied[first], relevant_tied[first]
    slots = np.clip(k - above, 0, tied)
    miss = np.ones(len(first))
    # Drawing the k' slots one by one without replacement; from s = t - p on the factor is 0.
    for s in range(int(np.minimum(slots, tied - relevant + 1).max(initial=0))):
        factor = np.maximum(tied - relevant - s, 0) / np.maximum(tied - s, 1)
        miss *= np.where(s < slots, factor, 1.0)
    recall = np.zeros(positives.num_queries)
    recall[has] = 1 - miss
    return _with_nan(positives, recall)


def revisitop_average_precision(ranked: RankedPositives) -> np.ndarray:
    """AP as in the revisitop code: trapezoid rule (mean of the precisions just before and at each hit)."""
    query_ids, j = _positions(ranked)
    r = ranked.ranks.astype(np.float64)
    before = np.where(r > 0, j / np.maximum(r, 1), 1.0)
    at = (j + 1) / (r + 1)
    total = _per_query_sum(ranked, (before + at) / 2, query_ids)
    return _with_nan(ranked, total / np.maximum(ranked.num_positives, 1))


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
    num_items = scores.shape[1]
    keys = {protocol: tuple(_query_keys(lists, num_items) for lists in truth_by_protocol[protocol])
            for protocol in protocols}
    union = _sorted_unique(np.concatenate([k for pair in keys.values() for k in pair]))
    ranks = _rank_keys(scores, union)
    metrics: dict[str, float] = {}
    for protocol in protocols:
        ranked = _ranked_after_junk(union, ranks, *keys[protocol], num_queries, num_items)
        metrics[f"mAP_{protocol}"] = nan_mean(revisitop_average_precision(ranked))
        for k in ks:
            metrics[f"mP@{k}_{protocol}"] = nan_mean(revisitop_precision_at_k(ranked, k))
    return metrics


def labelled_metrics(scores: ScoreSource, query_labels: np.ndarray, database_labels: np.ndarray,
                     exclude_self: bool = True, ks: Sequence[int] = (1, 2, 4, 8), map_at_k: int | None = None
                     ) -> dict[str, float]:
    """Recall@K, mAP@R and mAP over the full ranking for a labelled set, tie-aware (expected over the orders
    of tied items); with ``map_at_k``, also ``mAP@<map_at_k>`` (AP over the top K, see :func:`average_precision`).

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
    return positive_list_metrics(scores, positives, junk, ks, map_at_k)


def positive_list_metrics(scores: ScoreSource, positives: Sequence[np.ndarray],
                          junk: Sequence[np.ndarray] | None = None, ks: Sequence[int] = (1, 2, 4, 8),
                          map_at_k: int | None = None) -> dict[str, float]:
    """mAP, mAP@R (R = the query's number of positives), optionally mAP@K, and R@k from each query's positive
    (and junk) database indices, tie-aware. Queries without positives are left out of the means."""
    if scores.shape[0] != len(positives):
        raise ValueError(f"scores for {scores.shape[0]} queries, ground truth for {len(positives)}")
    tied = tied_positives(scores, positives, junk)
    metrics = {"mAP": nan_mean(average_precision(tied)), "mAP@R": nan_mean(map_at_r(tied))}
    if map_at_k is not None:
        metrics[f"mAP@{map_at_k}"] = nan_mean(average_precision(tied, k=map_at_k))
    for k in ks:
        metrics[f"R@{k}"] = nan_mean(recall_at_k(tied, k))
    return metrics
