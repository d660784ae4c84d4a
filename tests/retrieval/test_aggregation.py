"""Aggregated match kernels, codebooks and local features: hand-computed golden values.

Toy codebook used throughout (2-D, 2 words): c0 = (0, 0), c1 = (4, 0).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from msretrieval.retrieval.aggregation import vlad_asmk as agg
from msretrieval.retrieval.aggregation.vlad_asmk import (ASMK_SELECTIVITY, FULL_IMAGE, IDENTITY, Aggregated,
                                                         AggregatedDatabase, AggregatedScores, asmk, asmk_star,
                                                         from_rows, in_box, naive_rasmk, pair_similarity, rasmk,
                                                         rows_descriptor_bytes, rvlad, selectivity, to_dense, to_rows,
                                                         vlad)
from msretrieval.retrieval.aggregation.codebook import Codebook, codebook_config, codebook_key, fit_or_load_codebook
from msretrieval.retrieval.aggregation.local_features import (LocalFeatureExtractor, grid_positions,
                                                              select_local_features)

TOY = Codebook(np.array([[0.0, 0.0], [4.0, 0.0]]))
# X: (1,0) and (0,1) -> c0 (squared distances 1 vs 9 and 1 vs 17), (4,2) -> c1 (4 vs 20)
#    V(X_0) = (1,0) + (0,1) = (1,1), V(X_1) = (4,2) - (4,0) = (0,2)
X = np.array([[1.0, 0.0], [0.0, 1.0], [4.0, 2.0]])
# Y: (1,2) -> c0 (5 vs 13), (3,-1) -> c1 (2 vs 10):  V(Y_0) = (1,2), V(Y_1) = (-1,-1)
Y = np.array([[1.0, 2.0], [3.0, -1.0]])


def test_selectivity_golden_values():
    # sigma(u) = sign(u)|u|^3 for u > 0, else 0
    assert selectivity(0.5) == pytest.approx(0.125)
    assert selectivity(-0.2) == 0.0
    assert selectivity(0.0) == 0.0       # tau = 0 is exclusive
    assert selectivity(1.0) == 1.0
    assert selectivity(0.9, alpha=3, tau=0.95) == 0.0
    np.testing.assert_allclose(selectivity(np.array([0.5, -0.2, 0.0, 0.2])), [0.125, 0, 0, 0.008])
    # with tau < 0, negative similarities keep their sign: sigma(-0.2) = -0.008
    assert selectivity(-0.2, tau=-0.5) == pytest.approx(-0.008)
    np.testing.assert_array_equal(IDENTITY(np.array([-2.0, 0.3])), [-2.0, 0.3])


def test_residual_sums_and_assignment():
    words, sums = agg.residual_sums(X, TOY.assign(X)[0], TOY.centroids)
    np.testing.assert_array_equal(words, [0, 1])
    np.testing.assert_allclose(sums, [[1, 1], [0, 2]])


def test_vlad_toy():
    # VLAD(X) = (1,1, 0,2) / sqrt(6), VLAD(Y) = (1,2, -1,-1) / sqrt(7)
    # <.,.> = (1 + 2 + 0 - 2) / sqrt(42) = 1 / sqrt(42) = 0.1543033
    x, y = vlad(X, TOY), vlad(Y, TOY)
    np.testing.assert_allclose(to_dense(x, 2), np.array([1, 1, 0, 2]) / math.sqrt(6), rtol=1e-6)
    assert x.gamma == 1.0
    assert pair_similarity(x, y, IDENTITY) == pytest.approx(1 / math.sqrt(42), rel=1e-6)
    assert float(to_dense(x, 2) @ to_dense(y, 2)) == pytest.approx(1 / math.sqrt(42), rel=1e-6)


def test_asmk_toy():
    # V_hat(X_0) = (1,1)/sqrt2, V_hat(Y_0) = (1,2)/sqrt5: u0 = 3/sqrt10 = 0.9486833, sigma = 0.8538149
    # V_hat(X_1) = (0,1), V_hat(Y_1) = (-1,-1)/sqrt2: u1 = -0.7071068, sigma = 0
    # gamma(X) = gamma(Y) = 2^(-1/2):  K = 0.5 * 0.8538149 = 0.4269075
    x, y = asmk(X, TOY), asmk(Y, TOY)
    assert x.gamma == pytest.approx(2 ** -0.5)
    np.testing.assert_allclose(x.vectors, [[2 ** -0.5, 2 ** -0.5], [0, 1]], rtol=1e-6)
    assert pair_similarity(x, y) == pytest.approx(0.5 * (3 / math.sqrt(10)) ** 3, rel=1e-6)
    assert pair_similarity(x, y) == pytest.approx(0.4269075, rel=1e-6)


def test_asmk_star_toy():
    # bits [V > 0]: X_0 (1,1) -> 11, Y_0 (1,2) -> 11: <b,b>/d = 1 -> sigma 1
    #               X_1 (0,2) -> 01, Y_1 (-1,-1) -> 00: h = 1, 1 - 2*1/2 = 0 -> sigma 0
    # K = 0.5 * (1 + 0) = 0.5; packed MSB first: 11 -> 0b11000000 = 192, 01 -> 64, 00 -> 0
    x, y = asmk_star(X, TOY), asmk_star(Y, TOY)
    np.testing.assert_array_equal(x.vectors.ravel(), [192, 64])
    np.testing.assert_array_equal(y.vectors.ravel(), [192, 0])
    assert pair_similarity(x, y) == pytest.approx(0.5)
    assert x.descriptor_bytes(num_words=2) == 2 * (2 + 1)          # 2 words x (uint16 id + 1 byte of bits)
    assert asmk(X, TOY).descriptor_bytes(num_words=70000) == 2 * (4 + 8)


def test_asmk_normaliser_one_and_word_cap_by_hand():
    # gamma = 1 on both sides (DELF's use_l2_normalization: false): K = sigma(u0) + sigma(u1) = 0.8538149 + 0
    x, y = asmk(X, TOY, normalize=False), asmk(Y, TOY, normalize=False)
    assert x.gamma == 1.0 and y.gamma == 1.0
    np.testing.assert_allclose(x.vectors, asmk(X, TOY).vectors)      # only gamma changes
    assert pair_similarity(x, y) == pytest.approx((3 / math.sqrt(10)) ** 3, rel=1e-6)
    assert pair_similarity(x, y) == pytest.approx(0.8538149, rel=1e-6)
    assert asmk(np.zeros((0, 2)), TOY, normalize=False).gamma == 0.0  # an empty image still scores 0
    # max_words = 1: ||V(X_0)|| = ||(1,1)|| = 1.414 < ||V(X_1)|| = ||(0,2)|| = 2 -> word 1 alone, gamma 1^(-1/2)
    capped = asmk(X, TOY, max_words=1)
    np.testing.assert_array_equal(capped.words, [1])
    np.testing.assert_allclose(capped.vectors, [[0.0, 1.0]])
    assert capped.gamma == 1.0
    assert asmk(X, TOY, max_words=2).words.tolist() == [0, 1]
    with pytest.raises(ValueError, match="at least 1"):
        asmk(X, TOY, max_words=0)
    with pytest.raises(ValueError, match="not both"):
        rasmk(Z, Z_POS, Z_BOXES, TOY, word_budget=1.0, max_words=1)


def test_word_on_its_centroid_is_absent():
    # (4,0) sits on c1: zero residual, so word 1 is not stored (DELF drops norms <= 1e-6)
    a = asmk(np.array([[1.0, 0.0], [4.0, 0.0]]), TOY)
    np.testing.assert_array_equal(a.words, [0])
    assert a.gamma == 1.0
    empty = asmk(np.zeros((0, 2)), TOY)
    assert len(empty) == 0 and empty.gamma == 0.0


def test_matches_delf_reference_values():
    """The inputs and expected outputs of DELF's own tests (tensorflow/models research/delf/delf/python/
    feature_aggregation_extractor_test.py): 5-word codebook, region 1 = features 0-2, region 2 = feature 3."""
    codebook = Codebook(np.array([[0.5, 0.5], [0.0, 0.0], [1.0, 0.0], [-0.5, -0.5], [0.0, 1.0]]))
    f = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 2.0], [0.0, 2.0]])
    positions = np.array([[0.25, 0.5]] * 3 + [[0.75, 0.5]])
    boxes = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    np.testing.assert_allclose(to_dense(vlad(f[:3], codebook), 5),
                               [0, 0, 0, 0, 0, 0, -0.316228, 0.316228, 0.632456, 0.632456], atol=1e-6)
    np.testing.assert_allclose(to_dense(rvlad(f, positions, boxes, codebook), 5),
                               [0, 0, 0, 0, 0, 0, -0.158114, 0.158114, 0.316228, 0.816228], atol=1e-6)
    np.testing.assert_allclose(to_dense(rvlad(f, positions, boxes, codebook, pooling="l2"), 5),
                               [0, 0, 0, 0, 0, 0, -0.175011, 0.175011, 0.350021, 0.903453], atol=1e-6)
    r = rasmk(f, positions, boxes, codebook)
    np.testing.assert_array_equal(r.words, [3, 4])
    np.testing.assert_allclose(r.vectors.ravel(), [-0.707107, 0.707107, 0.361261, 0.932465], atol=1e-6)
    np.testing.assert_array_equal(rasmk(f, positions, boxes, codebook, binary=True).vectors.ravel(), [64, 192])
    multi = asmk(f[:3], codebook, assignments=3)
    np.testing.assert_array_equal(multi.words, [0, 2, 3])
    np.testing.assert_allclose(multi.vectors.ravel(), [0.707107, 0.707107, 0, 1, -0.707107, 0.707107], atol=1e-6)


# Regional example. Database image Z (descriptor @ position):
#   z1 = (1,0) @ (0.2,0.2) -> c0, residual (1,0)
#   z2 = (0,3) @ (0.8,0.8) -> c0, residual (0,3)
#   z3 = (5,0) @ (0.8,0.2) -> c1, residual (1,0)
# Regions: r1 = full image {z1,z2,z3}, r2 = (0.5,0.5,1,1) {z2}: both hold word 0.
#   r1: V_0 = (1,3), V_1 = (1,0), ||V(r1)|| = sqrt(11);  r2: V_0 = (0,3), ||V(r2)|| = 3
# Query Q: (0,2) -> c0 (0,2), (5,0) -> c1 (1,0): V_hat(Q_0) = (0,1), V_hat(Q_1) = (1,0), gamma(Q) = 1/sqrt2
Z = np.array([[1.0, 0.0], [0.0, 3.0], [5.0, 0.0]])
Z_POS = np.array([[0.2, 0.2], [0.8, 0.8], [0.8, 0.2]])
Z_BOXES = [FULL_IMAGE, (0.5, 0.5, 1.0, 1.0)]
Q = np.array([[0.0, 2.0], [5.0, 0.0]])


def test_rasmk_regional_normalisation_by_hand():
    q = asmk(Q, TOY)
    # DELF R-ASMK: S_0 = (1,3)/sqrt11 + (0,3)/3 = (0.3015113, 1.9045340), ||S_0|| = 1.9282528
    #              V_hat_R(0) = (0.1563651, 0.9876993);  S_1 = (1,0)/sqrt11 -> (1,0)
    r = rasmk(Z, Z_POS, Z_BOXES, TOY)
    np.testing.assert_allclose(r.vectors, [[0.1563651, 0.9876993], [1.0, 0.0]], atol=1e-6)
    assert r.gamma == 1.0  # DELF's regional setting: no database normaliser
    # K = (1/sqrt2) (0.9876993^3 + 1^3) = 0.7071068 * (0.9635501 + 1) = 1.3884396
    assert pair_similarity(q, r) == pytest.approx(1.3884396, rel=1e-6)
    # per-word region weights: S_0 = (1,3)/sqrt10 + (0,1) = (0.3162278, 1.9486833) -> (0.1601822, 0.9870874)
    w = rasmk(Z, Z_POS, Z_BOXES, TOY, region_weights="word")
    np.testing.assert_allclose(w.vectors, [[0.1601822, 0.9870874], [1.0, 0.0]], atol=1e-6)
    # with the ASMK normaliser: gamma(Z) = 1/sqrt2 -> K = (1/2) * 1.9635501 = 0.9817750
    assert pair_similarity(q, rasmk(Z, Z_POS, Z_BOXES, TOY, normalize=True)) == pytest.approx(0.9817750, rel=1e-6)
    # R-ASMK*: S_0 > 0 -> 11 (192), S_1 = (1,0) -> 10 (128)
    np.testing.assert_array_equal(rasmk(Z, Z_POS, Z_BOXES, TOY, binary=True).vectors.ravel(), [192, 128])


def test_rasmk_word_budget_keeps_the_longest_summed_residuals_up_to_a_multiple_of_the_full_image_words():
    # Regions described by their own features (crops): the full image {(1,0)} has word 0 only, residual (1,0),
    # ||V|| = 1; the crop {(5,0), (0,3)} has V_0 = (0,3), V_1 = (1,0), ||V|| = sqrt10.
    #   S_0 = (1,0) + (0,3)/sqrt10 = (1, 0.9486833), ||S_0|| = 1.3784049 -> (0.7254763, 0.6882472)
    #   S_1 = (1,0)/sqrt10, ||S_1|| = 0.3162278 -> (1, 0)
    regions = [(np.array([[1.0, 0.0]]), None), (np.array([[5.0, 0.0], [0.0, 3.0]]), None)]
    free = rasmk(regions, None, None, TOY)
    np.testing.assert_array_equal(free.words, [0, 1])  # 2 words: twice the full image's ASMK memory
    for budget in (1.0, 1.9):  # floor(budget x 1 full-image word) = 1: the longer S_0 stays
        capped = rasmk(regions, None, None, TOY, word_budget=budget)
        np.testing.assert_array_equal(capped.words, [0])
        np.testing.assert_allclose(capped.vectors, [[0.7254763, 0.6882472]], atol=1e-6)
    assert rasmk(regions, None, None, TOY, word_budget=2.0).words.tolist() == [0, 1]
    # boxes over one feature set: Z's full image has 2 words; budget 0.5 keeps S_0 (norm 1.93 > 0.30)
    half = rasmk(Z, Z_POS, Z_BOXES, TOY, word_budget=0.5)
    np.testing.assert_array_equal(half.words, [0])
    np.testing.assert_allclose(half.vectors, [[0.1563651, 0.9876993]], atol=1e-6)
    with pytest.raises(ValueError, match="word_budget"):
        rasmk(Z, Z_POS, Z_BOXES, TOY, word_budget=-1)


def test_naive_rasmk_differs_from_rasmk():
    q = asmk(Q, TOY)
    # naive: Phi_R(c) = (1/2) sum_r (#words_r)^(-1/2) V_hat(Z_c^r); r1 has 2 words, r2 one
    #   Phi_R(0) = 1/2 [ (1,3)/sqrt10/sqrt2 + (0,1) ] = (0.1118034, 0.8354102)   (norm 0.84 < 1)
    #   Phi_R(1) = 1/2 [ (1,0)/sqrt2 ]                = (0.3535534, 0)           (a word of one region of two)
    n = naive_rasmk(Z, Z_POS, Z_BOXES, TOY)
    np.testing.assert_allclose(n.vectors, [[0.1118034, 0.8354102], [0.3535534, 0.0]], atol=1e-6)
    # K = (1/sqrt2)(0.8354102^3 + 0.3535534^3) = 0.7071068 * (0.5830330 + 0.0441942) = 0.4435224
    assert pair_similarity(q, n) == pytest.approx(0.4435224, rel=1e-6)
    # R-ASMK renormalises per word: word 1 keeps sigma = 1 instead of 0.0441942 -> 1.3884396 (test above)
    assert pair_similarity(q, rasmk(Z, Z_POS, Z_BOXES, TOY)) > 3 * pair_similarity(q, n)
    # plain ASMK of Z (no regions): V_hat(0) = (1,3)/sqrt10, gamma(Z) = 1/sqrt2
    #   K = (1/2)(0.9486833^3 + 1) = 0.9269075
    assert pair_similarity(q, asmk(Z, TOY)) == pytest.approx(0.9269075, rel=1e-6)


def test_rvlad_mean_of_regional_vlads():
    # VLAD(r1) = (1,3,1,0)/sqrt11, VLAD(r2) = (0,3,0,0)/3 = (0,1,0,0); mean = (0.1507557, 0.9522670, 0.1507557, 0)
    r = rvlad(Z, Z_POS, Z_BOXES, TOY)
    np.testing.assert_allclose(to_dense(r, 2), [0.1507557, 0.9522670, 0.1507557, 0], atol=1e-6)
    # it equals the average of the two regional VLAD similarities with any query VLAD
    q = vlad(Q, TOY)
    regional = [vlad(Z[in_box(Z_POS, b)], TOY) for b in Z_BOXES]
    expected = np.mean([pair_similarity(q, v, IDENTITY) for v in regional])
    assert pair_similarity(q, r, IDENTITY) == pytest.approx(expected, rel=1e-6)
    l2 = rvlad(Z, Z_POS, Z_BOXES, TOY, pooling="l2")
    assert np.linalg.norm(l2.vectors) == pytest.approx(1.0, rel=1e-6)


def test_region_membership_closed_boxes():
    box = (0.5, 0.5, 1.0, 1.0)
    positions = np.array([[0.5, 0.5], [1.0, 1.0], [0.75, 0.5], [0.4999999, 0.75], [0.75, 1.0000001], [0.0, 0.0]])
    np.testing.assert_array_equal(in_box(positions, box), [True, True, True, False, False, False])
    # a feature on the edge shared by two boxes belongs to both
    left, right = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
    assert in_box([[0.5, 0.3]], left)[0] and in_box([[0.5, 0.3]], right)[0]
    assert in_box(grid_positions(3, 4), FULL_IMAGE).all()
    with pytest.raises(ValueError):
        in_box(positions, (0.6, 0.0, 0.5, 1.0))


def _random_items(rng, count, num_words, dims, binary, max_words=12):
    items = []
    for i in range(count):
        n = 0 if i == 3 else int(rng.integers(1, max_words + 1))  # image 3 has no words
        words = np.sort(rng.choice(num_words, n, replace=False)).astype(np.int64)
        v = rng.normal(size=(n, dims))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        vectors = np.packbits(v > 0, axis=1) if binary else v.astype(np.float32)
        items.append(Aggregated(words, vectors, dims, n ** -0.5 if n else 0.0))
    return items


@pytest.mark.parametrize("binary,dims", [(False, 16), (True, 16), (True, 64), (True, 12)])
def test_vectorised_scores_equal_pair_loop(binary, dims, monkeypatch):
    rng = np.random.default_rng(0)
    database = _random_items(rng, 40, 24, dims, binary)
    queries = _random_items(rng, 5, 24, dims, binary)
    db = AggregatedDatabase.build(database, num_words=24)
    monkeypatch.setattr(agg, "_SCORE_CHUNK", 7)  # several chunks per query
    for sigma in (ASMK_SELECTIVITY, IDENTITY):
        for q in queries:
            expected = [pair_similarity(q, item, sigma) for item in database]
            np.testing.assert_allclose(db.scores(q, sigma), expected, rtol=1e-5, atol=1e-6)
        expected = np.array([[pair_similarity(q, item, sigma) for item in database] for q in queries])
        assert db.one_entry_per_word
        np.testing.assert_allclose(db.score_block(queries, sigma), expected, rtol=1e-5, atol=1e-6)
    rows = AggregatedScores(queries, db).rows(1, 4).numpy()
    np.testing.assert_allclose(rows[0], [pair_similarity(queries[1], item) for item in database], rtol=1e-5,
                               atol=1e-6)
    for i in (0, 3, 17):
        back = db.image(i)
        np.testing.assert_array_equal(back.words, database[i].words)
        np.testing.assert_array_equal(back.vectors, database[i].vectors)


def test_score_block_with_a_repeated_word_takes_the_per_query_path():
    rng = np.random.default_rng(2)
    database = _random_items(rng, 6, 10, 8, False, max_words=6)
    twice = Aggregated(np.array([2, 2], dtype=np.int64), np.ones((2, 8), np.float32) / 8 ** 0.5, 8, 0.5)
    db = AggregatedDatabase.build([*database, twice], num_words=10)
    assert not db.one_entry_per_word
    queries = _random_items(rng, 3, 10, 8, False, max_words=6)
    expected = np.array([[pair_similarity(q, item) for item in [*database, twice]] for q in queries])
    np.testing.assert_allclose(db.score_block(queries), expected, rtol=1e-5, atol=1e-6)
    assert db.score_block([]).shape == (0, 7)


@pytest.mark.parametrize("binary", [False, True])
def test_rows_and_flat_file_round_trip(binary, tmp_path):
    rng = np.random.default_rng(1)
    items = _random_items(rng, 10, 30, 16, binary)
    rows = to_rows(items, max_words=12)
    assert rows.dtype == (np.uint8 if binary else np.float32)
    assert rows.shape == (10, agg.row_width(12, 16, binary))
    back = from_rows(rows, dims=16)
    for a, b in zip(items, back):
        np.testing.assert_array_equal(a.words, b.words)
        np.testing.assert_array_equal(a.vectors, b.vectors)
        assert a.gamma == pytest.approx(b.gamma, rel=1e-7)
    np.testing.assert_array_equal(rows_descriptor_bytes(rows, 16, 30), [a.descriptor_bytes(30) for a in items])
    db = AggregatedDatabase.build(back, num_words=30)
    db.save(tmp_path / "db.npz")
    loaded = AggregatedDatabase.load(tmp_path / "db.npz")
    np.testing.assert_array_equal(loaded.scores(items[0]), db.scores(items[0]))
    np.testing.assert_array_equal(loaded.descriptor_bytes(), [a.descriptor_bytes(30) for a in items])
    with pytest.raises(ValueError):
        to_rows(items, max_words=5)


def test_codebook_cache(tmp_path):
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(c, 0.1, size=(100, 4)) for c in (-3, 0, 3)]).astype(np.float32)
    calls = []

    def descriptors():
        calls.append(1)
        return data

    source = {"test": "toy"}
    first = fit_or_load_codebook(descriptors, 3, tmp_path, source, niter=5, seed=0)
    second = fit_or_load_codebook(descriptors, 3, tmp_path, source, niter=5, seed=0)
    assert len(calls) == 1                                   # the second call loaded the file
    np.testing.assert_array_equal(first.centroids, second.centroids)
    key = codebook_key(codebook_config(3, source, niter=5, seed=0))
    assert (tmp_path / f"codebook-{key}.npy").is_file()
    assert json.loads((tmp_path / f"codebook-{key}.json").read_text())["words"] == 3
    assert sorted(np.round(first.centroids[:, 0]).tolist()) == [-3, 0, 3]
    # a different config is a different key (and a new fit)
    assert codebook_key(codebook_config(3, source, niter=5, seed=1)) != key
    assert codebook_key(codebook_config(4, source, niter=5, seed=0)) != key
    assert codebook_key(codebook_config(3, {"test": "other"}, niter=5, seed=0)) != key
    fit_or_load_codebook(descriptors, 3, tmp_path, source, niter=5, seed=1)
    assert len(calls) == 2 and len(list(tmp_path.glob("codebook-*.npy"))) == 2
    words, distances = first.assign(np.array([[3.0, 3, 3, 3], [-3.0, -3, -3, -3]]), k=2)
    assert np.round(first.centroids[words[:, 0], 0]).tolist() == [3, -3]
    assert (distances[:, 0] <= distances[:, 1]).all()


def test_local_feature_selection_hand_made_map():
    # 1 image, 2 channels, 2 x 3 map; norms: row 0 = [5, 1, 0], row 1 = [3, 5, 2] (from 3-4-5 triangles)
    fmap = torch.zeros(1, 2, 2, 3)
    fmap[0, :, 0, 0] = torch.tensor([3.0, 4.0])   # 5
    fmap[0, :, 0, 1] = torch.tensor([1.0, 0.0])   # 1
    fmap[0, :, 1, 0] = torch.tensor([0.0, 3.0])   # 3
    fmap[0, :, 1, 1] = torch.tensor([4.0, 3.0])   # 5 (tie with (0,0): raster order first)
    fmap[0, :, 1, 2] = torch.tensor([0.0, 2.0])   # 2
    (features,) = select_local_features(fmap, max_features=3)
    np.testing.assert_allclose(features.scores, [5, 5, 3])
    # cell centres: cx = (j + 0.5) / 3, cy = (i + 0.5) / 2
    np.testing.assert_allclose(features.positions, [[1 / 6, 0.25], [0.5, 0.75], [1 / 6, 0.75]], rtol=1e-6)
    np.testing.assert_allclose(features.descriptors, [[0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], rtol=1e-6)
    assert len(select_local_features(fmap, max_features=100)[0]) == 6


def test_local_features_per_scale_keep_the_best_of_every_scale():
    from msretrieval.retrieval.aggregation.local_features import _select

    # scale 1: a 2 x 3 map with norms [5, 1, 0 / 3, 5, 2] (as above); scale 0.5: a 1 x 2 map with norms [4, 0.5]
    fine = torch.zeros(1, 2, 2, 3)
    fine[0, :, 0, 0], fine[0, :, 0, 1] = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])
    fine[0, :, 1, 0], fine[0, :, 1, 1] = torch.tensor([0.0, 3.0]), torch.tensor([4.0, 3.0])
    fine[0, :, 1, 2] = torch.tensor([0.0, 2.0])
    coarse = torch.zeros(1, 2, 1, 2)
    coarse[0, :, 0, 0], coarse[0, :, 0, 1] = torch.tensor([0.0, 4.0]), torch.tensor([0.5, 0.0])
    maps = [(1.0, fine), (0.5, coarse)]
    # over the image: the best 2 of all 8 positions are both at scale 1
    (joint,) = _select(maps, max_features=2)
    np.testing.assert_allclose(joint.scores, [5, 5])
    np.testing.assert_array_equal(joint.scales, [1.0, 1.0])
    # per scale: the best 2 of each (5, 5 | 4, 0.5), all 4 sorted by score; positions at each map's cell centres
    (each,) = _select(maps, max_features=2, per_scale=True)
    np.testing.assert_allclose(each.scores, [5, 5, 4, 0.5])
    np.testing.assert_array_equal(each.scales, [1.0, 1.0, 0.5, 0.5])
    np.testing.assert_allclose(each.positions, [[1 / 6, 0.25], [0.5, 0.75], [0.25, 0.5], [0.75, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(each.descriptors[2:], [[0.0, 1.0], [1.0, 0.0]])
    # a tie across scales goes to the scale listed first: norm 5 at scale 0.5 (listed first) and at scale 1
    coarse[0, :, 0, 1] = torch.tensor([4.0, 3.0])
    (tied,) = _select([(0.5, coarse), (1.0, fine)], max_features=1, per_scale=True)
    np.testing.assert_allclose(tied.scores, [5, 5])
    np.testing.assert_array_equal(tied.scales, [0.5, 1.0])
    np.testing.assert_allclose(tied.positions, [[0.75, 0.5], [1 / 6, 0.25]], rtol=1e-6)


def test_per_scale_selection_is_in_the_extractor_key_only_where_it_selects_other_features():
    from msretrieval.models.backbones import create_backbone

    backbone = create_backbone("resnet18", pretrained=False)
    one = LocalFeatureExtractor(backbone, tap="layer2", max_features=7, per_scale=True)
    assert "max_features_per" not in one.config() and one.features_per_image() == 7
    assert one.config() == LocalFeatureExtractor(backbone, tap="layer2", max_features=7).config()
    several = LocalFeatureExtractor(backbone, tap="layer2", max_features=7, scales=(1.0, 2.0), per_scale=True)
    assert several.config()["max_features_per"] == "scale" and several.features_per_image() == 14
    joint = LocalFeatureExtractor(backbone, tap="layer2", max_features=7, scales=(1.0, 2.0))
    assert "max_features_per" not in joint.config() and joint.features_per_image() == 7
    assert several.features_per_image((1.0, 2.0, 4.0)) == 21 and joint.features_per_image((1.0, 2.0, 4.0)) == 7


def test_local_feature_extractor_batch_and_pca(one_thread):
    from msretrieval.models.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=False).eval()
    extractor = LocalFeatureExtractor(backbone, max_features=20, scales=(1.0, 0.5), dims=8)
    images = torch.randn(2, 3, 64, 96)
    raw = extractor.raw(images)
    assert len(raw) == 2 and raw[0].descriptors.shape == (20, 672)   # blocks5_expand: 4 x 6 + 2 x 3 cells
    assert ((raw[0].positions >= 0) & (raw[0].positions <= 1)).all()
    assert (np.diff(raw[0].scores) <= 0).all()
    train = extractor.fit([images, images.flip(3)])
    assert train.shape == (80, 8)
    final = extractor(images)
    assert final[1].descriptors.shape == (20, 8)
    np.testing.assert_allclose(np.linalg.norm(final[1].descriptors, axis=1), 1.0, rtol=1e-5)
    # a refit on the same data gives the same PCA (seeded), so a codebook cached in that space stays valid
    before = extractor.pca_state()["basis"].copy()
    extractor.fit([images, images.flip(3)])
    np.testing.assert_array_equal(extractor.pca_state()["basis"], before)
    # single image of the batch alone gives the same features
    alone = extractor(images[1:])[0]
    np.testing.assert_allclose(alone.descriptors, final[1].descriptors, atol=1e-4)


def test_fitting_local_features_leaves_the_backbone_batchnorm_statistics_alone(one_thread):
    """create_backbone returns a module in training mode; fitting the PCA through it used to run BatchNorm on
    batch statistics and overwrite the running ones, so every later extraction used other weights."""
    from msretrieval.models.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=False)
    assert backbone.training
    stats = {name: tensor.clone() for name, tensor in backbone.state_dict().items() if "running" in name}
    extractor = LocalFeatureExtractor(backbone, max_features=10, dims=4)
    extractor.fit([torch.randn(2, 3, 64, 64) * 3 + 1, torch.randn(2, 3, 64, 64)])
    after = backbone.state_dict()
    assert all(torch.equal(after[name], value) for name, value in stats.items())
    assert extractor.config()["backbone_mode"] == "eval"


def test_a_codebook_of_another_format_version_is_fitted_again(tmp_path, monkeypatch):
    from msretrieval.retrieval.aggregation import codebook
    data = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    key = codebook_key(codebook_config(3, {"test": "toy"}, niter=5))
    fit_or_load_codebook(data, 3, tmp_path, {"test": "toy"}, niter=5)
    monkeypatch.setattr(codebook, "CODEBOOK_FORMAT", codebook.CODEBOOK_FORMAT + 1)
    assert codebook_key(codebook_config(3, {"test": "toy"}, niter=5)) != key
    fit_or_load_codebook(data, 3, tmp_path, {"test": "toy"}, niter=5)
    assert len(list(tmp_path.glob("codebook-*.npy"))) == 2


def test_a_pca_with_too_few_training_descriptors_says_what_to_raise():
    from msretrieval.models.backbones import create_backbone
    from msretrieval.utils.errors import UserError

    extractor = LocalFeatureExtractor(create_backbone("resnet18", pretrained=False), tap="layer2", dims=8)
    with pytest.raises(UserError, match="needs more than 8 training descriptors, got 8: fit on more images"):
        extractor.fit_pca(np.random.default_rng(0).normal(size=(8, 128)))
    extractor.fit_pca(np.random.default_rng(0).normal(size=(9, 128)))
    assert extractor.pca_state()["basis"].shape == (128, 8)
