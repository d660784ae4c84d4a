"""Sort-free ranking metrics: golden values, properties against the slow oracle, hand examples, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msretrieval.retrieval.evaluation import reference_metrics as ref
from msretrieval.retrieval.evaluation.metrics import (RankedPositives, _rank_by_bins, average_precision,
                                                      labelled_metrics, map_at_r, nan_mean, positive_ranks, rank_items,
                                                      recall_at_k, revisitop_average_precision, revisitop_metrics,
                                                      revisitop_precision_at_k)
from msretrieval.retrieval.search.scores import DenseScores, InnerProductScores, ScoreSource


def scores_from_rankings(rankings) -> np.ndarray:
    """A score matrix whose descending order is each row of ``rankings`` (database indices, best first)."""
    rankings = np.asarray(rankings)
    num_queries, num_items = rankings.shape
    scores = np.empty((num_queries, num_items))
    for q, order in enumerate(rankings):
        scores[q, order] = num_items - np.arange(num_items)
    return scores


# --- (a) golden values from DELF's revisitop tests ----------------------------------------------------------

def test_delf_average_precision():
    ranked = RankedPositives.from_lists([[0, 2, 5]])
    np.testing.assert_allclose(revisitop_average_precision(ranked), [0.677778], atol=1e-6)


def test_delf_precision_at_ranks():
    ranked = RankedPositives.from_lists([[0, 2, 5]])
    got = [revisitop_precision_at_k(ranked, k)[0] for k in (1, 5, 10)]
    np.testing.assert_allclose(got, [1.0, 0.4, 0.5], atol=1e-6)


def test_delf_average_precision_from_scores():
    ranking = np.random.default_rng(3).permutation(12)
    ranked = positive_ranks(DenseScores(scores_from_rankings([ranking])), [ranking[[5, 0, 2]]])
    np.testing.assert_array_equal(ranked.query(0), [0, 2, 5])
    np.testing.assert_allclose(revisitop_average_precision(ranked), [0.677778], atol=1e-6)


def test_delf_junk_removal():
    num_items = 40
    ranking = np.random.default_rng(7).permutation(num_items)
    positives = ranking[[0, 2, 6, 10, 20]]
    junk = ranking[[1, 8, 9, 30]]
    scores = scores_from_rankings([ranking])
    ranked = positive_ranks(DenseScores(scores), [positives], [junk])
    np.testing.assert_array_equal(ranked.query(0), [0, 1, 5, 7, 17])
    np.testing.assert_array_equal(ref.positive_ranks_after_junk(ref.ranking(scores[0]), positives, junk),
                                  [0, 1, 5, 7, 17])


def test_delf_compute_metrics():
    rankings = [[4, 2, 0, 1, 3], [0, 2, 4, 1, 3], [0, 1, 2, 3, 4]]
    positives = [np.array([0, 1]), np.array([0, 4]), np.array([], dtype=np.int64)]
    junk = [np.array([2]), np.array([], dtype=np.int64), np.array([], dtype=np.int64)]
    scores = DenseScores(scores_from_rankings(rankings))
    ranked = positive_ranks(scores, positives, junk)
    np.testing.assert_array_equal(ranked.indptr, [0, 2, 4, 4])
    np.testing.assert_array_equal(ranked.ranks, [1, 2, 0, 2])
    ap = revisitop_average_precision(ranked)
    np.testing.assert_allclose(ap[:2], [0.416667, 0.791667], atol=1e-6)
    assert np.isnan(ap[2])
    assert nan_mean(ap) == pytest.approx(0.604167, abs=1e-6)
    mp = [nan_mean(revisitop_precision_at_k(ranked, k)) for k in (1, 2, 5)]
    np.testing.assert_allclose(mp, [0.5, 0.5, 0.666667], atol=1e-6)
    # The same through revisitop_metrics.
    metrics = revisitop_metrics(scores, {"x": (positives, junk)}, ks=(1, 2, 5))
    assert metrics["mAP_x"] == pytest.approx(0.604167, abs=1e-6)
    np.testing.assert_allclose([metrics[f"mP@{k}_x"] for k in (1, 2, 5)], [0.5, 0.5, 0.666667], atol=1e-6)
    assert set(metrics) == {"mAP_x", "mP@1_x", "mP@2_x", "mP@5_x"}


# --- (b) properties against the slow oracle ------------------------------------------------------------------

def random_scores(rng, num_queries, num_items, kind):
    if kind == "float":
        return rng.standard_normal((num_queries, num_items))
    if kind == "float32":
        return rng.standard_normal((num_queries, num_items)).astype(np.float32)
    if kind == "ties":  # heavy ties: a handful of integer values
        return rng.integers(-2, 3, (num_queries, num_items)).astype(np.float64)
    if kind == "binary":
        return rng.integers(0, 2, (num_queries, num_items)).astype(np.float32)
    if kind == "constant":
        return np.full((num_queries, num_items), 0.5)
    if kind == "signed_zero":  # 0.0 and -0.0 are one tie group
        return rng.choice([0.0, -0.0, 1.0], (num_queries, num_items))
    raise AssertionError(kind)


def random_lists(rng, num_queries, num_items, max_size):
    """Random index lists, possibly empty, possibly with duplicates."""
    return [rng.integers(0, num_items, rng.integers(0, max_size + 1)) for _ in range(num_queries)]


SCORE_KINDS = ["float", "float32", "ties", "binary", "constant", "signed_zero"]


def check_against_reference(scores, positives, junk, block_elements):
    source = DenseScores(scores)
    ranked = positive_ranks(source, positives, junk, block_elements=block_elements)
    assert ranked.num_queries == len(scores)
    for q in range(len(scores)):
        expected = ref.positive_ranks_after_junk(ref.ranking(scores[q]), positives[q], junk[q])
        np.testing.assert_array_equal(ranked.query(q), expected)
    ks = (1, 3, 10)
    metrics = revisitop_metrics(source, {"p": (positives, junk)}, ks=ks)
    has_positives = any(len(p) for p in positives)
    if has_positives:
        ref_map, ref_mp, ref_aps = ref.revisitop_evaluate(scores, positives, junk, ks=ks)
        np.testing.assert_allclose(revisitop_average_precision(ranked), ref_aps, rtol=0, atol=1e-9)
        assert metrics["mAP_p"] == pytest.approx(ref_map, abs=1e-9)
        np.testing.assert_allclose([metrics[f"mP@{k}_p"] for k in ks], ref_mp, rtol=0, atol=1e-9)
    else:
        assert np.isnan(metrics["mAP_p"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_queries=st.integers(1, 7), num_items=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(SCORE_KINDS), block_elements=st.integers(1, 300),
       max_pos=st.integers(0, 10), max_junk=st.integers(0, 10))
def test_positive_ranks_match_reference(num_queries, num_items, seed, kind, block_elements, max_pos, max_junk):
    rng = np.random.default_rng(seed)
    scores = random_scores(rng, num_queries, num_items, kind)
    positives = random_lists(rng, num_queries, num_items, max_pos)
    junk = random_lists(rng, num_queries, num_items, max_junk)
    check_against_reference(scores, positives, junk, block_elements)


@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_positive_ranks_match_reference_larger(kind, seed):
    rng = np.random.default_rng(1000 + seed)
    num_queries, num_items = 25, 400
    scores = random_scores(rng, num_queries, num_items, kind)
    positives = random_lists(rng, num_queries, num_items, 60)
    # Overlap: some junk is drawn from the positives themselves.
    junk = [np.concatenate([rng.integers(0, num_items, 30), rng.choice(p, min(len(p), 5)) if len(p) else []])
            .astype(np.int64) for p in positives]
    check_against_reference(scores, positives, junk, block_elements=int(rng.integers(num_items, 5 * num_items)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_queries=st.integers(1, 6), num_items=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(SCORE_KINDS), block_elements=st.integers(1, 300), threads=st.sampled_from([None, 1, 3]))
def test_rank_items_match_reference(num_queries, num_items, seed, kind, block_elements, threads):
    """Every item's rank (duplicates and order kept) is its position in the stable descending argsort."""
    rng = np.random.default_rng(seed)
    scores = random_scores(rng, num_queries, num_items, kind)
    items = random_lists(rng, num_queries, num_items, 12)
    ranks = rank_items(DenseScores(scores), items, block_elements=block_elements, threads=threads)
    assert len(ranks) == num_queries
    for q in range(num_queries):
        position = np.argsort(ref.ranking(scores[q]))  # position[i] = rank of item i
        np.testing.assert_array_equal(ranks[q], position[items[q]])
        assert ranks[q].dtype == np.int64


