"""Top-k search with FAISS: exact inner product for float descriptors, Hamming for packed binary codes.

A GPU index is used when FAISS sees a GPU (``use_gpu="auto"``). Queries are searched in chunks so that the
result buffers stay bounded however large the query set is; the database itself lives in the index.
"""
from __future__ import annotations

import logging

import faiss
import numpy as np

log = logging.getLogger(__name__)


def _gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class SearchIndex:
    """Exact search over a database of float descriptors (inner product) or packed binary codes (Hamming)."""

    def __init__(self, database: np.ndarray, metric: str = "inner_product", use_gpu: str | bool = "auto"):
        if metric not in ("inner_product", "hamming"):
            raise ValueError(f"metric must be 'inner_product' or 'hamming', got {metric!r}")
        self.metric = metric
        if metric == "hamming":
            codes = np.ascontiguousarray(database, dtype=np.uint8)
            self.index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
            self.index.add(codes)
        else:
            vectors = np.ascontiguousarray(database, dtype=np.float32)
            index = faiss.IndexFlatIP(vectors.shape[1])
            gpus = _gpu_count()
            if (use_gpu is True or use_gpu == "auto") and gpus > 0:
                index = faiss.index_cpu_to_all_gpus(index)
                log.info("FAISS index on %d GPU(s)", gpus)
            elif use_gpu is True:
                raise RuntimeError("use_gpu=True but FAISS sees no GPU (is faiss-gpu installed?)")
            index.add(vectors)
            self.index = index

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices), each (Q, k), best first. Hamming scores are negated distances."""
        k = min(k, len(self))
        dtype = np.uint8 if self.metric == "hamming" else np.float32
        queries = np.ascontiguousarray(queries, dtype=dtype)
        scores = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), chunk):
            distances, ids = self.index.search(queries[start:start + chunk], k)
            scores[start:start + chunk] = -distances if self.metric == "hamming" else distances
            indices[start:start + chunk] = ids
        return scores, indices
