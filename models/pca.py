"""PCA, the one implementation every package uses: principal directions (:func:`principal_axes`,
:func:`pca_basis`) and the reduction L2 -> PCA to D -> L2 fitted on training descriptors (:class:`PCA`: MSBD's
branches, DELF-style local features, ``pca@DIMS:run:``).

The projection layer of a network (``models.retrieval_net``), the hash head's ITQ start (``models.hashing``) and
PCA-whitening (``retrieval.aggregation.whitening``) take their axes from here too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .pooling import l2n
from msretrieval.utils.errors import UserError

log = logging.getLogger(__name__)


def principal_axes(x: torch.Tensor, dims: int, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, dims) leading principal directions of centred rows ``x`` (N, D) and their (dims,) singular values
    (the standard deviation along each is ``s / sqrt(N - 1)``). A randomised SVD when few components of wide
    data are asked for, unless ``exact`` (a full SVD, deterministic: a network's initial weights)."""
    if dims > min(x.shape):
        raise UserError(f"cannot take {dims} principal components of {tuple(x.shape)} data "
                         f"(need at least {dims} samples and dimensions)")
    if not exact and dims < min(x.shape) // 4:  # randomised SVD: much faster for a few components of wide data
        _, s, v = torch.pca_lowrank(x, q=dims + 10, center=False, niter=4)
        return v[:, :dims].contiguous(), s[:dims]
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:dims].T.contiguous(), s[:dims]


def pca_basis(x: torch.Tensor, dims: int, exact: bool = False) -> torch.Tensor:
    """(D, dims) leading principal directions of centred rows ``x`` (N, D) (see :func:`principal_axes`)."""
    return principal_axes(x, dims, exact)[0]


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