def test_revisitop_metrics_several_protocols_match_reference():
    """The protocols share one ranking per query; each must still equal its own oracle evaluation."""
    rng = np.random.default_rng(5)
    num_queries, num_items = 12, 150
    scores = np.round(rng.standard_normal((num_queries, num_items)), 1)  # many ties
    easy = random_lists(rng, num_queries, num_items, 15)
    hard = random_lists(rng, num_queries, num_items, 15)
    junk = random_lists(rng, num_queries, num_items, 15)
    easy[3] = np.zeros(0, np.int64)  # a query without easy positives
    truth = {
        "easy": (easy, [np.concatenate([j, h]) for j, h in zip(junk, hard)]),
        "medium": ([np.concatenate([e, h]) for e, h in zip(easy, hard)], junk),
        "hard": (hard, [np.concatenate([j, e]) for j, e in zip(junk, easy)]),
    }
    ks = (1, 5, 10)
    metrics = revisitop_metrics(DenseScores(scores), truth, ks=ks)
    assert len(metrics) == 3 * (1 + len(ks))
    for protocol, (positives, junk_lists) in truth.items():
        ref_map, ref_mp, _ = ref.revisitop_evaluate(scores, positives, junk_lists, ks=ks)
        assert metrics[f"mAP_{protocol}"] == pytest.approx(ref_map, abs=1e-9)
        np.testing.assert_allclose([metrics[f"mP@{k}_{protocol}"] for k in ks], ref_mp, rtol=0, atol=1e-9)
        # ... and equal the one-protocol path through positive_ranks.
        ranked = positive_ranks(DenseScores(scores), positives, junk_lists)
        assert metrics[f"mAP_{protocol}"] == pytest.approx(nan_mean(revisitop_average_precision(ranked)), abs=1e-12)


