"""Triplet loss on squared Euclidean distances (Vaccaro et al., multi-scale NetVLAD, ICMR 2020).

L = max(alpha + d(q, p) - d(q, n), 0) with d = squared L2 distance and alpha = 0.1, as in the paper (and in
cirtorch's ``triplet_loss``). This is PML's ``TripletMarginLoss`` with ``LpDistance(p=2, power=2)``: PML's
``BaseDistance.forward`` computes ``torch.cdist(x, y, p=2) ** power``, i.e. exactly the squared distance.
Embeddings are used as given: the model already L2-normalises them, and normalising again here would hide a
model that stopped doing so.

Without ``indices_tuple`` PML forms every (anchor, positive, negative) triplet of the batch; pass the
triplets of a miner (e.g. ``miners.algorithm1``) to train as the paper does. The default reducer averages
the non-zero terms (PML's ``AvgNonZeroReducer``); cirtorch sums them instead (use the "sum" reducer).
"""
from __future__ import annotations

from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.reducers import BaseReducer

from msretrieval.utils.errors import UserError

DEFAULT_TRIPLET_MARGIN = 0.1


def squared_euclidean_distance() -> LpDistance:
    """PML distance returning ||x - y||^2 on un-normalised embeddings."""
    return LpDistance(normalize_embeddings=False, p=2, power=2)


class SquaredEuclideanTripletLoss(TripletMarginLoss):
    """PML ``TripletMarginLoss`` fixed to squared Euclidean distance; only margin and reduction vary."""

    def __init__(self, margin: float = DEFAULT_TRIPLET_MARGIN, reducer: BaseReducer | None = None,
                 triplets_per_anchor: int | str = "all"):
        if not margin >= 0:
            raise UserError(f"triplet margin must be >= 0, got {margin}")
        super().__init__(margin=float(margin), triplets_per_anchor=triplets_per_anchor,
                         distance=squared_euclidean_distance(), reducer=reducer)
