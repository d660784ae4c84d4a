"""Algorithm 1 of Vaccaro et al., "Image Retrieval using Multi-scale CNN Features Pooling" (ICMR 2020).

Triplets are mined from a large "mining batch" whose embeddings were computed without gradient. The rule
follows the authors' public code (``fede-vaccaro/NetVlad``, ``open_dataset_utils.py``), which ranks the
mining batch by distance to each query with the query itself at rank 0 and scans the ranking:

* ``j_neg``: rank of the first negative. Case A (semi-hard) needs ``j_neg > 1``, i.e. at least one positive
  other than the query before it: positive = rank ``j_neg - 1`` (the last positive before the first negative);
* case B (hard): positive = the first positive ranked after ``j_neg``;
* case C: a case-B positive with ``j_pos - j_neg >= t`` (t = ``hard_threshold``, counted from the first
  negative) is dropped: such positives are extreme viewpoint or scale changes that hurt generalisation.

Each query draws semi-hard with probability ``semi_hard_probability``. A semi-hard draw uses case A when it is
possible and case B otherwise; a hard draw uses case B. There is no other fallback: a hard draw without a
positive after the first negative (or only beyond the threshold) gives no triplet, as in the authors' code.
Optionally (``loss_band=(low, high)``, also from the authors' code) a triplet is kept only if its loss
``margin + d(q, p) - d(q, n)`` lies strictly inside the band.

One triplet per class (``one_per_class``, the paper's rule): the queries are visited in a random order and
each class keeps the triplet of its first query that has one. Otherwise every sample of the mining batch
is a query.

This module ranks the other samples only (the query removed, ranks counted from 0), so the authors'
``j_neg > 1`` reads ``first_negative >= 1`` here; ``j_pos - j_neg`` is the same in both conventions. Equal
distances rank in ascending index order (a stable sort). Distances are squared Euclidean, as in the loss;
the miner takes no PML ``distance`` object, so passing one is an error rather than silently ignored.
"""
from __future__ import annotations

import math

import torch

from msretrieval.utils.errors import UserError

from .base import ScheduledMiner

#: Per call. Every query ends in exactly one of: case A, case B (triplets returned), case C (dropped by the
#: threshold), outside the loss band, a class that already has its triplet (one_per_class), or no triplet.
#: Mean distances are squared, over the returned triplets.
STAT_NAMES = ("num_queries", "num_semi_hard_chosen", "num_case_a", "num_case_b", "num_case_c",
              "num_outside_loss_band", "num_class_already_mined", "num_without_triplet", "num_triplets",
              "mean_pos_distance", "mean_neg_distance")


