"""MSBD binary learning (ITQ, Algorithm 1), packed Hamming distances and the dissimilarity (Eq. 7-8)."""
import numpy as np
import pytest
import torch

from msretrieval.baselines.msbd.binary import learn_msbd, sparse_loss, sparsify_exact, sparsify_random
from msretrieval.models.hashing import learn_itq
from msretrieval.baselines.msbd.dissimilarity import DissimilarityScores, msbd_dissimilarity
from msretrieval.retrieval.search.binary import HammingScores, hamming_distances, pack_bits, unpack_bits
from msretrieval.retrieval.search.index import SearchIndex


def _data(n=200, d=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))  # correlated dimensions, like real descriptors
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _non_increasing(values, rtol=1e-5):
    values = np.asarray(values)
    return bool((np.diff(values) <= rtol * np.abs(values[:-1])).all())


def test_itq_objective_decreases_monotonically():
    model = learn_itq(_data(), bits=16, iterations=20)
    assert len(model.objective) == 20 and _non_increasing(model.objective)
    assert model.objective[-1] < model.objective[0]


@pytest.mark.parametrize("sparsify,density", [("exact", 0.3), ("random", 0.3), ("exact", None)])
def test_sparse_learning_objective_decreases_monotonically(sparsify, density):
    model = learn_msbd(_data(), bits=16, density=density, iterations=15, itq_iterations=10, sparsify=sparsify,
                       trials=20)
    assert len(model.objective) == 15 and _non_increasing(model.objective)
    assert model.objective[-1] < model.objective[0]


def test_every_code_has_at_most_k_ones():
    x = _data()
    model = learn_msbd(x, bits=32, density=0.25, iterations=5, itq_iterations=5)
    codes = model.encode(x)
    assert model.k == 8 and codes.shape == (200, 32) and codes.sum(1).max() <= 8
    no_sparsity = learn_msbd(x, bits=32, density=None, iterations=3, itq_iterations=3)
    assert no_sparsity.k is None and no_sparsity.encode(x).sum(1).max() > 8


def test_random_trials_zero_only_ones_and_never_raise_the_loss():
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(40, 24, generator=generator) * 0.2
    bits = v > 0
    sparse = sparsify_random(v, bits, k=3, trials=200, alpha=0.001, generator=generator)
    assert not (sparse & ~bits).any()                     # only ones are zeroed
    assert (sparse.sum(1) <= torch.clamp(bits.sum(1), max=3)).all()
    assert (sparse_loss(v, sparse, 0.001) <= sparse_loss(v, bits, 0.001) + 1e-6).all()
    exact = sparsify_exact(v, bits, k=3, alpha=0.001)     # the best trial: never worse than a random one
    assert (sparse_loss(v, exact, 0.001) <= sparse_loss(v, sparse, 0.001) + 1e-6).all()


def test_exact_sparsification_keeps_the_largest_projections():
    v = torch.tensor([[0.30, 0.10, 0.20, -0.5, 0.05]])
    kept = sparsify_exact(v, v > 0, k=2, alpha=0.0)
    assert kept.tolist() == [[True, False, True, False, False]]


def test_packed_hamming_equals_unpacked():
    rng = np.random.default_rng(1)
    for bits in (24, 64, 256):  # 24: not a multiple of 64, byte-wise popcount path
        q, db = rng.random((7, bits)) < 0.4, rng.random((11, bits)) < 0.4
        expected = (q[:, None, :] != db[None, :, :]).sum(2)
        assert np.array_equal(hamming_distances(pack_bits(q), pack_bits(db)), expected)
        assert np.array_equal(unpack_bits(pack_bits(q), bits), q)
        assert np.array_equal(HammingScores(pack_bits(q), pack_bits(db)).rows(2, 5).numpy(), -expected[2:5])


def test_hamming_matches_the_faiss_binary_index():
    rng = np.random.default_rng(2)
    q, db = pack_bits(rng.random((5, 128)) < 0.5), pack_bits(rng.random((30, 128)) < 0.5)
    scores, indices = SearchIndex(db, "hamming").search(q, 30)
    expected = hamming_distances(q, db)
    assert np.array_equal(-scores, np.take_along_axis(expected, indices, axis=1))


def test_pack_bits_rejects_signed_codes():
    with pytest.raises(ValueError, match="0/1"):
        pack_bits(np.array([[-1, 1, 1, -1, 1, 1, 1, 1]]))


def test_dissimilarity_on_a_hand_made_example():
    codes = pack_bits(np.array([[1, 0, 1, 0, 0, 0, 0, 0],
                                [1, 1, 1, 0, 0, 0, 0, 1],
                                [0, 0, 1, 0, 0, 0, 0, 0]], dtype=bool))
    probs = np.array([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1]])
    d = msbd_dissimilarity(codes[:1], probs[:1], codes, probs).numpy()
    # item 0 (itself): Hamming 0; W = <p,p> max(p) = 0.5 * 0.5 = 0.25; L1 = 0 -> 0
    # item 1: Hamming 2; W = 0.25; L1 = 0 -> 2
    # item 2: Hamming 1; W = (0.45 + 0.05) * 0.9 = 0.45; L1 = 0.4 + 0.4 = 0.8 -> 0.55 * 0.8 + 1 = 1.44
    np.testing.assert_allclose(d, [[0.0, 2.0, 1.44]], atol=1e-12)
    # asymmetric: with item 2 as the query, W uses max(p) of item 0 (0.5) -> 0.25; 0.75 * 0.8 + 1 = 1.6
    d_back = msbd_dissimilarity(codes[2:], probs[2:], codes[:1], probs[:1]).numpy()
    np.testing.assert_allclose(d_back, [[1.6]], atol=1e-12)
    scores = DissimilarityScores(codes, probs, codes, probs)
    np.testing.assert_allclose(scores.rows(0, 1).numpy(), -d, atol=1e-12)
