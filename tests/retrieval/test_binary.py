"""Packed binary codes: bit order of packing, round trip, Hamming distances against a plain popcount."""
import numpy as np
import pytest

from msretrieval.retrieval.search.binary import HammingScores, hamming_distances, pack_bits, unpack_bits


def test_packing_puts_the_first_bit_in_the_most_significant_position():
    bits = np.array([[1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0]])
    assert pack_bits(bits).tolist() == [[0b10110001, 0b11111110]]  # = [177, 254]
    assert pack_bits(bits.astype(bool)).tolist() == [[177, 254]]


@pytest.mark.parametrize("num_bits", [8, 16, 24, 64, 128])
def test_unpack_inverts_pack(num_bits):
    bits = np.random.default_rng(num_bits).integers(0, 2, (7, num_bits)).astype(bool)
    assert np.array_equal(unpack_bits(pack_bits(bits), num_bits), bits)


def test_pack_refuses_non_binary_values():
    with pytest.raises(ValueError, match="0/1"):
        pack_bits(np.array([[1, -1, 0, 1, 0, 0, 0, 0]]))


@pytest.mark.parametrize("num_bytes", [1, 3, 8, 16])  # byte-wise and 64-bit-word popcount paths
def test_hamming_distances_equal_a_plain_popcount(num_bytes):
    rng = np.random.default_rng(num_bytes)
    queries = rng.integers(0, 256, (5, num_bytes), dtype=np.uint8)
    database = rng.integers(0, 256, (9, num_bytes), dtype=np.uint8)
    expected = [[sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(q, d)) for d in database] for q in queries]
    assert hamming_distances(queries, database).tolist() == expected
    assert (-HammingScores(queries, database).rows(0, 5).numpy()).tolist() == expected


def test_hamming_by_hand():
    a = np.array([[0b11110000, 0b00000001]], dtype=np.uint8)
    b = np.array([[0b00110000, 0b10000001], [0b11110000, 0b00000001]], dtype=np.uint8)
    assert hamming_distances(a, b).tolist() == [[3, 0]]  # two high bits of byte 0, the top bit of byte 1
