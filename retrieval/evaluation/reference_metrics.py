"""Slow, obviously-correct metrics written straight from the protocol descriptions.

The oracle for tests and the baseline for ``scripts/bench_metrics.py``. Revisitop: the steps of the revisitop
evaluation code - one argsort of the (database x queries) similarity matrix along its database axis, then per
query and protocol the positions of positives and junk found by membership tests along the ranking, positives
moved up by the junk above them, and the trapezoid AP and mP@k with that code's arithmetic (:func:`revisitop_ap`);
with ``stable=True`` ties are ranked by index, as :mod:`retrieval.evaluation.metrics` does. The labelled metrics are
expectations over the orders of tied items, from pairwise relevance probabilities (O(N^2) per query). Do not use
it for real evaluations; :mod:`retrieval.evaluation.metrics` gives the same values much faster.
"""
from __future__ import annotations

import math

import numpy as np


def ranking(scores_row: np.ndarray, stable: bool = True) -> np.ndarray:
    """Database indices by descending score; ``stable``: ties by ascending index (else NumPy's default
    quicksort, as the revisitop code uses, which orders ties arbitrarily)."""
    return np.argsort(-np.asarray(scores_row), kind="stable" if stable else None)


def ranks_by_column(similarity: np.ndarray, stable: bool = False) -> np.ndarray:
    """The revisitop evaluation's ranks: for a (database x queries) similarity matrix (its layout, X^T Q), each
    column's database indices by descending similarity, from one argsort along axis 0 with NumPy's default kind
    (as the revisitop code; ties in the sort's arbitrary order) or, ``stable``, ties by ascending index."""
    return np.argsort(-np.asarray(similarity), axis=0, kind="stable" if stable else None)


def positive_ranks_after_junk(order: np.ndarray, positives, junk) -> np.ndarray:
    positions_pos = np.flatnonzero(np.isin(order, positives))
    positions_junk = np.flatnonzero(np.isin(order, junk))
    # Shift each positive up by the number of junk items ranked before it.
    return positions_pos - np.searchsorted(positions_junk, positions_pos)


def revisitop_ap(ranks: np.ndarray, num_positives: int) -> float:
    """Trapezoid-rule AP of ascending 0-based positive ranks with the revisitop code's arithmetic: each hit adds
    the mean of the precisions just before and at it times the recall step 1 / ``num_positives``."""
    recall_step = 1.0 / num_positives
    ap = 0.0
    for j, rank in enumerate(ranks):
        precision_before = 1.0 if rank == 0 else float(j) / rank
        precision_at = float(j + 1) / (rank + 1)
        ap += (precision_before + precision_at) * recall_step / 2.0
    return ap


def revisitop_precision(ranks: np.ndarray, k: int) -> float:
    one_based = ranks + 1
    cutoff = min(int(one_based.max()), k)
    return float((one_based <= cutoff).sum()) / cutoff


def revisitop_protocol(ranks: np.ndarray, positives, junk, ks=(1, 5, 10)):
    """(mAP, mP@ks, per-query AP) of one protocol's (positives, junk) lists from :func:`ranks_by_column`, query by
    query; a query without positives is NaN and left out of the means. The AP divides by the number of distinct
    positives (the revisitop code divides by the list's length: the same for its duplicate-free lists)."""
    aps, prs = [], []
    for q in range(ranks.shape[1]):
        if len(positives[q]) == 0:
            aps.append(np.nan)
            prs.append([np.nan] * len(ks))
            continue
        found = positive_ranks_after_junk(ranks[:, q], positives[q], junk[q])
        aps.append(revisitop_ap(found, len(np.unique(positives[q]))))
        prs.append([revisitop_precision(found, k) for k in ks])
    aps, prs = np.array(aps), np.array(prs).reshape(len(aps), len(ks))
    return np.nanmean(aps), np.nanmean(prs, axis=0), aps


def revisitop_evaluate(scores: np.ndarray, positives, junk, ks=(1, 5, 10)):
    """(mAP, mP@ks, per-query AP) of the revisitop protocol for one (positives, junk) truth and a (queries x
    database) score matrix, ties by index."""
    return revisitop_protocol(ranks_by_column(np.asarray(scores).T, stable=True), positives, junk, ks)


def expected_relevance(scores_row: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over all orders of tied items, for the ranking by descending score: P(positions i and j are both
    relevant) (P(i relevant) on the diagonal), and each position's tie group (0 = best).

    Within a tie group of t items holding p relevant ones, every set of p slots is equally likely: one slot is
    relevant with probability p/t, two distinct slots with p(p-1)/(t(t-1)); slots of different groups are
    independent.
    """
    scores_row = np.asarray(scores_row, dtype=np.float64)
    order = ranking(scores_row)
    distinct, group = np.unique(-scores_row[order], return_inverse=True)  # ascending -score: best group first
    size = np.bincount(group, minlength=len(distinct)).astype(np.float64)
    hits = np.bincount(group, weights=relevant[order], minlength=len(distinct))
    single = (hits / size)[group]
    pair_same = (hits * (hits - 1) / np.maximum(size * (size - 1), 1))[group]
    same_group = group[:, None] == group[None, :]
    both = np.where(same_group, pair_same[:, None], single[:, None] * single[None, :])
    np.fill_diagonal(both, single)
    return both, group


def labelled_evaluate(scores: np.ndarray, labels: np.ndarray, ks=(1, 2, 4, 8), map_at_k: int | None = None
                      ) -> dict[str, float]:
    """Leave-one-out metrics of a labelled set (queries == database), expected over the orders of tied items.

    By linearity: E[precision@i if i is relevant] = sum_{j <= i} P(i and j relevant) / i; Recall@K is
    1 - P(no relevant item in the top K), a product over tie groups of C(t-p, k_g) / C(t, k_g) for the k_g
    slots of each group inside the top K. O(N^2) per query.
    """
    aps, maprs, apks, recalls = [], [], [], {k: [] for k in ks}
    for q in range(scores.shape[0]):
        others = np.flatnonzero(np.arange(scores.shape[1]) != q)
        relevant = (labels[others] == labels[q]).astype(np.float64)
        num_pos = int(relevant.sum())
        if num_pos == 0:
            continue
        both, group = expected_relevance(scores[q, others], relevant)
        positions = np.arange(1, len(others) + 1)
        precision_at_hits = np.tril(both).sum(axis=1) / positions
        aps.append(float(precision_at_hits.sum() / num_pos))
        maprs.append(float(precision_at_hits[:num_pos].sum() / num_pos))
        if map_at_k is not None:
            apks.append(float(precision_at_hits[:map_at_k].sum() / min(num_pos, map_at_k)))
        relevant_in_order = relevant[ranking(scores[q, others])]
        for k in ks:
            miss = 1.0
            for g in np.unique(group):
                in_group = group == g
                t, p, slots = int(in_group.sum()), int(relevant_in_order[in_group].sum()), int(in_group[:k].sum())
                miss *= math.comb(t - p, slots) / math.comb(t, slots)
            recalls[k].append(1.0 - miss)
    out = {"mAP": float(np.mean(aps)), "mAP@R": float(np.mean(maprs))}
    if map_at_k is not None:
        out[f"mAP@{map_at_k}"] = float(np.mean(apks))
    out.update({f"R@{k}": float(np.mean(v)) for k, v in recalls.items()})
    return out