def test_positive_in_junk_counts_as_positive():
    # Ranking 0, 1, 2, 3: item 1 is both positive and junk, item 2 is junk only.
    scores = scores_from_rankings([[0, 1, 2, 3]])
    ranked = positive_ranks(DenseScores(scores), [[1, 3]], [[1, 2]])
    expected = ref.positive_ranks_after_junk(ref.ranking(scores[0]), [1, 3], [1, 2])
    np.testing.assert_array_equal(ranked.query(0), expected)
    np.testing.assert_array_equal(expected, [1, 1])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_items=st.integers(2, 40), num_classes=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(["float", "float32", "ties", "binary"]), symmetric=st.booleans())
def test_labelled_metrics_match_reference(num_items, num_classes, seed, kind, symmetric):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_items)
    labels[1] = labels[0]  # at least one query has a positive
    scores = random_scores(rng, num_items, num_items, kind)
    if symmetric:
        scores = np.triu(scores) + np.triu(scores, 1).T
    got = labelled_metrics(DenseScores(scores), labels, labels)
    expected = ref.labelled_evaluate(scores, labels)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("kind", ["float", "ties"])
def test_labelled_metrics_match_reference_larger(kind):
    rng = np.random.default_rng(42)
    labels = rng.integers(0, 12, 300)
    features = rng.standard_normal((300, 16)) + 2 * np.eye(16)[labels % 16]
    scores = features @ features.T
    if kind == "ties":
        scores = np.round(scores)
    got = labelled_metrics(DenseScores(scores), labels, labels)
    expected = ref.labelled_evaluate(scores, labels)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


# --- (c) hand-computed examples ----------------------------------------------------------------------------

def test_average_precision_by_hand():
    ranked = RankedPositives.from_lists([[0, 2, 5], [1], [3, 4], []])
    ap = average_precision(ranked)
    # (1/1 + 2/3 + 3/6) / 3, 1/2, (1/4 + 2/5) / 2
    np.testing.assert_allclose(ap[:3], [(1 + 2 / 3 + 0.5) / 3, 0.5, (0.25 + 0.4) / 2])
    assert np.isnan(ap[3])
    assert nan_mean(ap) == pytest.approx(np.mean(ap[:3]))


def test_map_at_r_by_hand():
    ranked = RankedPositives.from_lists([[0, 2, 5], [1, 2], [0, 1], [4], []])
    values = map_at_r(ranked)
    # R=3: hits at 0 and 2 -> (1 + 2/3)/3; R=2: hit at 1 -> (1/2)/2; perfect -> 1; R=1 miss -> 0.
    np.testing.assert_allclose(values[:4], [(1 + 2 / 3) / 3, 0.25, 1.0, 0.0])
    assert np.isnan(values[4])


