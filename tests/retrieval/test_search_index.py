"""SearchIndex: exact flat search, binary IVF and multi-index hashing, and clear errors for bad input."""
import numpy as np
import pytest

from msretrieval.retrieval.search.binary import hamming_distances
from msretrieval.retrieval.search.index import SearchIndex


def brute_force_hamming(queries, database, k):
    distances = hamming_distances(queries, database)
    order = np.stack([np.lexsort((np.arange(len(row)), row))[:k] for row in distances])
    return np.take_along_axis(distances, order, axis=1), order


@pytest.fixture(scope="module")
def clustered_codes():
    """64-bit codes around 20 centres (a few bits flipped each), so IVF cells mean something."""
    rng = np.random.default_rng(0)
    centres = rng.random((20, 64)) < 0.5
    bits = centres[rng.integers(0, 20, 3000)] ^ (rng.random((3000, 64)) < 0.08)
    codes = np.packbits(bits, axis=1)
    return codes, codes[rng.choice(3000, 40, replace=False)] ^ np.uint8(1)  # queries: near-duplicates


def test_flat_is_the_exact_hamming_top_k(clustered_codes):
    database, queries = clustered_codes
    scores, indices = SearchIndex(database, "hamming").search(queries, 25, chunk=16)
    distances, order = brute_force_hamming(queries, database, 25)
    np.testing.assert_array_equal(-scores, distances)
    np.testing.assert_array_equal(indices, order)
    assert scores.dtype == np.float32 and indices.dtype == np.int64


def test_ivf_probing_every_cell_gives_the_exact_distances(clustered_codes):
    database, queries = clustered_codes
    index = SearchIndex(database, "hamming", factory="BIVF16", nprobe=16, train_size=1000)
    scores, indices = index.search(queries, 10)
    distances, _ = brute_force_hamming(queries, database, 10)
    np.testing.assert_array_equal(-scores, distances)
    # every returned pair is right (which of several tied items is returned may differ from the flat order)
    np.testing.assert_array_equal(-scores, np.take_along_axis(hamming_distances(queries, database), indices, 1))
    # one probe visits fewer items; it still returns true distances of what it finds
    scores, indices = SearchIndex(database, "hamming", factory="BIVF16", nprobe=1).search(queries, 10)
    found = indices >= 0
    assert found[:, 0].all()
    np.testing.assert_array_equal(-scores[found], np.take_along_axis(hamming_distances(queries, database),
                                                                      np.maximum(indices, 0), 1)[found])


def test_multi_index_hashing_finds_near_duplicates(clustered_codes):
    database, _ = clustered_codes
    queries = database[:30]
    scores, indices = SearchIndex(database, "hamming", factory="BHash4x16", nflip=1).search(queries, 5)
    assert (scores[:, 0] == 0).all()  # each query finds an exact copy of itself
    found = indices >= 0
    true = np.take_along_axis(hamming_distances(queries, database), np.maximum(indices, 0), 1)
    np.testing.assert_array_equal(-scores[found], true[found])
    assert np.isneginf(scores[~found]).all()


def test_float_flat_and_factory():
    rng = np.random.default_rng(1)
    database = rng.standard_normal((200, 16)).astype(np.float32)
    queries = rng.standard_normal((5, 16))  # float64: converted
    scores, indices = SearchIndex(database, factory="Flat").search(queries, 4)
    np.testing.assert_array_equal(indices, np.argsort(-(queries @ database.T), axis=1)[:, :4])
    scores, indices = SearchIndex(database, factory="IVF4,Flat", nprobe=4).search(queries, 4)
    np.testing.assert_array_equal(indices, np.argsort(-(queries @ database.T), axis=1)[:, :4])


@pytest.mark.parametrize("build, message", [
    (lambda: SearchIndex(np.zeros((4, 8), np.float32), "hamming"), "uint8"),
    (lambda: SearchIndex(np.zeros((4, 8), np.int64), "hamming"), "uint8"),
    (lambda: SearchIndex(np.zeros(8, np.uint8), "hamming"), "2-D"),
    (lambda: SearchIndex(np.zeros((0, 8), np.uint8), "hamming"), "empty"),
    (lambda: SearchIndex(np.zeros((4, 8), np.uint8)), "float descriptors"),
    (lambda: SearchIndex(np.zeros((4, 8), np.uint8), "hamming", factory="BNope"), "factory 'BNope'"),
    (lambda: SearchIndex(np.zeros((4, 8), np.uint8), "hamming", factory="BHash8x16"), "factory 'BHash8x16'"),
    (lambda: SearchIndex(np.zeros((4, 8), np.uint8), "hamming", nprobe=4), "nprobe does not apply"),
    (lambda: SearchIndex(np.zeros((4, 8), np.uint8), "cosine"), "metric"),
])
def test_bad_input_is_one_clear_error(build, message):
    with pytest.raises(ValueError, match=message) as error:
        build()
    assert "\n" not in str(error.value)


def test_bad_queries_are_one_clear_error():
    codes = SearchIndex(np.zeros((4, 8), np.uint8), "hamming")
    with pytest.raises(ValueError, match="4 bytes per code, the index holds 8-byte codes"):
        codes.search(np.zeros((2, 4), np.uint8), 1)
    with pytest.raises(ValueError, match="uint8"):
        codes.search(np.zeros((2, 8), np.float32), 1)
    with pytest.raises(ValueError, match="at least 1"):
        codes.search(np.zeros((2, 8), np.uint8), 0)
    vectors = SearchIndex(np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="16 dimensions, the index holds 8-dimensional"):
        vectors.search(np.zeros((2, 16), np.float32), 1)
