"""Contrastive loss exactly as cirtorch trains GeM (Radenovic et al., TPAMI 2018).

Per pair, with d the Euclidean distance:  positive 0.5 * d^2,  negative 0.5 * max(0, margin - d)^2,
summed over the pairs (margin 0.7 is cirtorch's default for GeM).

PML's ``ContrastiveLoss`` cannot be configured to this: it computes positive ``relu(d - pos_margin)`` and
negative ``relu(neg_margin - d)`` on whatever its distance returns. With ``LpDistance(power=1)`` both terms
lack the square; with ``power=2`` the negative becomes ``relu(margin - d^2)``, a different hinge (its
margin acts on the squared distance and its gradient does not vanish linearly at the margin). No reducer
scale fixes that, so this subclass keeps PML's pair formation, indices handling and reducers and overrides
only the two per-pair formulas (plus the zero-loss shortcut, see ``compute_loss``).

Reduction: cirtorch sums over its pairs, so the default reducer is PML's ``SumReducer``. PML reduces the
positive and the negative pairs separately and adds the two results, so the "mean" reducer gives
mean(positive terms) + mean(negative terms), not the mean over all pairs. Without ``indices_tuple`` PML
uses every ordered pair (i, j), i != j, so each unordered pair counts twice; cirtorch's tuples
(query, positive, negatives) correspond to ``indices_tuple = (q, p, q_repeated, negatives)``.
cirtorch also adds eps = 1e-6 to every coordinate difference before the square root; this module uses the
exact distance (``torch.cdist``, whose gradient is defined at d = 0), which differs by O(eps).
"""
from __future__ import annotations

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss
from pytorch_metric_learning.reducers import BaseReducer, SumReducer
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from msretrieval.utils.errors import UserError

DEFAULT_CONTRASTIVE_MARGIN = 0.7


def euclidean_distance() -> LpDistance:
    """PML distance returning ||x - y|| on un-normalised embeddings."""
    return LpDistance(normalize_embeddings=False, p=2, power=1)


class CirtorchContrastiveLoss(ContrastiveLoss):
    """PML ``ContrastiveLoss`` with cirtorch's squared terms and 0.5 factors (see module doc)."""

    def __init__(self, margin: float = DEFAULT_CONTRASTIVE_MARGIN, reducer: BaseReducer | None = None):
        if not margin > 0:
            raise UserError(f"contrastive margin must be > 0, got {margin}")
        super().__init__(pos_margin=0.0, neg_margin=float(margin), distance=euclidean_distance(),
                         reducer=reducer)

    @property
    def margin(self) -> float:
        return self.neg_margin

    def get_default_reducer(self) -> BaseReducer:
        return SumReducer()

    def pos_calc(self, pos_pair_dist: torch.Tensor, margin: float) -> torch.Tensor:
        return 0.5 * pos_pair_dist.pow(2)

    def neg_calc(self, neg_pair_dist: torch.Tensor, margin: float) -> torch.Tensor:
        return 0.5 * torch.nn.functional.relu(margin - neg_pair_dist).pow(2)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        # PML's GenericPairLoss returns zero when every index tensor has length <= 1, which silently drops
        # a batch holding exactly one positive and one negative pair (e.g. a single mined triplet).
        # Only a batch without any pair has zero loss here.
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        indices_tuple = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
        if all(len(x) == 0 for x in indices_tuple):
            return self.zero_losses()
        return self.loss_method(self.distance(embeddings, ref_emb), indices_tuple)