def test_recall_at_k_by_hand():
    ranked = RankedPositives.from_lists([[0, 7], [3, 4], [9], []])
    np.testing.assert_array_equal(recall_at_k(ranked, 1)[:3], [1, 0, 0])
    np.testing.assert_array_equal(recall_at_k(ranked, 3)[:3], [1, 0, 0])
    np.testing.assert_array_equal(recall_at_k(ranked, 4)[:3], [1, 1, 0])
    np.testing.assert_array_equal(recall_at_k(ranked, 10)[:3], [1, 1, 1])
    assert np.isnan(recall_at_k(ranked, 4)[3])
    assert nan_mean(recall_at_k(ranked, 4)) == pytest.approx(2 / 3)


def test_labelled_metrics_by_hand():
    # 4 items, labels a a b b. Rows give each query's ranking of the others.
    labels = np.array([0, 0, 1, 1])
    scores = np.array([
        [9.0, 1.0, 3.0, 2.0],   # q0 (self junk): 2, 3, 1 -> positive 1 at rank 2 -> AP 1/3, R@1 0, R@4 1
        [5.0, 9.0, 1.0, 0.0],   # q1: 0, 2, 3 -> rank 0 -> AP 1
        [0.0, 0.0, 9.0, 0.0],   # q2: 0, 1, 3 all tied; positive 3 at rank 0, 1, 2 with probability 1/3 each
        [0.0, 0.0, 1.0, 9.0],   # q3: 2 first -> AP 1
    ])
    metrics = labelled_metrics(DenseScores(scores), labels, labels, ks=(1, 3))
    # q2 (tie-aware): AP = (1/1 + 1/2 + 1/3) / 3 = 11/18, AP@R = R@1 = 1/3, R@3 = 1.
    assert metrics["mAP"] == pytest.approx((1 / 3 + 1 + 11 / 18 + 1) / 4)
    assert metrics["mAP@R"] == pytest.approx((0 + 1 + 1 / 3 + 1) / 4)
    assert metrics["R@1"] == pytest.approx((0 + 1 + 1 / 3 + 1) / 4) and metrics["R@3"] == pytest.approx(1.0)
    # Queries separate from the database: nothing is excluded.
    separate = labelled_metrics(DenseScores(scores[:2]), labels[:2], labels, exclude_self=False, ks=(1,))
    # q0: 0 first (rank 0), 1 at rank 3 -> (1 + 2/4)/2; q1: 1 first, 0 second -> 1
    assert separate["mAP"] == pytest.approx(((1 + 0.5) / 2 + 1) / 2)
    assert separate["R@1"] == 1.0
    with pytest.raises(ValueError, match="exclude_self"):
        labelled_metrics(DenseScores(scores[:2]), labels[:2], labels)


def test_ranked_positives_from_lists():
    ranked = RankedPositives.from_lists([[5, 1], [], [2]])
    np.testing.assert_array_equal(ranked.indptr, [0, 2, 2, 3])
    np.testing.assert_array_equal(ranked.ranks, [1, 5, 2])
    np.testing.assert_array_equal(ranked.num_positives, [2, 0, 1])
    assert ranked.num_queries == 3
    np.testing.assert_array_equal(ranked.query(1), [])


def test_nan_mean():
    assert nan_mean(np.array([np.nan, 1.0, 3.0])) == 2.0
    assert np.isnan(nan_mean(np.array([np.nan, np.nan])))
    assert np.isnan(nan_mean(np.array([])))


