"""Binary descriptor learning: classical ITQ and MSBD's sparse variant (the paper's Algorithm 1).

Conventions. Inputs X are (N, D) rows, centred by the training mean. A code is a row of L bits.

- ITQ (Gong & Lazebnik) works in {-1, 1}: PCA to L dims, then alternately B = sgn(V R) and R by orthogonal
  Procrustes, minimising ||B - V R||^2. Its bits are stored as b = (B + 1) / 2, i.e. bit = 1 where V R > 0
  (Hamming distances are the same in either convention).
- MSBD-s (no sparsity): without the sparsity term the {0, 1} / {-1, 1} choice only changes the loss, and
  in {-1, 1} sgn is its exact minimiser: the iterations are ITQ's, continued with R (L x D) free to leave
  the PCA subspace (Procrustes against +-1 codes).
- MSBD (Eq. 6): minimise ||X W - B||^2 + alpha * ||B||_1 with B in {0, 1}, W (D x L) with orthonormal
  columns (the paper's R = W^T, R R^T = I) and at most k ones per code. {0, 1} is the only reading in which
  the paper's sparsification can lower the loss: in {-1, 1} turning a bit off always raises it. Zeroing
  bit j of a code changes its loss by delta_j = (2 v_j - 1) - alpha, where v = x W.

Algorithm 1 as implemented: W initialised by PCA, B by ITQ (50 iterations); then per iteration
(1) B = sgn(X W) (as {0, 1}), each code with n1 > k ones sparsified: n1 - k of its ones are zeroed if that
lowers its loss; (2) W by orthogonal Procrustes (SVD of X^T B). The objective is recorded per iteration.

Sparsification. ``sparsify="random"`` is the paper's search: ``trials`` random choices of n1 - k ones per
code (1,000 in the paper), the best one applied if it lowers the loss; vectorised over codes and trials.
``sparsify="exact"`` (default) takes the best of *all* trials directly: the loss is separable over bits,
so the best zeroing removes the n1 - k ones with the smallest projections (the limit of the random search
as trials grow; deterministic, and cheap). Out-of-sample codes (database, queries) always use the exact
rule, since encoding must be deterministic.

With ``monotone`` (default) a code keeps its previous value when the new one has a higher loss under the
current W, which makes the iteration a pure coordinate descent whose objective never rises (the paper's
Fig. 2 shows a decreasing curve but does not say how). With random trials this freezes codes the search
cannot improve, so the paper config turns it off.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from msretrieval.models.hashing import SignCodes, centre_rows, itq_rotation, procrustes  # ITQ lives with the hash head
from msretrieval.models.pca import pca_basis
from msretrieval.utils.errors import UserError

log = logging.getLogger(__name__)

#: bound on codes x trials x bits elements per sparsification chunk
_CHUNK_ELEMENTS = 1 << 22


def sparse_loss(v: torch.Tensor, bits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-code loss ||v - b||^2 + alpha * |b| for {0, 1} codes: (N,)."""
    b = bits.to(v.dtype)
    return (v - b).pow(2).sum(1) + alpha * b.sum(1)


def sparsify_random(v: torch.Tensor, bits: torch.Tensor, k: int, trials: int, alpha: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's step: for each code with n1 > k ones try ``trials`` random sets of n1 - k ones to zero;
    apply the best set if it lowers the code's loss.

    Vectorised over codes and trials: a trial's set is the m = n1 - k smallest of random keys (the zeros
    get keys above every one), found with an unsorted top-m; codes are grouped by m so one top-m call
    serves a whole chunk.
    """
    bits = bits.clone()
    excess = bits.sum(1) - k
    delta = 2 * v - 1 - alpha  # loss change of zeroing each bit that is 1
    length = v.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // (trials * length))
    for m in torch.unique(excess[excess > 0]).tolist():
        rows = torch.nonzero(excess == m).flatten()
        for start in range(0, len(rows), chunk):
            idx = rows[start:start + chunk]
            ones = bits[idx]                                                   # (c, L)
            keys = torch.rand(len(idx), trials, length, generator=generator)
            keys.masked_fill_(~ones[:, None, :], 2.0)
            _, chosen = keys.topk(m, dim=-1, largest=False, sorted=False)      # (c, T, m) bits to zero
            change = delta[idx][:, None, :].expand(-1, trials, -1).gather(-1, chosen).sum(-1)  # (c, T)
            best_change, best = change.min(dim=1)
            accept = torch.nonzero(best_change < 0).flatten()
            zeroed = chosen[accept, best[accept]]                              # (a, m)
            new = ones.clone()
            new[accept[:, None], zeroed] = False
            bits[idx] = new
    return bits


def sparsify_exact(v: torch.Tensor, bits: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Zero the n1 - k ones with the smallest projections when that lowers the loss (the best possible trial)."""
    excess = bits.sum(1) - k
    if not (excess > 0).any():
        return bits.clone()
    delta = torch.where(bits, 2 * v - 1 - alpha, torch.full_like(v, float("inf")))
    order = delta.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(v.shape[1]).expand_as(order))
    remove = (rank < excess.clamp(min=0)[:, None]) & bits
    total = torch.where(remove, delta, torch.zeros_like(v)).sum(1)
    remove &= (total < 0)[:, None]
    return bits & ~remove


