"""In-batch triplet mining on P x K batches: pytorch-metric-learning's semi-hard and hard triplets, mixed per
anchor by the same semi-hard probability that drives Algorithm 1 (``miners.schedule``).

PML's ``TripletMarginMiner`` with ``type_of_triplets="semihard"`` returns every (a, p, n) of the batch with
d(a, p) < d(a, n) <= d(a, p) + margin, and ``"hard"`` every one with d(a, n) <= d(a, p). The distance and the
margin must be the loss's (squared Euclidean, 0.1 for the paper's triplet loss), or "semi-hard" is judged
against another margin than the loss applies; :func:`create_miner` builds it from the loss for that reason.

Each anchor draws semi-hard with probability ``semi_hard_probability`` (one draw per sample of the batch,
from the miner's own generator, so every process of a distributed run draws the same); its triplets are
then the semi-hard ones, else the hard ones. ``semihard`` and ``hard`` are the probabilities 1 and 0.
"""
from __future__ import annotations

import math

import torch
from pytorch_metric_learning.distances import BaseDistance
from pytorch_metric_learning.miners import TripletMarginMiner

from .base import ScheduledMiner

STAT_NAMES = ("num_semi_hard_triplets", "num_hard_triplets", "num_triplets", "mean_pos_distance",
              "mean_neg_distance")


class BatchTripletMiner(ScheduledMiner):
    """Semi-hard or hard in-batch triplets per anchor (see the module doc)."""

    STAT_NAMES = STAT_NAMES

    def __init__(self, distance: BaseDistance, margin: float, semi_hard_probability: float = 1.0,
                 seed: int | None = None, **kwargs):
        super().__init__(semi_hard_probability, seed=seed, distance=distance, **kwargs)
        self.margin = float(margin)
        self.semi_hard = TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=distance)
        self.hard = TripletMarginMiner(margin=margin, type_of_triplets="hard", distance=distance)
        self.num_semi_hard_triplets = self.num_hard_triplets = self.num_triplets = 0
        self.mean_pos_distance = self.mean_neg_distance = math.nan

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        draws = torch.rand(len(embeddings), generator=self.generator).to(labels.device)
        semi_hard_anchor = draws < self.semi_hard_probability
        parts = []
        for miner, wanted in ((self.semi_hard, True), (self.hard, False)):
            if bool((semi_hard_anchor == wanted).any()):
                a, p, n = miner.mine(embeddings, labels, ref_emb, ref_labels)
                keep = semi_hard_anchor[a] == wanted
                parts.append((a[keep], p[keep], n[keep]))
            else:
                parts.append((torch.zeros(0, dtype=torch.long, device=labels.device),) * 3)
        self.num_semi_hard_triplets, self.num_hard_triplets = len(parts[0][0]), len(parts[1][0])
        anchors, positives, negatives = (torch.cat([parts[0][i], parts[1][i]]) for i in range(3))
        self.num_triplets = len(anchors)
        if self.num_triplets:
            mat = self.distance(embeddings, ref_emb)
            self.mean_pos_distance = float(mat[anchors, positives].double().mean())
            self.mean_neg_distance = float(mat[anchors, negatives].double().mean())
        else:
            self.mean_pos_distance = self.mean_neg_distance = math.nan
        return anchors, positives, negatives
