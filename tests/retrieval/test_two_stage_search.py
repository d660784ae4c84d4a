"""Asymmetric scores of float projections against packed codes, and two-stage search (a Hamming or asymmetric
shortlist re-ranked by float descriptors on disk), against values worked out by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import msretrieval.retrieval.search.binary as binary
from msretrieval.retrieval.search.binary import AsymmetricScores, pack_bits
from msretrieval.retrieval.search.scores import InnerProductScores
from msretrieval.retrieval.search.shards import ShardedArray, ShardWriter
from msretrieval.retrieval.search.two_stage import RerankScores, TwoStageIndex


def test_asymmetric_scores_are_inner_products_with_the_codes_as_signs(monkeypatch):
    # codes 10000000, 11110000, 00000001 are the vectors (+1 -1 -1 -1 -1 -1 -1 -1), (+1 +1 +1 +1 -1 -1 -1 -1)
    # and (-1 -1 -1 -1 -1 -1 -1 +1)
    database = np.array([[0b10000000], [0b11110000], [0b00000001]], dtype=np.uint8)
    queries = np.array([[1, 2, 0, 0, 0, 0, 0, 0.5], [0, 0, 0, 0, 0, 0, 0, -1]], dtype=np.float32)
    expected = [[1 - 2 - 0.5, 1 + 2 - 0.5, -1 - 2 + 0.5], [1, 1, -1]]
    scores = AsymmetricScores(queries, database)
    assert scores.shape == (2, 3)
    np.testing.assert_array_equal(scores.rows(0, 2).numpy(), expected)
    monkeypatch.setattr(binary, "_ASYMMETRIC_BLOCK_ROWS", 2)  # the database unpacked in blocks of 2 codes
    np.testing.assert_array_equal(AsymmetricScores(queries, database).rows(0, 2).numpy(), expected)
    top_scores, top_indices = scores.top_k(2)
    np.testing.assert_array_equal(top_scores, [[2.5, -1.5], [1, 1]])
    np.testing.assert_array_equal(top_indices, [[1, 0], [0, 1]])  # the tie in ascending index


def test_asymmetric_scores_read_the_bits_of_later_bytes_in_order():
    database = np.array([[0b00000000, 0b10000000], [0b00000000, 0b00000001]], dtype=np.uint8)  # bit 8; bit 15
    query = np.zeros((1, 16), dtype=np.float32)
    query[0, 8], query[0, 15] = 2, 0.25
    # item 0: +2 (bit 8 set) - 0.25 (bit 15 clear); item 1: -2 + 0.25; the zero entries add nothing
    np.testing.assert_array_equal(AsymmetricScores(query, database).rows(0, 1).numpy(), [[1.75, -1.75]])
    with pytest.raises(ValueError, match="do not match"):
        AsymmetricScores(np.zeros((1, 8), dtype=np.float32), database)


# Six items: 8-bit codes at Hamming distances 0, 1, 2, 3, 8, 4 from the code 00000000, and 2-d float descriptors.
CODES = pack_bits(np.unpackbits(np.array([[0b00000000], [0b00000001], [0b00000011], [0b00000111], [0b11111111],
                                          [0b00001111]], dtype=np.uint8), axis=1))
FLOATS = np.array([[0.25, 0], [0.5, 0], [0.75, 0], [1, 0], [1, 0], [0.5, 0.5]], dtype=np.float32)
# query 0: code 00000000, float (1, 0.5) -> float scores 0.25 0.5 0.75 1 1 0.75;
# query 1: code 11111111 (distances 8 7 6 5 0 4), float (0, 1) -> float scores 0 0 0 0 0 0.5
QUERY_CODES = np.array([[0b00000000], [0b11111111]], dtype=np.uint8)
QUERY_FLOATS = np.array([[1, 0.5], [0, 1]], dtype=np.float32)


def test_two_stage_search_over_the_whole_database_is_the_exact_float_search():
    scores, indices = TwoStageIndex(CODES, FLOATS, shortlist=6).search(QUERY_CODES, QUERY_FLOATS, 6)
    exact_scores, exact_indices = InnerProductScores(QUERY_FLOATS, FLOATS).top_k(6)
    np.testing.assert_array_equal(indices, exact_indices)
    np.testing.assert_array_equal(scores, exact_scores)
    np.testing.assert_array_equal(indices[0], [3, 4, 2, 5, 1, 0])  # ties (1, 1), (0.75, 0.75) by index


def test_two_stage_search_reranks_the_hamming_shortlist():
    index = TwoStageIndex(CODES, FLOATS, shortlist=3)
    scores, indices = index.search(QUERY_CODES, QUERY_FLOATS, 3)
    # query 0: shortlist 0, 1, 2 (distances 0, 1, 2); items 3 and 4 score higher but are not in it
    # query 1: shortlist 4, 5, 3 (distances 0, 4, 5); 3 and 4 tie at 0 -> ascending index
    np.testing.assert_array_equal(indices, [[2, 1, 0], [5, 3, 4]])
    np.testing.assert_array_equal(scores, [[0.75, 0.5, 0.25], [0.5, 0, 0]])
    assert index.search(QUERY_CODES, QUERY_FLOATS, 10)[1].shape == (2, 3)  # never more than the shortlist
    # one query at a time: the same answer
    np.testing.assert_array_equal(index.search(QUERY_CODES, QUERY_FLOATS, 3, chunk=1)[1], indices)


def test_asymmetric_shortlist_takes_the_best_projections():
    # projection (-1 x 7, +3): its code is 00000001; scores 7 - 3 = 4, 7 + 3 = 10, 6 - 1 + 3 = 8, 5 - 2 + 3 = 6,
    # -7 + 3 = -4, 4 - 3 + 3 = 4 -> shortlist 1, 2, 3, while Hamming from 00000001 (1 0 1 2 7 3) takes 1, 0, 2
    projection = np.array([[-1, -1, -1, -1, -1, -1, -1, 3]], dtype=np.float32)
    np.testing.assert_array_equal(AsymmetricScores(projection, CODES).rows(0, 1).numpy(), [[4, 10, 8, 6, -4, 4]])
    _, indices = TwoStageIndex(CODES, FLOATS, 3, asymmetric=True).search(projection, QUERY_FLOATS[:1], 3)
    np.testing.assert_array_equal(indices, [[3, 2, 1]])
    _, indices = TwoStageIndex(CODES, FLOATS, 3).search(np.array([[0b00000001]], np.uint8), QUERY_FLOATS[:1], 3)
    np.testing.assert_array_equal(indices, [[2, 1, 0]])


def test_rerank_scores_rank_the_rest_after_the_shortlist_in_hamming_order():
    index = TwoStageIndex(CODES, FLOATS, shortlist=3)
    scores = RerankScores(index, QUERY_CODES, QUERY_FLOATS)
    # query 0: floats 0.25 0.5 0.75 for 0-2; the rest at -distance + (0.25 - 1 - 0): 3 -> -3.75, 4 -> -8.75, 5 -> -4.75
    # query 1: floats 0 0.5 0 for 4, 5, 3; the rest at -distance + (0 - 1 - 0): 0 -> -9, 1 -> -8, 2 -> -7
    np.testing.assert_array_equal(scores.rows(0, 2).numpy(), [[0.25, 0.5, 0.75, -3.75, -8.75, -4.75],
                                                             [-9, -8, -7, 0, 0, 0.5]])
    np.testing.assert_array_equal(scores.top_k(2)[1], [[2, 1], [5, 3]])   # the index's search
    np.testing.assert_array_equal(scores.top_k(6)[1], [[2, 1, 0, 3, 5, 4], [5, 3, 4, 2, 1, 0]])  # the rows'


def _mapped_resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's header: address range, perms, offset, dev, inode, path
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux's /proc/self/smaps")
def test_floats_on_disk_are_read_without_mapping_the_file(tmp_path):
    rng = np.random.default_rng(0)
    floats = rng.standard_normal((2048, 256)).astype(np.float32)  # 2 MiB
    codes = rng.integers(0, 256, (2048, 8), dtype=np.uint8)
    path = tmp_path / "floats.npy"
    np.save(path, floats)
    queries, query_floats = codes[:4], floats[:4]
    expected = TwoStageIndex(codes, floats, shortlist=2048).search(queries, query_floats, 10)
    mapped = TwoStageIndex(codes, np.load(path, mmap_mode="r"), shortlist=2048)  # an array: indexed as it is
    got = mapped.search(queries, query_floats, 10)
    assert _mapped_resident_bytes(path) > 1 << 20  # every row was read through the caller's map and stays mapped
    del mapped, got
    on_disk = TwoStageIndex(codes, path, shortlist=2048)
    assert _mapped_resident_bytes(path) == 0
    got = on_disk.search(queries, query_floats, 10)
    assert _mapped_resident_bytes(path) == 0
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])


def test_sharded_floats_give_the_same_search(tmp_path):
    writer = ShardWriter(tmp_path / "floats", count=6, shard_rows=4)
    writer.write(0, FLOATS[:4])
    writer.write(1, FLOATS[4:])
    index = TwoStageIndex(CODES, ShardedArray(tmp_path / "floats"), shortlist=4)
    np.testing.assert_array_equal(index.search(QUERY_CODES, QUERY_FLOATS, 4)[1],
                                  TwoStageIndex(CODES, FLOATS, shortlist=4).search(QUERY_CODES, QUERY_FLOATS, 4)[1])


def test_the_hamming_shortlist_is_the_exact_ranking_with_ties_in_ascending_index():
    """Stage 1 takes FAISS's counting-sort selection: its shortlist must be the first R of the Hamming ranking,
    equal distances in ascending index, as the heap's (16-bit codes: hundreds of items at each distance)."""
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, (3000, 2), dtype=np.uint8)
    queries = rng.integers(0, 256, (7, 2), dtype=np.uint8)
    index = TwoStageIndex(codes, np.zeros((3000, 4), np.float32), shortlist=500)
    distances = np.bitwise_count(queries[:, None, :] ^ codes[None]).sum(2)
    expected = np.argsort(distances, axis=1, kind="stable")[:, :500]
    np.testing.assert_array_equal(index.candidates(queries), expected)


