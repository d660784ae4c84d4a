"""PCA: principal directions, and the branch reduction L2 -> PCA to D1 -> L2 (fitted on training images)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from models.pooling import l2n
from utils.errors import UserError

log = logging.getLogger(__name__)


def pca_basis(x: torch.Tensor, dims: int) -> torch.Tensor:
    """(D, dims) leading principal directions of centred rows ``x`` (N, D)."""
    if dims > min(x.shape):
        raise UserError(f"cannot take {dims} principal components of {tuple(x.shape)} data "
                         f"(need at least {dims} samples and dimensions)")
    if dims < min(x.shape) // 4:  # randomised SVD: much faster for a few components of wide data
        _, _, v = torch.pca_lowrank(x, q=dims + 10, center=False, niter=4)
        return v[:, :dims].contiguous()
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:dims].T.contiguous()


@dataclass
class PCA:
    mean: torch.Tensor    # (D,)
    basis: torch.Tensor   # (D, dims)

    @classmethod
    def fit(cls, x: torch.Tensor, dims: int, name: str = "") -> "PCA":
        """Fit on L2-normalised rows; ``dims`` is capped by what the data allows (logged)."""
        x = l2n(x.float())
        allowed = min(dims, x.shape[0] - 1, x.shape[1])
        if allowed < dims:
            log.warning("PCA %s: %d dims requested, %d possible with %s data", name, dims, allowed, tuple(x.shape))
        mean = x.mean(0)
        return cls(mean, pca_basis(x - mean, allowed))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return l2n((l2n(x.float()) - self.mean) @ self.basis)
