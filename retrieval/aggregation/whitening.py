"""Whitening of global descriptors, learned on a fit set: PCA-whitening and the learned whitening "Lw".

Both as in cnnimageretrieval-pytorch (``cirtorch/utils/whiten.py``; Radenovic, Tolias and Chum, "Fine-tuning
CNN image retrieval with no human annotation", TPAMI 2018), for descriptors as rows x (N, D):

- **PCA-whitening** (``pcawhitenlearn``): m = mean of x; the eigenvectors v_i of the covariance
  (x - m)^T (x - m) / N with eigenvalues l_1 >= l_2 >= ...; P has rows v_i / sqrt(l_i). At most N - 1
  components (the others have no variance to divide by). The directions come from the PCA of the MSBD
  baseline (:func:`models.pca.pca_basis`), the eigenvalues are the variances along them.
- **Lw** (``whitenlearn``), from matching pairs (q, p): m = mean of the x_q; S = mean of
  (x_q - x_p)(x_q - x_p)^T over the pairs; P1 = L^-1 with L the Cholesky factor of S (with cirtorch's
  fallback: 1e-10 on the diagonal, times 10 until S is positive definite); then the eigenvectors of
  D = sum over ALL images of (P1 (x - m)) (P1 (x - m))^T, largest eigenvalue first, as rows of E; P = E P1.
  cirtorch takes its pairs from SfM120k's list of matching pairs; here the pairs are every ordered pair of
  two different images that share a label, whose m and S have closed forms per label c with n_c members,
  sum s_c and second moment M_c = sum x x^T: S = sum_c (2 n_c M_c - 2 s_c s_c^T) / sum_c n_c (n_c - 1) and
  m = sum_c (n_c - 1) s_c / sum_c n_c (n_c - 1) (no pair list is built; a big class weighs as its n_c^2 pairs).
  An image alone in its label is in no pair, but is in D.

Applying (``whitenapply``): y = P[:dims] (x - m), then y / (||y|| + 1e-6). The inner product of whitened
vectors then ranks as in cirtorch. Usable on its own (``learn_whitening(kind, x, labels).apply(rows)``); the
evaluation harness applies it to float inner-product methods (``--whiten pca|lw``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from msretrieval.utils.errors import UserError

log = logging.getLogger(__name__)

WHITENINGS = ("pca", "lw")
#: rows whitened at once (bounded memory for a large database)
_BLOCK = 65536


@dataclass
class Whitening:
    """A learned whitening: ``apply(x) = normalise((x - mean) @ projection.T)``."""

    kind: str
    mean: np.ndarray        # (D,)
    projection: np.ndarray  # (dims, D), strongest direction first

    @property
    def dims(self) -> int:
        return int(self.projection.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, D) descriptors -> (N, dims) float32 whitened, L2-normalised rows (cirtorch's ``whitenapply``)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.projection.shape[1]:
            raise ValueError(f"whitening of {self.projection.shape[1]}-D descriptors, got shape {x.shape}")
        out = np.empty((len(x), self.dims), dtype=np.float32)
        for start in range(0, len(x), _BLOCK):
            y = (x[start:start + _BLOCK].astype(np.float64) - self.mean) @ self.projection.T
            out[start:start + _BLOCK] = y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-6)
        return out

    def truncated(self, dims: int | None) -> "Whitening":
        """The first ``dims`` directions (all if None)."""
        if dims is None:
            return self
        if not 1 <= dims <= self.dims:
            raise UserError(f"{self.kind} whitening has {self.dims} dimensions; --whiten-dims must be 1 to "
                            f"{self.dims}, got {dims}")
        return Whitening(self.kind, self.mean, self.projection[:dims])


def learn_pca_whitening(x: np.ndarray) -> Whitening:
    """PCA-whitening of rows ``x`` (N, D): min(N - 1, D) directions (see the module docstring)."""
    import torch

    from msretrieval.models.pca import pca_basis

    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        raise UserError(f"PCA-whitening needs at least 2 fit images, got {len(x)}")
    mean = x.mean(0)
    centred = torch.from_numpy(x - mean)
    dims = min(len(x) - 1, x.shape[1])
    basis = pca_basis(centred, dims).numpy()                     # (D, dims); full SVD for this many components
    variances = ((x - mean) @ basis) ** 2
    eigenvalues = variances.mean(0)                              # the covariance's eigenvalues (divided by N)
    keep = eigenvalues > eigenvalues[0] * 1e-12                  # directions with variance to divide by
    if not keep.all():
        log.warning("PCA-whitening: %d of %d directions have no variance in the fit set and are dropped",
                    int((~keep).sum()), dims)
    return Whitening("pca", mean, (basis[:, keep] / np.sqrt(eigenvalues[keep])).T)


def _cholesky_with_fallback(s: np.ndarray) -> np.ndarray:
    """cirtorch's ``cholesky``: S, else S + alpha I for alpha = 1e-10, 1e-9, ... until it factorises."""
    alpha = 0.0
    while True:
        try:
            return np.linalg.cholesky(s + alpha * np.eye(len(s)))
        except np.linalg.LinAlgError:
            alpha = 1e-10 if alpha == 0 else alpha * 10
            log.info("Lw: the pair covariance is not positive definite; adding %.0e on its diagonal", alpha)


def learn_lw(x: np.ndarray, labels: np.ndarray) -> Whitening:
    """Lw of rows ``x`` (N, D) from every ordered pair of two different images sharing a label (see the
    module docstring): D directions."""
    x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels)
    if len(labels) != len(x):
        raise ValueError(f"{len(labels)} labels for {len(x)} descriptors")
    dim = x.shape[1]
    scatter, query_sum, pairs = np.zeros((dim, dim)), np.zeros(dim), 0
    for label in np.unique(labels):
        members = x[labels == label]
        n = len(members)
        if n < 2:
            continue
        total = members.sum(0)
        scatter += 2 * n * (members.T @ members) - 2 * np.outer(total, total)
        query_sum += (n - 1) * total
        pairs += n * (n - 1)
    if pairs == 0:
        raise UserError("Lw whitening learns from matching pairs, images that share a label; the fit set has no "
                        "two images with one label (use --whiten pca, or a labelled --fit-on set)")
    mean = query_sum / pairs
    p1 = np.linalg.inv(_cholesky_with_fallback(scatter / pairs))
    projected = (x - mean) @ p1.T
    eigenvalues, eigenvectors = np.linalg.eigh(projected.T @ projected)
    order = np.argsort(eigenvalues)[::-1]
    return Whitening("lw", mean, eigenvectors[:, order].T @ p1)


def learn_whitening(kind: str, x: np.ndarray, labels: np.ndarray | None = None, dims: int | None = None
                    ) -> Whitening:
    """``kind`` "pca" (labels unused) or "lw" (labels needed), keeping the first ``dims`` directions."""
    if kind == "pca":
        whitening = learn_pca_whitening(x)
    elif kind == "lw":
        if labels is None:
            raise UserError("Lw whitening needs labels (matching pairs); use --whiten pca")
        whitening = learn_lw(x, labels)
    else:
        raise UserError(f"whitening must be one of {WHITENINGS}, got {kind!r}")
    return whitening.truncated(dims)
