"""Binary codes: packing bits into bytes and Hamming distances, for any hashing method.

Codes are stored packed (``np.packbits``, 8 bits per byte, most significant bit first), which is what the
FAISS binary index searches and what a descriptor's storage honestly is. Hamming distances are popcounts of
XORed words (``np.bitwise_count`` on 64-bit words when the code length allows it), computed block by block
so no query x database x bytes array is ever large. Top-k search over codes is FAISS's exact binary index.

Asymmetric scores (Gordo et al., "Asymmetric distances for binary embeddings", TPAMI 2014) keep the query's
real-valued projection, whose signs would be its code, and score it against the database's codes as {-1, +1}
vectors: <q, 2b - 1>. Only the database is binarised, so the query loses nothing to the sign and the ranking
is finer than Hamming's (few ties); the database costs the same bytes.
"""
from __future__ import annotations

import numpy as np
import torch

from .scores import ScoreSource

#: bound on query x database x word elements held at once by :func:`hamming_distances`
_BLOCK_ELEMENTS = 1 << 24
#: database codes unpacked to {-1, +1} floats at once by :class:`AsymmetricScores` (x bits x 4 bytes)
_ASYMMETRIC_BLOCK_ROWS = 1 << 16


def pack_bits(bits) -> np.ndarray:
    """(N, L) booleans / {0, 1} -> (N, ceil(L / 8)) uint8, the first bit in the most significant position."""
    bits = np.asarray(bits)
    if bits.ndim != 2:
        raise ValueError(f"bits must be 2-D (codes x bits), got shape {bits.shape}")
    if bits.dtype != bool and not np.isin(bits, (0, 1)).all():
        raise ValueError("bits must be booleans or 0/1 values (map {-1, 1} codes with codes > 0 first)")
    return np.packbits(bits.astype(bool), axis=1)


def unpack_bits(codes: np.ndarray, num_bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: (N, bytes) uint8 -> (N, num_bits) bool."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.ndim != 2 or codes.shape[1] * 8 < num_bits:
        raise ValueError(f"{codes.shape} bytes cannot hold {num_bits}-bit codes")
    return np.unpackbits(codes, axis=1, count=num_bits).astype(bool)


def _as_words(codes: np.ndarray) -> np.ndarray:
    """Packed codes viewed as 64-bit words when the byte count allows it (8x fewer popcounts)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    return codes.view(np.uint64) if codes.shape[1] % 8 == 0 else codes


def hamming_distances(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """(Q, bytes) x (N, bytes) packed codes -> (Q, N) int32 Hamming distances."""
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"packed code shapes do not match: {queries.shape} vs {database.shape}")
    q, db = _as_words(queries), _as_words(database)
    out = np.empty((len(q), len(db)), dtype=np.int32)
    step = max(1, _BLOCK_ELEMENTS // max(1, db.shape[0] * db.shape[1]))
    for start in range(0, len(q), step):
        xor = q[start:start + step, None, :] ^ db[None, :, :]
        out[start:start + step] = np.bitwise_count(xor).sum(axis=2, dtype=np.int32)
    return out


class HammingScores(ScoreSource):
    """Negated Hamming distances between packed codes (higher = more similar)."""

    def __init__(self, queries: np.ndarray, database: np.ndarray):
        self.queries = np.ascontiguousarray(queries, dtype=np.uint8)
        self.database = np.ascontiguousarray(database, dtype=np.uint8)
        if self.queries.ndim != 2 or self.database.ndim != 2 or self.queries.shape[1] != self.database.shape[1]:
            raise ValueError(f"packed code shapes do not match: queries {self.queries.shape}, "
                             f"database {self.database.shape}")
        self.num_queries, self.num_database = len(self.queries), len(self.database)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(-hamming_distances(self.queries[start:stop], self.database).astype(np.float32))

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact ranking of :meth:`rows` from FAISS's flat binary index: its integer distances are the same
        counts, and its heap orders (distance, database index) pairs, so equal distances come in ascending
        index and the lowest indices make the cut (tests/retrieval/test_top_k_search.py checks both)."""
        from .index import SearchIndex  # FAISS only to search: packing codes (a release) needs none

        return SearchIndex(self.database, "hamming").search(self.queries, k)


def signed_bits(codes: np.ndarray, num_bits: int) -> torch.Tensor:
    """Packed codes -> (N, num_bits) float32 {-1, +1} (bit 1 -> +1), the codes as vectors."""
    return torch.from_numpy(unpack_bits(codes, num_bits).astype(np.float32) * 2 - 1)


class AsymmetricScores(ScoreSource):
    """<query projection, database code in {-1, +1}>: float (Q, L) projections against (N, L / 8) packed codes.

    :meth:`rows` unpacks the database ``_ASYMMETRIC_BLOCK_ROWS`` codes at a time and multiplies, so memory
    stays bounded (a block of floats, plus the (rows, N) scores) however large the database; the inherited
    :meth:`top_k` is the exact ranking of those rows."""

    def __init__(self, queries, database: np.ndarray):
        self.queries = torch.from_numpy(np.array(queries, dtype=np.float32))  # a copy: memory maps are read-only
        self.database = np.asarray(database, dtype=np.uint8)
        if self.queries.ndim != 2 or self.database.ndim != 2 or self.queries.shape[1] != 8 * self.database.shape[1]:
            raise ValueError(f"{tuple(self.queries.shape)} query projections do not match "
                             f"{self.database.shape} packed database codes (8 bits a byte)")
        self.num_bits = self.queries.shape[1]
        self.num_queries, self.num_database = len(self.queries), len(self.database)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        queries = self.queries[start:stop]
        out = torch.empty((len(queries), self.num_database), dtype=torch.float32)
        for first in range(0, self.num_database, _ASYMMETRIC_BLOCK_ROWS):
            block = self.database[first:first + _ASYMMETRIC_BLOCK_ROWS]
            out[:, first:first + len(block)] = queries @ signed_bits(block, self.num_bits).T
        return out
