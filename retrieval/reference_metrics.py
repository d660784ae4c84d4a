"""Slow, obviously-correct metrics written straight from the protocol descriptions.

The oracle for tests and the baseline for ``scripts/bench_metrics.py``: a full (stable) argsort per query,
then membership tests of positives and junk along the ranking, as the revisitop code does. Do not use it
for real evaluations; :mod:`retrieval.metrics` gives the same values much faster.
"""
from __future__ import annotations

import numpy as np


def ranking(scores_row: np.ndarray, stable: bool = True) -> np.ndarray:
    """Database indices by descending score; ``stable``: ties by ascending index (else NumPy's default
    quicksort, as the revisitop code uses, which orders ties arbitrarily)."""
    return np.argsort(-np.asarray(scores_row), kind="stable" if stable else None)


def positive_ranks_after_junk(order: np.ndarray, positives, junk) -> np.ndarray:
    positions_pos = np.flatnonzero(np.isin(order, positives))
    positions_junk = np.flatnonzero(np.isin(order, junk))
    # Shift each positive up by the number of junk items ranked before it.
    return positions_pos - np.searchsorted(positions_junk, positions_pos)


def revisitop_ap(ranks: np.ndarray, num_positives: int) -> float:
    ap = 0.0
    for j, rank in enumerate(ranks):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_at = (j + 1) / (rank + 1)
        ap += (precision_before + precision_at) / 2 / num_positives
    return ap


def revisitop_precision(ranks: np.ndarray, k: int) -> float:
    one_based = ranks + 1
    cutoff = min(int(one_based.max()), k)
    return float((one_based <= cutoff).sum()) / cutoff


def revisitop_evaluate(scores: np.ndarray, positives, junk, ks=(1, 5, 10)):
    """(mAP, mP@ks, per-query AP) of the revisitop protocol for one (positives, junk) truth."""
    aps, prs = [], []
    for q in range(scores.shape[0]):
        if len(positives[q]) == 0:
            aps.append(np.nan)
            prs.append([np.nan] * len(ks))
            continue
        ranks = positive_ranks_after_junk(ranking(scores[q]), positives[q], junk[q])
        aps.append(revisitop_ap(ranks, len(np.unique(positives[q]))))
        prs.append([revisitop_precision(ranks, k) for k in ks])
    aps, prs = np.array(aps), np.array(prs)
    return np.nanmean(aps), np.nanmean(prs, axis=0), aps


def labelled_evaluate(scores: np.ndarray, labels: np.ndarray, ks=(1, 2, 4, 8)) -> dict[str, float]:
    """Leave-one-out metrics of a labelled set (queries == database)."""
    aps, maprs, recalls = [], [], {k: [] for k in ks}
    for q in range(scores.shape[0]):
        order = ranking(scores[q])
        order = order[order != q]
        relevant = labels[order] == labels[q]
        num_pos = int(relevant.sum())
        if num_pos == 0:
            continue
        hits = np.cumsum(relevant)
        precision = hits / np.arange(1, len(order) + 1)
        aps.append(float((precision * relevant).sum() / num_pos))
        maprs.append(float((precision[:num_pos] * relevant[:num_pos]).sum() / num_pos))
        for k in ks:
            recalls[k].append(float(relevant[:k].any()))
    out = {"mAP": float(np.mean(aps)), "mAP@R": float(np.mean(maprs))}
    out.update({f"R@{k}": float(np.mean(v)) for k, v in recalls.items()})
    return out
