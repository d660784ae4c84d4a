"""VLAD with soft assignment and intra-normalisation (the object branch's aggregation of patch features).

Each descriptor x is assigned to its ``nearest`` closest words with weights w_k proportional to
exp(-||x - c_k||^2 / (2 sigma^2)) (Philbin et al.'s soft assignment), normalised to sum to 1 over those
words; the VLAD block of word k sums w_k (x - c_k). Every block is L2-normalised (intra-normalisation,
Arandjelovic & Zisserman), then the whole vector. The codebook comes from FAISS k-means on training patches;
sigma^2 defaults to the mean squared distance of those patches to their nearest word.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from msretrieval.models.pooling import l2n
from msretrieval.utils.errors import UserError

log = logging.getLogger(__name__)

#: descriptors aggregated at once (memory: chunk x K x d floats)
_CHUNK = 512


def soft_assignment(x: torch.Tensor, centroids: torch.Tensor, nearest: int, sigma2: float) -> torch.Tensor:
    """(n, d) x (K, d) -> (n, K) weights, non-zero on each row's ``nearest`` words, rows summing to 1."""
    if sigma2 <= 0:
        raise ValueError(f"sigma^2 must be positive, got {sigma2}")
    distances = torch.cdist(x, centroids).pow(2)
    nearest = min(nearest, len(centroids))
    near_d, near_i = distances.topk(nearest, dim=1, largest=False)
    # subtracting each row's smallest distance leaves the normalised weights unchanged, avoids underflow
    weights = torch.exp(-(near_d - near_d[:, :1]) / (2 * sigma2))
    weights = weights / weights.sum(1, keepdim=True)
    return torch.zeros_like(distances).scatter_(1, near_i, weights)


def soft_vlad(x: torch.Tensor, owners: torch.Tensor, count: int, centroids: torch.Tensor, nearest: int,
              sigma2: float) -> torch.Tensor:
    """VLAD of the descriptors ``x`` (n, d) grouped by ``owners`` (n,) into ``count`` images -> (count, K*d).

    An image without descriptors gets a zero vector.
    """
    k, d = centroids.shape
    residuals = torch.zeros(count, k, d, dtype=x.dtype)
    for start in range(0, len(x), _CHUNK):  # bounded memory: (chunk, K, d) at a time
        part = x[start:start + _CHUNK]
        weights = soft_assignment(part, centroids, nearest, sigma2)                  # (n, K)
        residuals.index_add_(0, owners[start:start + _CHUNK], weights[:, :, None] * (part[:, None] - centroids[None]))
    return l2n(l2n(residuals).reshape(count, k * d))


@dataclass
class Codebook:
    centroids: torch.Tensor   # (K, d)
    sigma2: float

    @classmethod
    def fit(cls, x: np.ndarray, words: int, iterations: int = 20, seed: int = 0) -> "Codebook":
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) < words:
            raise UserError(f"a {words}-word codebook needs at least {words} training patches, got {len(x)}")
        kmeans = faiss.Kmeans(x.shape[1], words, niter=iterations, seed=seed, verbose=False)
        kmeans.train(x)
        nearest, _ = kmeans.index.search(x, 1)
        sigma2 = float(max(nearest.mean(), 1e-6))
        log.info("VLAD codebook: %d words from %d patches, sigma^2 %.4f", words, len(x), sigma2)
        return cls(torch.from_numpy(kmeans.centroids.copy()), sigma2)