@dataclass
class BinaryModel(SignCodes):
    """A learned binary projection: bits = sparsify([(x - mean) W > 0]) (no sparsify when k is None)."""

    k: int | None = None             # at most k ones per code (MSBD); None: plain sign codes (MSBD-s)
    alpha: float = 0.001
    itq_objective: list[float] = field(default_factory=list)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(N, D) float descriptors -> (N, L) bool codes."""
        v = self.project(x)
        bits = v > 0
        if self.k is not None:
            bits = sparsify_exact(v, bits, self.k, self.alpha)
        return bits.numpy()


SPARSIFY_MODES = ("exact", "random")


def learn_msbd(x: np.ndarray, bits: int, density: float | None = 0.3, iterations: int = 50,
               itq_iterations: int = 50, sparsify: str = "exact", trials: int = 1000, alpha: float = 0.001,
               monotone: bool = True, seed: int = 0) -> BinaryModel:
    """Algorithm 1. ``density`` = k / L (None: no sparsity, the MSBD-s ablation)."""
    if density is not None and not 0 < density <= 1:
        raise UserError(f"density k/L must be in (0, 1], got {density}")
    if sparsify not in SPARSIFY_MODES:
        raise UserError(f"sparsify must be one of {SPARSIFY_MODES}, got {sparsify!r}")
    if trials < 1:
        raise UserError(f"trials must be at least 1, got {trials}")
    mean, xc = centre_rows(x, bits)
    generator = torch.Generator().manual_seed(seed)
    k = None if density is None else max(1, int(round(density * bits)))
    basis = pca_basis(xc, bits)                                    # step 1: R by PCA
    rotation, itq_history = itq_rotation(xc @ basis, itq_iterations, generator)  # step 2: B by ITQ
    projection = basis @ rotation
    codes = (xc @ projection) > 0
    history = []
    for iteration in range(iterations):
        v = xc @ projection
        candidate = v > 0                                          # B = sgn(R X), as {0, 1}
        if k is None:  # no sparsity: sgn is the exact code step in {-1, 1}, i.e. ITQ continued in D dims
            codes = candidate
            projection = procrustes(xc, codes.to(xc.dtype) * 2 - 1)
            history.append(float(((xc @ projection) - (codes.to(xc.dtype) * 2 - 1)).pow(2).sum()))
            continue
        if sparsify == "random":
            candidate = sparsify_random(v.float(), candidate, k, trials, alpha, generator)
        else:
            candidate = sparsify_exact(v, candidate, k, alpha)
        if monotone and iteration > 0:
            worse = sparse_loss(v, candidate, alpha) > sparse_loss(v, codes, alpha)
            candidate = torch.where(worse[:, None], codes, candidate)
        codes = candidate
        projection = procrustes(xc, codes.to(xc.dtype))            # R by orthogonal Procrustes
        history.append(float(sparse_loss(xc @ projection, codes, alpha).sum()))
        log.debug("MSBD binary learning: iteration %d objective %.4f", iteration + 1, history[-1])
    return BinaryModel(mean, projection.numpy(), k=k, alpha=alpha, objective=history, itq_objective=itq_history)