# --- (d) errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise(bad):
    scores = np.zeros((3, 5))
    scores[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        positive_ranks(DenseScores(scores), [[0]] * 3, [[1]] * 3)
    with pytest.raises(ValueError, match="NaN or infinity"):
        positive_ranks(DenseScores(scores), [[0]] * 3, block_elements=5)  # the bad row in a later block
    with pytest.raises(ValueError, match="NaN or infinity"):
        revisitop_metrics(DenseScores(scores), {"easy": ([[0]] * 3, [[]] * 3)})


@pytest.mark.parametrize("positives, junk", [
    ([[5], [0]], None), ([[-1], [0]], None), ([[0], [0]], [[0], [7]]), ([[0], [0]], [[-2], []]),
])
def test_out_of_range_indices_raise(positives, junk):
    with pytest.raises(ValueError, match="out of range"):
        positive_ranks(DenseScores(np.zeros((2, 5))), positives, junk)


def test_out_of_range_raises_in_every_entry_point():
    scores = DenseScores(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="out of range"):
        rank_items(scores, [[0], [5]])
    with pytest.raises(ValueError, match="out of range"):
        revisitop_metrics(scores, {"medium": ([[0], [1]], [[-1], []])})


def test_wrong_number_of_queries_raises():
    scores = DenseScores(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="3"):
        positive_ranks(scores, [[0], [1]])
    with pytest.raises(ValueError):
        positive_ranks(scores, [[0], [1], [2]], [[0]])
    with pytest.raises(ValueError):
        revisitop_metrics(scores, {"easy": ([[0]] * 4, [[]] * 4)})
    with pytest.raises(ValueError):
        revisitop_metrics(scores, {"easy": ([[0]] * 3, [[]] * 2)})
    with pytest.raises(ValueError):
        rank_items(scores, [[0]] * 2)
    with pytest.raises(ValueError):
        labelled_metrics(scores, np.zeros(2), np.zeros(5), exclude_self=False)


# --- (e) score sources -----------------------------------------------------------------------------------------

def test_inner_product_scores_equal_numpy():
    rng = np.random.default_rng(0)
    queries, database = rng.standard_normal((7, 16)), rng.standard_normal((23, 16))
    source = InnerProductScores(queries, database)
    assert isinstance(source, ScoreSource)
    assert source.shape == (7, 23)
    expected = queries @ database.T
    np.testing.assert_allclose(source.rows(0, 7).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(source.rows(2, 5).numpy(), expected[2:5], rtol=1e-5, atol=1e-5)
    torch_source = InnerProductScores(torch.from_numpy(queries), torch.from_numpy(database))
    np.testing.assert_allclose(torch_source.rows(0, 7).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch_source.rows(0, 1).dtype == torch.float32
    # Metrics agree with the dense matrix of the same similarities.
    positives = [rng.integers(0, 23, 4) for _ in range(7)]
    a = positive_ranks(source, positives, block_elements=50)
    b = positive_ranks(DenseScores(source.rows(0, 7).numpy()), positives)
    np.testing.assert_array_equal(a.ranks, b.ranks)


def test_inner_product_shape_mismatch():
    with pytest.raises(ValueError, match="shapes"):
        InnerProductScores(np.zeros((2, 3)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="shapes"):
        InnerProductScores(np.zeros(3), np.zeros((4, 3)))


def test_dense_scores_numpy_and_torch():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((4, 9))
    positives = [rng.integers(0, 9, 3) for _ in range(4)]
    expected = positive_ranks(DenseScores(matrix), positives).ranks
    for variant in [matrix, matrix.astype(np.float32), torch.from_numpy(matrix),
                    torch.from_numpy(matrix.astype(np.float32)), np.asfortranarray(matrix),
                    torch.from_numpy(matrix.T.copy()).T]:
        source = DenseScores(variant)
        assert source.shape == (4, 9)
        assert isinstance(source.rows(1, 3), torch.Tensor)
        np.testing.assert_allclose(source.rows(1, 3).numpy(), matrix[1:3], rtol=1e-6)
        np.testing.assert_array_equal(positive_ranks(source, positives).ranks, expected)


def test_dense_scores_integer_matrix():
    """Integer similarities (e.g. Hamming agreement counts) rank like the same values as floats."""
    rng = np.random.default_rng(2)
    matrix = rng.integers(0, 5, (5, 12))
    positives = random_lists(rng, 5, 12, 4)
    junk = random_lists(rng, 5, 12, 3)
    expected = positive_ranks(DenseScores(matrix.astype(np.float64)), positives, junk).ranks
    for variant in [matrix, matrix.astype(np.int32), torch.from_numpy(matrix)]:
        source = DenseScores(variant)
        assert source.rows(0, 1).is_floating_point()
        np.testing.assert_array_equal(positive_ranks(source, positives, junk).ranks, expected)


def test_dense_scores_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        DenseScores(np.zeros(5))
    with pytest.raises(ValueError, match="2-D"):
        DenseScores(torch.zeros(2, 3, 4))


# --- (e) long rows are ranked by binning their values, not by sorting them ------------------------------------

def test_binned_ranks_by_hand_with_ties():
    # descending, ties by index: 0.9 (1), 0.9 (4), 0.5 (0), 0.5 (2), 0.5 (5), 0.1 (3)
    row = np.array([0.5, 0.9, 0.5, 0.1, 0.9, 0.5])
    items = np.array([2, 4, 0, 3, 4])
    # 3 bins over [0.1, 0.9]: 0.1 -> 1, 0.5 -> 1, 0.9 -> 2; items 2, 0, 3 sit in bin 1 below the two items of
    # bin 2, where 0 precedes 2 (same value, lower index) and 5 follows it
    np.testing.assert_array_equal(_rank_by_bins(row, items, bins=3, max_members=6), [3, 1, 2, 5, 1])
    assert _rank_by_bins(row, items, bins=3, max_members=5) is None  # all 6 items share a bin with an item
    assert _rank_by_bins(np.full(6, 0.5), items, bins=3, max_members=6) is None  # one value: nothing to bin
    assert _rank_by_bins(row.astype(np.int64), items, bins=3, max_members=6) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_items=st.integers(1, 200), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(SCORE_KINDS + ["outlier"]), bins=st.integers(3, 40),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_binned_ranks_are_the_stable_argsort_positions(num_items, seed, kind, bins, dtype):
    rng = np.random.default_rng(seed)
    row = random_scores(rng, 1, num_items, "float" if kind == "outlier" else kind)[0].astype(dtype)
    if kind == "outlier":  # one huge value squeezes every other one into a bin or two
        row[rng.integers(num_items)] = 1e30
    items = rng.integers(0, num_items, rng.integers(1, 2 * num_items + 1))  # any order, duplicates
    ranks = _rank_by_bins(row, items, bins, max_members=num_items)
    if row.max() == row[items].min():  # one value at and above the lowest item: declined
        assert ranks is None
    else:
        np.testing.assert_array_equal(ranks, np.argsort(ref.ranking(row))[items])
        assert ranks.dtype == np.int64


@pytest.mark.parametrize("kind, binned", [("float32", True), ("float", True), ("ties", False),
                                          ("signed_zero", False), ("constant", False)])
def test_long_rows_are_ranked_exactly_by_bins_or_else_by_sorting(kind, binned, monkeypatch):
    """Rows of spread values are binned; rows of a few repeated values (every item in a crowded bin) and
    constant rows are sorted; both give the reference ranks and metrics."""
    from msretrieval.retrieval.evaluation import metrics
    rng = np.random.default_rng(11)
    num_items = metrics.BINNED_MIN_ITEMS + 500
    scores = random_scores(rng, 4, num_items, kind)
    positives = random_lists(rng, 4, num_items, 60)  # about 2% of the row ranked, as in Revisited Oxford
    junk = [np.concatenate([rng.integers(0, num_items, 30), p[:10]]) for p in positives]
    sorted_rows, sort = [], metrics._rank_by_sort
    monkeypatch.setattr(metrics, "_rank_by_sort", lambda row, items: (sorted_rows.append(1), sort(row, items))[1])
    check_against_reference(scores, positives, junk, block_elements=2 * num_items)
    assert (not sorted_rows) == binned


def test_the_benchmark_reference_follows_the_revisitop_evaluation_code():
    """scripts/bench_metrics.py's baseline: DELF's golden AP through the revisitop code's arithmetic, ranks from
    one argsort of the (database x queries) matrix along its database axis, and the same metrics as ours."""
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_metrics

    assert ref.revisitop_ap(np.array([0, 2, 5]), 3) == pytest.approx(0.677778, abs=1e-6)
    similarity = np.array([[0.1, 0.9], [0.7, 0.2], [0.4, 0.5]])  # 3 database items x 2 queries
    np.testing.assert_array_equal(ref.ranks_by_column(similarity), [[1, 0], [2, 2], [0, 1]])
    scores, truth = bench_metrics.synthetic_problem(6, 400)  # float32 normals: no ties
    fast = bench_metrics.run_fast(scores, truth)
    reference = bench_metrics.run_reference(np.ascontiguousarray(scores.T), truth, stable=False)
    assert reference.keys() == fast.keys()
    assert max(abs(reference[k] - fast[k]) for k in fast) < 1e-12
