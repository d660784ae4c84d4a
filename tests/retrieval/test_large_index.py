"""Index choice by database size, indexes built from sharded databases, exact search shard by shard."""
import numpy as np
import pytest

from msretrieval.retrieval.search.index import SearchIndex, choose_index
from msretrieval.retrieval.search.sharded_search import exact_search, merge_top_k
from msretrieval.retrieval.search.shards import ShardedArray, ShardWriter


def write_shards(folder, rows, shard_rows):
    writer = ShardWriter(folder, len(rows), shard_rows)
    for index, span in enumerate(writer.ranges):
        writer.write(index, rows[span.start:span.stop])
    return ShardedArray(folder)


def clustered_vectors(count, dim, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    rows = centres[rng.integers(0, 20, count)] + 0.3 * rng.standard_normal((count, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_small_databases_are_searched_exactly():
    assert choose_index(200_000, 512)["factory"] == "Flat"
    assert choose_index(200_000, 8, "hamming")["factory"] == "BFlat"
    assert choose_index(5_000, 32, flat_limit=5_000)["factory"] == "Flat"


def test_large_databases_get_an_inverted_file_with_recorded_parameters():
    chosen = choose_index(1_000_000, 512)
    # nlist: 4 sqrt(1e6) = 4000 -> 4096; m: 512 / 8 = 64 sub-quantizers; nprobe: 4096 / 32
    assert chosen == {"metric": "inner_product", "count": 1_000_000, "dim": 512, "flat_limit": 200_000,
                      "factory": "IVF4096,PQ64np", "m": 64, "nlist": 4096, "nprobe": 128, "train_size": 163_840}
    assert choose_index(1_000_000, 512, opq=True)["factory"] == "OPQ64,IVF4096,PQ64np"
    assert choose_index(300_000, 96)["factory"] == "IVF2048,PQ12np"  # 4 sqrt(3e5) = 2191 -> 2048
    assert choose_index(300_000, 100)["m"] == 10  # the largest divisor of D up to D / 8
    binary = choose_index(1_000_000, 8, "hamming")
    assert (binary["factory"], binary["nlist"], binary["nprobe"]) == ("BIVF4096", 4096, 128)
    assert choose_index(1_000_000, 512, kind="hnsw")["factory"] == "HNSW32"
    # a low threshold on a small database: nlist stays at most N / 39 so that k-means has enough points
    assert choose_index(5_000, 32, flat_limit=1_000)["nlist"] == 128  # 4 sqrt(5000) = 283 -> 256; 5000 / 39 -> 128
    with pytest.raises(ValueError, match="index kind"):
        choose_index(10, 4, kind="lsh")


def test_auto_factory_builds_what_was_chosen():
    database = clustered_vectors(3_000, 32)
    small = SearchIndex(database, factory="auto", use_gpu=False)
    assert small.parameters["factory"] == "Flat"
    large = SearchIndex(database, factory="auto", flat_limit=1_000, use_gpu=False)
    assert large.parameters["factory"] == "IVF64,PQ4np" and large.parameters["nprobe"] == 2
    assert large.index.nprobe == 2 and large.index.ntotal == 3_000
    codes = np.packbits(database > 0, axis=1)
    assert SearchIndex(codes, "hamming", factory="auto", flat_limit=1_000).factory == "BIVF64"
    # explicit settings override the choice, and are recorded
    assert SearchIndex(database, factory="auto", flat_limit=1_000, nprobe=64).parameters["nprobe"] == 64


def test_an_index_built_from_shards_equals_one_built_from_the_array(tmp_path, factory="IVF32,PQ8np"):
    database = clustered_vectors(4_000, 32)
    queries = clustered_vectors(50, 32, seed=1)
    sharded = write_shards(tmp_path, database, shard_rows=700)
    kwargs = dict(factory=factory, train_size=3_000, nprobe=4, use_gpu=False)
    from_array = SearchIndex(database, **kwargs).search(queries, 10)
    from_shards = SearchIndex(sharded, **kwargs).search(queries, 10)
    np.testing.assert_array_equal(from_shards[1], from_array[1])
    np.testing.assert_array_equal(from_shards[0], from_array[0])


def test_binary_index_from_shards(tmp_path):
    codes = np.packbits(clustered_vectors(3_000, 64) > 0, axis=1)
    sharded = write_shards(tmp_path, codes, shard_rows=1_000)
    kwargs = dict(metric="hamming", factory="BIVF16", train_size=1_000, nprobe=2)
    np.testing.assert_array_equal(SearchIndex(sharded, **kwargs).search(codes[:20], 5)[1],
                                  SearchIndex(codes, **kwargs).search(codes[:20], 5)[1])


def test_sharded_exact_search_equals_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    # few distinct values: many exact ties, across shard boundaries too
    database = rng.integers(-2, 3, (2_500, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, (30, 8)).astype(np.float32)
    sharded = write_shards(tmp_path, database, shard_rows=333)
    scores, indices = exact_search(queries, sharded, 20, use_gpu=False)
    all_scores = queries @ database.T
    order = np.stack([np.lexsort((np.arange(len(row)), -row))[:20] for row in all_scores])
    np.testing.assert_array_equal(scores, np.take_along_axis(all_scores, order, 1))
    # every returned pair is a true (query, item, score), no item twice; with ties broken by ascending index
    np.testing.assert_array_equal(scores, np.take_along_axis(all_scores, indices, 1))
    assert all(len(set(row)) == 20 for row in indices)
    np.testing.assert_array_equal(indices, order)


def test_sharded_exact_search_of_codes_and_small_shards(tmp_path):
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 256, (100, 2), dtype=np.uint8)
    sharded = write_shards(tmp_path, codes, shard_rows=7)  # shards smaller than k
    scores, indices = exact_search(codes[:5], sharded, 10, metric="hamming")
    distances = np.unpackbits(codes[:5, None] ^ codes[None], axis=2).sum(2)
    np.testing.assert_array_equal(-scores, np.sort(distances, axis=1)[:, :10])
    assert (indices[:, 0] == np.arange(5)).all() or (scores[:, 0] == 0).all()


def test_merge_puts_missing_candidates_last():
    scores = np.array([[0.5, 0.9, -np.inf, 0.5]], np.float32)
    indices = np.array([[7, 3, -1, 2]])
    merged_scores, merged = merge_top_k(scores, indices, 4)
    np.testing.assert_array_equal(merged, [[3, 2, 7, -1]])
    np.testing.assert_array_equal(merged_scores, np.float32([[0.9, 0.5, 0.5, -np.inf]]))