# the projection (-1 x 7, +3): asymmetric scores 4 10 8 6 -4 4 (test_asymmetric_shortlist_takes_the_best_projections);
# query float (1, 0.5) scores the items 0.25 0.5 0.75 1 1 0.75
PROJECTION = np.array([[-1, -1, -1, -1, -1, -1, -1, 3]], dtype=np.float32)


def test_fast_scan_takes_the_asymmetric_shortlist():
    index = TwoStageIndex(CODES, FLOATS, 3, asymmetric=True, fast_scan=True)
    np.testing.assert_array_equal(index.candidates(PROJECTION), [[1, 2, 3]])  # scores 10, 8, 6
    np.testing.assert_array_equal(index.search(PROJECTION, QUERY_FLOATS[:1], 3)[1], [[3, 2, 1]])
    with pytest.raises(ValueError, match="fast_scan computes asymmetric scores"):
        TwoStageIndex(CODES, FLOATS, 3, fast_scan=True)


def test_rerank_scores_over_a_fast_scan_shortlist_rank_the_rest_by_exact_asymmetric_score():
    index = TwoStageIndex(CODES, FLOATS, 3, asymmetric=True, fast_scan=True)
    scores = RerankScores(index, PROJECTION, QUERY_FLOATS[:1])
    # shortlist 1, 2, 3 (floats 0.5 0.75 1); the rest at their asymmetric scores 4, -4, 4 + (0.5 - 1 - 10)
    np.testing.assert_array_equal(scores.rows(0, 1).numpy(), [[-6.5, 0.5, 0.75, 1, -14.5, -6.5]])
    np.testing.assert_array_equal(scores.top_k(3)[1], [[3, 2, 1]])


def test_rerank_scores_take_the_fast_scans_shortlist_even_where_it_is_not_the_exact_one(monkeypatch):
    index = TwoStageIndex(CODES, FLOATS, 3, asymmetric=True, fast_scan=True)
    # a shortlist the approximate scan might give: 0, 1, 2 (the exact one is 1, 2, 3)
    monkeypatch.setattr(index._fast_scan, "search", lambda queries, k: (None, np.array([[1, 2, 0]])))
    scores = RerankScores(index, PROJECTION, QUERY_FLOATS[:1])
    # floats 0.25 0.5 0.75 for 0-2; the rest at their asymmetric scores 6, -4, 4 + (0.25 - 1 - 10)
    np.testing.assert_array_equal(scores.rows(0, 1).numpy(), [[0.25, 0.5, 0.75, -4.75, -14.75, -6.75]])
    np.testing.assert_array_equal(scores.top_k(3)[1], [[2, 1, 0]])
