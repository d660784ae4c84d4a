"""Tie-aware labelled metrics: each is its expectation over all orders of tied items.

References here are written from the definition (every database order, one plain ranking each), not from
the closed forms in :mod:`retrieval.evaluation.metrics`.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from msretrieval.retrieval.evaluation import reference_metrics as ref
from msretrieval.retrieval.evaluation.metrics import (RankedPositives, TiedPositives, average_precision,
                                                      labelled_metrics, map_at_r, positive_ranks, recall_at_k,
                                                      tied_positives)
from msretrieval.retrieval.search.scores import DenseScores

KS = (1, 2, 3, 5)
AP_KS = (1, 2, 4)


def plain_metrics(relevant_in_order: np.ndarray) -> dict[str, float]:
    """Metrics of ONE ranking (no ties left), straight from their definitions."""
    relevant_in_order = np.asarray(relevant_in_order, dtype=bool)
    num_relevant = int(relevant_in_order.sum())
    hits = np.cumsum(relevant_in_order)
    precision = hits / np.arange(1, len(relevant_in_order) + 1)
    precision_at_hits = np.where(relevant_in_order, precision, 0.0)
    out = {"AP": precision_at_hits.sum() / num_relevant,
           "AP@R": precision_at_hits[:num_relevant].sum() / num_relevant}
    for k in AP_KS:
        out[f"AP@{k}"] = precision_at_hits[:k].sum() / min(num_relevant, k)
    for k in KS:
        out[f"R@{k}"] = float(relevant_in_order[:k].any())
    return out


def expected_over_database_orders(scores_row: np.ndarray, relevant: np.ndarray, junk: np.ndarray
                                  ) -> dict[str, float]:
    """Average of :func:`plain_metrics` over every order of the database (junk removed first), each ranked by
    descending score with ties in that order: every order of tied items, each equally often."""
    keep = ~junk | relevant  # an item both relevant and junk counts as relevant
    scores_row, relevant = scores_row[keep], relevant[keep]
    totals: dict[str, float] = {}
    orders = list(itertools.permutations(range(len(scores_row))))
    for order in orders:
        order = np.array(order)
        ranking = order[np.argsort(-scores_row[order], kind="stable")]
        for name, value in plain_metrics(relevant[ranking]).items():
            totals[name] = totals.get(name, 0.0) + value
    return {name: total / len(orders) for name, total in totals.items()}


def fast_metrics(tied: TiedPositives, q: int) -> dict[str, float]:
    out = {"AP": average_precision(tied)[q], "AP@R": map_at_r(tied)[q]}
    out.update({f"AP@{k}": average_precision(tied, k=k)[q] for k in AP_KS})
    out.update({f"R@{k}": recall_at_k(tied, k)[q] for k in KS})
    return out


# --- (1) against every database order -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_matches_average_over_all_database_orders(seed):
    rng = np.random.default_rng(seed)
    num_queries, num_items = 4, 7  # 7! = 5040 orders per query
    scores = rng.integers(0, 3, (num_queries, num_items)).astype(np.float64)  # a few values: heavy ties
    positives = [rng.choice(num_items, rng.integers(1, 5), replace=False) for _ in range(num_queries)]
    # Junk sometimes overlaps the positives (those stay positives) and ties with them.
    junk = [rng.choice(num_items, rng.integers(0, 3), replace=False) for _ in range(num_queries)]
    tied = tied_positives(DenseScores(scores), positives, junk, block_elements=int(rng.integers(1, 30)))
    for q in range(num_queries):
        relevant = np.isin(np.arange(num_items), positives[q])
        expected = expected_over_database_orders(scores[q], relevant, np.isin(np.arange(num_items), junk[q]))
        got = fast_metrics(tied, q)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, abs=1e-12, rel=0), (q, name)


def test_all_tied_matches_average_over_all_orders():
    """One group holding everything (a constant row): only the counts matter."""
    scores = np.zeros((1, 7))
    for num_positives in range(1, 8):
        positives = [np.arange(num_positives)]
        expected = expected_over_database_orders(scores[0], np.arange(7) < num_positives, np.zeros(7, bool))
        got = fast_metrics(tied_positives(DenseScores(scores), positives), 0)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, abs=1e-12, rel=0), (num_positives, name)


# --- (2) golden values by hand ----------------------------------------------------------------------------------

def test_golden_values_by_hand():
    # Database scores 5, 3, 3, 3, 1: position 1, a tie group at positions 2..4, position 5.
    scores = np.array([[5.0, 3.0, 3.0, 3.0, 1.0]] * 2)
    positives = [np.array([0, 1, 2]), np.array([1, 4])]
    tied = tied_positives(DenseScores(scores), positives)
    np.testing.assert_array_equal(tied.above, [0, 1, 1, 1, 4])
    np.testing.assert_array_equal(tied.tied, [1, 3, 3, 3, 1])
    # Query 0, R = 3: item 0 first; the group holds 2 positives and 1 negative, at position 2, 3 or 4 (1/3 each):
    #   negative at 2: hits at 1, 3, 4 -> 1 + 2/3 + 3/4 = 29/12
    #   negative at 3: hits at 1, 2, 4 -> 1 + 1 + 3/4   = 33/12
    #   negative at 4: hits at 1, 2, 3 -> 1 + 1 + 1     = 36/12
    #   AP = (29 + 33 + 36) / 36 / 3 = 49/54
    #   AP@R (positions <= 3): (1 + 2/3, 1 + 1, 1 + 1 + 1) -> (5/3 + 2 + 3) / 3 / 3 = 20/27
    #   AP@2: 1 + P(position 2 relevant) * 2/2 = 1 + 2/3 -> / min(3, 2) = 5/6;  R@1 = 1
    # Query 1, R = 2: item 1 at position 2, 3 or 4 (1/3 each), item 4 at position 5 (precision 2/5):
    #   AP = ((1/2 + 1/3 + 1/4) / 3 + 2/5) / 2 = (13/36 + 2/5) / 2 = 137/360
    #   AP@R (positions <= 2): (1/2) / 3 / 2 = 1/12;  AP@2 = 1/12 as well (min(2, 2) = 2)
    #   R@1 = 0; R@2 = P(item 1 at 2) = 1/3 = 1 - C(2,1)/C(3,1); R@3 = 2/3 = 1 - C(2,2)/C(3,2); R@4 = 1
    np.testing.assert_allclose(average_precision(tied), [49 / 54, 137 / 360], rtol=0, atol=1e-15)
    np.testing.assert_allclose(map_at_r(tied), [20 / 27, 1 / 12], rtol=0, atol=1e-15)
    np.testing.assert_allclose(average_precision(tied, k=2), [5 / 6, 1 / 12], rtol=0, atol=1e-15)
    np.testing.assert_allclose([recall_at_k(tied, k)[1] for k in (1, 2, 3, 4)], [0, 1 / 3, 2 / 3, 1],
                               rtol=0, atol=1e-15)
    assert recall_at_k(tied, 1)[0] == 1.0


def test_tie_groups_with_junk():
    # Scores 2, 2, 2, 2, 1: item 3 (junk, listed twice) leaves the tie group; item 1 is positive and junk: a
    # positive.
    tied = tied_positives(DenseScores(np.array([[2.0, 2.0, 2.0, 2.0, 1.0]])), [[1, 4]], [[3, 1, 3]])
    np.testing.assert_array_equal(tied.above, [0, 3])
    np.testing.assert_array_equal(tied.tied, [3, 1])
    # Item 1 at position 1, 2 or 3; item 4 at 4: AP = ((1 + 1/2 + 1/3) / 3 + 2/4) / 2 = (11/18 + 9/18) / 2 = 5/9
    assert average_precision(tied)[0] == pytest.approx(5 / 9, abs=1e-15)


# --- (3) database order does not matter ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_invariant_to_database_order_with_massive_ties(seed):
    rng = np.random.default_rng(seed)
    num_items, bits = 300, 16
    labels = np.sort(rng.integers(0, 8, num_items))  # sorted by class, like the Flowers manifest
    codes = rng.integers(0, 2, (num_items, bits)) * 2 - 1
    scores = (codes @ codes.T).astype(np.float64)  # bits - 2 * Hamming distance: 17 possible values
    ks = (1, 2, 4, 8, 16)
    base = labelled_metrics(DenseScores(scores), labels, labels, ks=ks, map_at_k=20)
    by_index = []
    for _ in range(3):
        perm = rng.permutation(num_items)
        permuted_scores = DenseScores(scores[np.ix_(perm, perm)])
        permuted = labelled_metrics(permuted_scores, labels[perm], labels[perm], ks=ks, map_at_k=20)
        assert permuted.keys() == base.keys()
        for name, value in base.items():
            assert permuted[name] == pytest.approx(value, abs=1e-12, rel=0), name
        # Separate queries: only the database is permuted.
        queries = scores[:40]
        separate = labelled_metrics(DenseScores(queries), labels[:40], labels, exclude_self=False, ks=ks)
        separate_permuted = labelled_metrics(DenseScores(queries[:, perm]), labels[:40], labels[perm],
                                             exclude_self=False, ks=ks)
        for name, value in separate.items():
            assert separate_permuted[name] == pytest.approx(value, abs=1e-12, rel=0), name
        # Ties broken by index do change with the order (so the checks above can fail).
        positives = [np.flatnonzero((labels[perm] == c) & (np.arange(num_items) != q))
                     for q, c in enumerate(labels[perm])]
        ranked = positive_ranks(permuted_scores, positives, [[q] for q in range(num_items)])
        by_index.append(float(np.mean(map_at_r(ranked))))
    assert len(set(by_index)) > 1


# --- (4) the synthetic case of the issue ------------------------------------------------------------------------

def test_recall_at_2_of_hamming_codes_does_not_depend_on_database_order():
    """64-bit codes, labels contiguous in the database: R@2 broken by index rewarded the order."""
    rng = np.random.default_rng(0)
    num_items, bits, num_classes = 1000, 64, 20
    labels = np.repeat(np.arange(num_classes), num_items // num_classes)
    centres = rng.integers(0, 2, (num_classes, bits))
    codes = (centres[labels] ^ (rng.random((num_items, bits)) < 0.25)) * 2 - 1
    scores = (codes @ codes.T).astype(np.float32)
    orders = {"index": np.arange(num_items), "reversed": np.arange(num_items)[::-1],
              "shuffled": rng.permutation(num_items)}
    recall, recall_by_index = {}, {}
    for name, perm in orders.items():
        permuted, permuted_labels = DenseScores(scores[np.ix_(perm, perm)]), labels[perm]
        recall[name] = labelled_metrics(permuted, permuted_labels, permuted_labels, ks=(2,))["R@2"]
        positives = [np.flatnonzero((permuted_labels == c) & (np.arange(num_items) != q))
                     for q, c in enumerate(permuted_labels)]
        ranked = positive_ranks(permuted, positives, [[q] for q in range(num_items)])
        recall_by_index[name] = float(np.mean(recall_at_k(ranked, 2)))
    assert recall["reversed"] == pytest.approx(recall["index"], abs=1e-12)
    assert recall["shuffled"] == pytest.approx(recall["index"], abs=1e-12)
    assert len(set(recall_by_index.values())) == 3  # what the issue reported: three orders, three values


# --- (5) without ties nothing changes --------------------------------------------------------------------------

def test_float_scores_give_the_values_of_the_single_ranking():
    rng = np.random.default_rng(2024)
    labels = rng.integers(0, 5, 60)
    scores = rng.standard_normal((60, 60))
    ks = (1, 2, 4, 8, 16)
    got = labelled_metrics(DenseScores(scores), labels, labels, ks=ks)
    # Recorded from the index-tie-breaking implementation before metrics became tie-aware (commit bdd5236).
    before = {"mAP": 0.2608914429687307, "mAP@R": 0.0955595866675412, "R@1": 0.21666666666666667,
              "R@2": 0.4166666666666667, "R@4": 0.65, "R@8": 0.8666666666666667, "R@16": 0.9666666666666667}
    assert got.keys() == before.keys()
    for name, value in before.items():
        assert got[name] == pytest.approx(value, abs=1e-12, rel=0), name
    # ... and what one plain ranking per query gives.
    per_query = []
    for q in range(60):
        others = np.flatnonzero(np.arange(60) != q)
        relevant = labels[others] == labels[q]
        if relevant.any():
            per_query.append(plain_metrics(relevant[np.argsort(-scores[q, others])]))
    assert got["mAP"] == pytest.approx(np.mean([m["AP"] for m in per_query]), abs=1e-12)
    assert got["mAP@R"] == pytest.approx(np.mean([m["AP@R"] for m in per_query]), abs=1e-12)
    assert got["R@2"] == pytest.approx(np.mean([m["R@2"] for m in per_query]), abs=1e-12)


def test_strict_ranking_is_the_no_tie_case():
    """RankedPositives (a strict ranking) and the tie groups of tie-free scores give the same metrics."""
    rng = np.random.default_rng(8)
    scores = rng.standard_normal((9, 50))
    positives = [rng.choice(50, rng.integers(0, 12), replace=False) for _ in range(9)]
    junk = [rng.choice(50, 3, replace=False) for _ in range(9)]
    ranked = positive_ranks(DenseScores(scores), positives, junk)
    tied = tied_positives(DenseScores(scores), positives, junk)
    np.testing.assert_array_equal(tied.above, ranked.ranks)
    assert (tied.tied == 1).all()
    for metric in (average_precision, map_at_r, lambda p: average_precision(p, k=5), lambda p: recall_at_k(p, 3)):
        np.testing.assert_allclose(metric(tied), metric(ranked), rtol=0, atol=1e-15)
        np.testing.assert_allclose(metric(tied), metric(TiedPositives.from_ranks(ranked)), rtol=0, atol=0)


# --- mAP@K, the reference, blocks, numerics ---------------------------------------------------------------------

def test_map_at_k_entry_and_limits():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 40)
    scores = rng.integers(0, 4, (40, 40)).astype(np.float64)
    plain = labelled_metrics(DenseScores(scores), labels, labels)
    assert not any(name.startswith("mAP@") and name != "mAP@R" for name in plain)
    with_k = labelled_metrics(DenseScores(scores), labels, labels, map_at_k=10)
    assert list(with_k) == ["mAP", "mAP@R", "mAP@10", "R@1", "R@2", "R@4", "R@8"]
    # K at least the database size is plain AP.
    assert labelled_metrics(DenseScores(scores), labels, labels, map_at_k=39)["mAP@39"] == pytest.approx(
        plain["mAP"], abs=1e-12)
    tied = tied_positives(DenseScores(scores), [np.flatnonzero(labels == c) for c in labels])
    np.testing.assert_allclose(average_precision(tied, k=1000), average_precision(tied), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="k >= 1"):
        average_precision(tied, k=0)


@pytest.mark.parametrize("map_at_k", [None, 1, 7])
def test_matches_pairwise_reference(map_at_k):
    """The O(N^2) reference (pairwise relevance probabilities) agrees on a larger, heavily tied set."""
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 6, 120)
    scores = rng.integers(0, 5, (120, 120)).astype(np.float64)
    got = labelled_metrics(DenseScores(scores), labels, labels, map_at_k=map_at_k, ks=(1, 2, 4, 8, 30))
    expected = ref.labelled_evaluate(scores, labels, ks=(1, 2, 4, 8, 30), map_at_k=map_at_k)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12, rel=0), name


def test_blocks_and_threads_do_not_change_tie_groups():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 3, (13, 30)).astype(np.float32)
    positives = [rng.choice(30, rng.integers(0, 8), replace=False) for _ in range(13)]
    junk = [rng.choice(30, rng.integers(0, 4), replace=False) for _ in range(13)]
    base = tied_positives(DenseScores(scores), positives, junk)
    for block_elements, threads in [(1, 1), (31, 3), (100, None)]:
        other = tied_positives(DenseScores(scores), positives, junk, block_elements=block_elements, threads=threads)
        np.testing.assert_array_equal(other.indptr, base.indptr)
        np.testing.assert_array_equal(other.above, base.above)
        np.testing.assert_array_equal(other.tied, base.tied)


def test_large_tie_groups_keep_precision():
    """The harmonic-number closed form against a per-position sum (math.fsum) on 50,000 items."""
    rng = np.random.default_rng(6)
    num_items = 50_000
    scores = rng.integers(0, 65, (1, num_items)).astype(np.float64)
    positives = rng.choice(num_items, 700, replace=False)
    tied = tied_positives(DenseScores(scores), [positives])
    groups = sorted({(int(c), int(t)) for c, t in zip(tied.above, tied.tied)})
    total, relevant_above = [], 0
    for c, t in groups:
        p = int(np.sum(tied.above == c))
        slope = (p - 1) / (t - 1) if t > 1 else 0.0
        total += [(p / t) * (relevant_above + 1 + (i - c - 1) * slope) / i for i in range(c + 1, c + t + 1)]
        relevant_above += p
    assert average_precision(tied)[0] == pytest.approx(math.fsum(total) / 700, abs=1e-13, rel=0)


def test_tied_positives_from_lists_sorts_each_query():
    tied = TiedPositives.from_lists([[4, 0, 1], [], [2]], [[1, 1, 3], [], [5]])
    np.testing.assert_array_equal(tied.indptr, [0, 3, 3, 4])
    np.testing.assert_array_equal(tied.above, [0, 1, 4, 2])
    np.testing.assert_array_equal(tied.tied, [1, 3, 1, 5])
    assert np.isnan(average_precision(tied)[1]) and np.isnan(recall_at_k(tied, 1)[1])
    assert TiedPositives.from_ranks(RankedPositives.from_lists([[3, 1]])).tied.tolist() == [1, 1]


def test_tied_positives_errors():
    scores = DenseScores(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="out of range"):
        tied_positives(scores, [[0], [5]])
    with pytest.raises(ValueError, match="out of range"):
        tied_positives(scores, [[0], [1]], [[-1], []])
    with pytest.raises(ValueError):
        tied_positives(scores, [[0]])
    with pytest.raises(ValueError):
        tied_positives(scores, [[0], [1]], [[0]])
    bad = np.zeros((2, 5))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        tied_positives(DenseScores(bad), [[0], [1]])


def test_labelled_benchmark_reports_map_at_k_only_when_asked():
    from pathlib import Path

    from msretrieval.data.manifest import LabelledImageSet
    from msretrieval.retrieval.evaluation.benchmarks import LabelledBenchmark

    labels = np.array([0, 0, 1, 1, 1])
    images = LabelledImageSet(name="toy", paths=tuple(Path(f"{i}.jpg") for i in range(5)), labels=labels)
    bench = LabelledBenchmark(name="toy", images=images)
    scores = DenseScores(np.random.default_rng(0).integers(0, 3, (5, 5)).astype(np.float64))
    assert "mAP@3" not in bench.evaluate(scores)
    assert bench.evaluate(scores, map_at_k=3)["mAP@3"] == pytest.approx(
        labelled_metrics(scores, labels, labels, map_at_k=3)["mAP@3"])
