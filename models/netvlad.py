"""NetVLAD (Arandjelovic et al.) and the multi-scale column pooling of "Image Retrieval using Multi-scale CNN
Features Pooling" (ICMR 2020).

Multi-scale columns: the conv map is max-pooled with 2x2 and 3x3 windows at stride 1; every spatial position
of both pooled maps is one local descriptor ("column"), so each descriptor sees a fine or a larger receptive
field. NetVLAD aggregates all columns: soft-assignment to K centroids, residual sums, intra-normalisation per
centroid, then L2. Centroids are initialised by k-means (FAISS) on descriptors of training images; the
assignment sharpness alpha follows pytorch-NetVlad's initialisation from the data.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msretrieval.utils.errors import UserError

log = logging.getLogger(__name__)


def multiscale_columns(fmap: torch.Tensor, window_sizes=(2, 3)) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C): every position of each stride-1 max-pooled map, concatenated.

    A map smaller than a window contributes its global max as a single column, so tiny inputs still work.
    """
    columns = []
    for k in window_sizes:
        if fmap.shape[-2] >= k and fmap.shape[-1] >= k:
            pooled = F.max_pool2d(fmap, kernel_size=k, stride=1)
        else:
            pooled = fmap.amax(dim=(-2, -1), keepdim=True)
        columns.append(pooled.flatten(2))
    # contiguous: a free no-op for channels-last maps; for others it keeps the (B*N, C) view of the assignment
    # layer independent of B (an exported graph would otherwise be specialised away from batch size 1)
    return torch.cat(columns, dim=2).transpose(1, 2).contiguous()


def single_scale_columns(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): the plain NetVLAD local descriptors."""
    return fmap.flatten(2).transpose(1, 2).contiguous()


class NetVLAD(nn.Module):
    """Soft-assignment VLAD over local descriptors (B, N, D) -> (B, K*D), intra-normalised then L2."""

    def __init__(self, dim: int, num_clusters: int = 64, alpha: float = 100.0, normalize_input: bool = True):
        super().__init__()
        self.dim, self.num_clusters = dim, num_clusters
        self.normalize_input = normalize_input
        self.centroids = nn.Parameter(torch.randn(num_clusters, dim) * 0.1)
        self.assign = nn.Linear(dim, num_clusters, bias=False)  # soft-assignment logits
        with torch.no_grad():
            self.assign.weight.copy_(alpha * F.normalize(self.centroids, dim=1))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def out_dim(self) -> int:
        return self.num_clusters * self.dim

    @torch.no_grad()
    def init_from_descriptors(self, descriptors: np.ndarray | torch.Tensor, iterations: int = 20,
                              seed: int = 0, restarts: int = 3) -> None:
        """k-means (FAISS) centroids from local descriptors (M, D); alpha set from their spread."""
        x = torch.as_tensor(descriptors, dtype=torch.float32)
        if self.normalize_input:
            x = F.normalize(x, dim=1)
        if len(x) < self.num_clusters:
            raise UserError(f"k-means needs at least {self.num_clusters} descriptors, got {len(x)}")
        import faiss  # only the k-means set-up needs it; a released model loads without it

        # nredo: keep the best of a few restarts (a single run can leave two centroids on one mode).
        kmeans = faiss.Kmeans(self.dim, self.num_clusters, niter=iterations, seed=seed, verbose=False, nredo=restarts,
                              spherical=self.normalize_input)
        kmeans.train(np.ascontiguousarray(x.numpy()))
        centroids = torch.from_numpy(kmeans.centroids).float()
        # alpha: make the top assignment ~100x likelier than the second (pytorch-NetVlad's rule).
        sims = x[: min(len(x), 10_000)] @ F.normalize(centroids, dim=1).T
        top2 = sims.topk(2, dim=1).values
        gap = float((top2[:, 0] - top2[:, 1]).mean())
        alpha = -math.log(0.01) / max(gap, 1e-6)
        self.centroids.copy_(centroids)
        self.assign.weight.copy_(alpha * F.normalize(centroids, dim=1))
        self.initialized.fill_(True)
        log.info("NetVLAD: %d centroids from %d descriptors, alpha %.1f", self.num_clusters, len(x), alpha)

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        # float32 under autocast too (softmax assignments, sums over many columns): autocast would run the
        # matmuls below in bf16 / fp16 even on a float32 input. Checked first so that a graph export (no
        # autocast) sees no autocast region.
        if torch.is_autocast_enabled(local.device.type):
            with torch.autocast(local.device.type, enabled=False):
                return self._aggregate(local.float())
        return self._aggregate(local.float())

    def _aggregate(self, local: torch.Tensor) -> torch.Tensor:
        if self.normalize_input:
            local = F.normalize(local, dim=2)
        soft = F.softmax(self.assign(local), dim=2)                       # (B, N, K)
        # sum_n a_nk (x_n - c_k) = (a^T x)_k - (sum_n a_nk) c_k
        vlad = soft.transpose(1, 2) @ local - soft.sum(1).unsqueeze(2) * self.centroids  # (B, K, D)
        vlad = F.normalize(vlad, dim=2)                                   # intra-normalisation
        return F.normalize(vlad.flatten(1), dim=1)