def squared_euclidean(queries: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(Q, D) x (N, D) -> (Q, N) squared distances via one matrix product (no (Q, N, D) temporary).

    Squared norms are sums of products (not squared square roots), so integer-valued embeddings give exact
    distances and exact ties.
    """
    dist = torch.addmm(torch.einsum("qd,qd->q", queries, queries)[:, None], queries, reference.T, alpha=-2.0)
    dist += torch.einsum("nd,nd->n", reference, reference)
    return dist.clamp_(min=0)


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """Column of the first True in each row (0 for a row without any; check ``mask.any(1)``)."""
    if mask.shape[1] == 0:
        return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    return mask.to(torch.uint8).argmax(dim=1)


def first_per_class(labels: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each label in ``labels`` (in order of position)."""
    order = torch.sort(labels, stable=True).indices
    first = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
    first[1:] = labels[order][1:] != labels[order][:-1]
    return torch.sort(order[first]).values


class Algorithm1Miner(ScheduledMiner):
    """PML miner returning (anchor, positive, negative) index tuples (see the module doc).

    ``hard_threshold`` t: a case-B positive is kept only if it ranks fewer than t places after the first
    negative (None: never dropped). Randomness (query order, semi-hard/hard draws) comes from ``generator``
    or a new one seeded with ``seed``; its state is part of ``state_dict()``, so a resumed run mines the same
    triplets.
    """

    STAT_NAMES = STAT_NAMES

    def __init__(self, semi_hard_probability: float = 0.5, hard_threshold: int | None = None,
                 one_per_class: bool = True, margin: float = 0.1,
                 loss_band: tuple[float, float] | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None, **kwargs):
        if "distance" in kwargs:
            raise TypeError("Algorithm1Miner ranks by squared Euclidean distance; it takes no `distance`")
        if loss_band is not None and not (len(loss_band) == 2 and loss_band[0] < loss_band[1]):
            raise UserError(f"loss_band must be (low, high) with low < high, got {loss_band!r}")
        super().__init__(semi_hard_probability, generator=generator, seed=seed, **kwargs)
        self.hard_threshold = hard_threshold
        self.one_per_class = one_per_class
        self.margin = float(margin)
        self.loss_band = None if loss_band is None else (float(loss_band[0]), float(loss_band[1]))
        self._reset_stats(0, 0)

    @property
    def hard_threshold(self) -> int | None:
        return self._hard_threshold

    @hard_threshold.setter
    def hard_threshold(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise UserError(f"hard_threshold must be a positive integer rank distance or None, got {value!r}")
        self._hard_threshold = None if value is None else int(value)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        order = torch.randperm(len(labels), generator=self.generator).to(labels.device)
        semi_hard = self.draw_semi_hard(len(order)).to(labels.device)
        anchors, positives, negatives = self.triplets_for_queries(embeddings, labels, ref_emb, ref_labels, order,
                                                                  semi_hard)
        if self.one_per_class and len(anchors):
            keep = first_per_class(labels[anchors])  # anchors come in query order
            self.num_class_already_mined = len(anchors) - len(keep)
            is_case_a = self.last_is_case_a[keep]
            self.num_case_a, self.num_case_b = int(is_case_a.sum()), int((~is_case_a).sum())
            anchors, positives, negatives = anchors[keep], positives[keep], negatives[keep]
            self.last_is_case_a = is_case_a
            self.num_triplets = len(anchors)
            self._set_distances(embeddings, ref_emb, anchors, positives, negatives)
        return anchors, positives, negatives

    def draw_semi_hard(self, num_queries: int) -> torch.Tensor:
        """True = semi-hard draw. Always consumes one number per query, whatever the probability."""
        return torch.rand(num_queries, generator=self.generator) < self.semi_hard_probability

    def triplets_for_queries(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor,
                             ref_labels: torch.Tensor, queries: torch.Tensor, semi_hard: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The deterministic core: given the queries and their draws, at most one triplet per query, in the
        order of ``queries``.

        Anchors index ``embeddings``; positives and negatives index ``ref_emb`` (PML's convention). The query
        is excluded from its own ranking only when ``ref_emb is embeddings``.
        """
        if semi_hard.shape != queries.shape:
            raise ValueError(f"{len(queries)} queries but {len(semi_hard)} semi-hard draws")
        semi_hard = semi_hard.to(queries.device)
        self._reset_stats(len(queries), int(semi_hard.sum()))
        dist = squared_euclidean(embeddings[queries], ref_emb)
        ranking = torch.sort(dist, dim=1, stable=True).indices
        if ref_emb is embeddings:  # drop each query from its own ranking (exactly one entry per row)
            num_others = max(ranking.shape[1] - 1, 0)
            ranking = ranking[ranking != queries[:, None]].view(len(queries), num_others)
        is_positive = ref_labels[ranking] == labels[queries][:, None]
        ranks = torch.arange(ranking.shape[1], device=ranking.device)

        has_negative = (~is_positive).any(dim=1)
        first_negative = first_true(~is_positive)
        positive_after_negative = is_positive & (ranks > first_negative[:, None])
        has_hard_positive = has_negative & positive_after_negative.any(dim=1)
        hard_positive = first_true(positive_after_negative)

        case_a = has_negative & (first_negative >= 1) & semi_hard
        case_b = ~case_a & has_hard_positive
        case_c = torch.zeros_like(case_b)
        if self.hard_threshold is not None:
            case_c = case_b & (hard_positive - first_negative >= self.hard_threshold)
            case_b &= ~case_c
        keep = case_a | case_b

        if ranking.shape[1] == 0:  # a single sample: nothing to rank
            keep = torch.zeros_like(keep)
            ranking = torch.zeros(len(queries), 1, dtype=torch.long, device=queries.device)
        positive_rank = torch.where(case_a, first_negative - 1, hard_positive)
        positives = ranking.gather(1, positive_rank[:, None]).squeeze(1)
        negatives = ranking.gather(1, first_negative[:, None]).squeeze(1)
        if self.loss_band is not None:
            rows = torch.arange(len(queries), device=dist.device)
            loss = self.margin + dist[rows, positives] - dist[rows, negatives]
            inside = (loss > self.loss_band[0]) & (loss < self.loss_band[1])
            self.num_outside_loss_band = int((keep & ~inside).sum())
            keep &= inside
        self.num_case_a, self.num_case_b, self.num_case_c = int((case_a & keep).sum()), int((case_b & keep).sum()), \
            int(case_c.sum())
        self.num_without_triplet = len(queries) - int(keep.sum()) - self.num_case_c - self.num_outside_loss_band
        self.last_is_case_a = case_a[keep]  # per returned triplet: semi-hard (case A) or hard (case B)
        anchors, positives, negatives = queries[keep], positives[keep], negatives[keep]
        self.num_triplets = len(anchors)
        self._set_distances(embeddings, ref_emb, anchors, positives, negatives)
        return anchors, positives, negatives

    def _reset_stats(self, num_queries: int, num_semi_hard: int) -> None:
        self.num_queries, self.num_semi_hard_chosen = num_queries, num_semi_hard
        self.num_case_a = self.num_case_b = self.num_case_c = self.num_outside_loss_band = 0
        self.num_class_already_mined = 0
        self.last_is_case_a = torch.zeros(0, dtype=torch.bool)
        self.num_without_triplet = num_queries
        self.num_triplets = 0
        self.mean_pos_distance = self.mean_neg_distance = math.nan

    def _set_distances(self, embeddings, ref_emb, anchors, positives, negatives) -> None:
        if len(anchors) == 0:
            self.mean_pos_distance = self.mean_neg_distance = math.nan
            return
        a = embeddings[anchors].double()
        self.mean_pos_distance = float(((a - ref_emb[positives].double()) ** 2).sum(1).mean())
        self.mean_neg_distance = float(((a - ref_emb[negatives].double()) ** 2).sum(1).mean())
