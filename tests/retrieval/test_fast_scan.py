"""AsymmetricFastScan: FAISS's fast scan of packed codes as a 4-bit product quantizer of sign patterns ranks by
the asymmetric score <projection, code in {-1, +1}>, up to 8-bit lookup tables."""
from __future__ import annotations

import numpy as np
import pytest

from msretrieval.retrieval.search.binary import AsymmetricScores, pack_bits
from msretrieval.retrieval.search.fast_scan import AsymmetricFastScan

# 8-bit codes 00000000, 00000001, 00000011, 00000111, 11111111, 00001111
CODES = pack_bits(np.unpackbits(np.array([[0b00000000], [0b00000001], [0b00000011], [0b00000111], [0b11111111],
                                          [0b00001111]], dtype=np.uint8), axis=1))


def test_scores_are_the_asymmetric_scores_up_to_the_tables_quantisation():
    # (-1 x 7, +3) against the codes as signs: 7 - 3 = 4, 7 + 3 = 10, 6 - 1 + 3 = 8, 5 - 2 + 3 = 6, -7 + 3 = -4,
    # 4 - 3 + 3 = 4
    projection = np.array([[-1, -1, -1, -1, -1, -1, -1, 3]], dtype=np.float32)
    scores, rows = AsymmetricFastScan(CODES).search(projection, 10)
    assert rows.shape == (1, 6)  # never more than the codes held
    assert rows[0, :3].tolist() == [1, 2, 3] and rows[0, 5] == 4 and set(rows[0, 3:5]) == {0, 5}
    expected = np.array([10, 8, 6, 4, 4, -4])
    assert np.abs(scores[0] - expected).max() < 0.05  # 8-bit tables over a range of 20


def test_the_groups_of_later_bytes_are_their_own_bits():
    database = np.array([[0b00000000, 0b10000000], [0b00000000, 0b00000001]], dtype=np.uint8)  # bit 8; bit 15
    query = np.zeros((1, 16), dtype=np.float32)
    query[0, 8], query[0, 15] = 2, 0.25
    scores, rows = AsymmetricFastScan(database).search(query, 2)  # +2 - 0.25 and -2 + 0.25
    assert rows.tolist() == [[0, 1]]
    np.testing.assert_allclose(scores, [[1.75, -1.75]], atol=0.01)


def test_the_shortlist_is_the_exact_asymmetric_one_but_for_near_ties():
    rng = np.random.default_rng(5)
    codes, queries = rng.integers(0, 256, (3000, 8), dtype=np.uint8), rng.standard_normal((20, 64)).astype(np.float32)
    scores, rows = AsymmetricFastScan(codes).search(queries, 50)
    exact = AsymmetricScores(queries, codes)
    overlap = np.mean([len(np.intersect1d(a, b)) / 50 for a, b in zip(rows, exact.top_k(50)[1])])
    assert overlap > 0.95
    full = exact.rows(0, 20).numpy()
    assert np.abs(np.take_along_axis(full, rows, 1) - scores).max() < 0.01 * (full.max() - full.min())
    with pytest.raises(ValueError, match="do not match 64-bit codes"):
        AsymmetricFastScan(codes).search(queries[:, :32], 5)


def test_queries_faiss_answers_short_get_the_exact_scan(monkeypatch):
    """FAISS 1.15's fast scan sometimes leaves out the lowest-scoring codes when k is the whole database (the
    all-ones query below against these codes: 5 of 6 found); such a query is answered by the exact scan."""
    index = AsymmetricFastScan(CODES)
    projection = np.array([[-1, -1, -1, -1, -1, -1, -1, 3], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=np.float32)
    faiss_answer = (np.array([[10, 8, 6, 4, 4, 0], [8, 0, -2, -4, -6, -8]], dtype=np.float32),
                    np.array([[1, 2, 3, 5, -1, -1], [4, 5, 3, 2, 1, 0]]))  # the first query short of two
    monkeypatch.setattr(index.index, "search", lambda queries, k: tuple(a.copy() for a in faiss_answer))
    scores, rows = index.search(projection, 6)
    # the first query's exact scores 4 10 8 6 -4 4: order 1 2 3 0 5 4 (0 and 5 tie: ascending index)
    np.testing.assert_array_equal(rows, [[1, 2, 3, 0, 5, 4], [4, 5, 3, 2, 1, 0]])
    np.testing.assert_array_equal(scores, [[10, 8, 6, 4, 4, -4], [8, 0, -2, -4, -6, -8]])
