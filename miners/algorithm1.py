"""Algorithm 1 of Vaccaro et al., "Image Retrieval using Multi-scale CNN Features Pooling" (ICMR 2020).

One triplet per class is mined from a large "mining batch" whose embeddings were computed without gradient.
For each query the mining batch is ranked by squared Euclidean distance (the query itself excluded; equal
distances in ascending index order, i.e. a stable sort) and j is the 0-based rank of the first negative:

* case A (semi-hard): j >= 2 -> positive = rank j-1 (last positive before the first negative), negative = rank j;
* case B (hard): positive = first positive ranked after the first negative, negative = rank j;
* case C: a case-B triplet whose positive ranks beyond ``hard_threshold`` (rank > t) is dropped, because such
  positives are extreme viewpoint/scale changes that hurt generalisation.

Each query draws "semi-hard" with probability ``semi_hard_probability``: a semi-hard draw uses case A when
j >= 2 and falls back to case B otherwise; a hard draw uses case B. A hard draw for a query whose positives
all rank before every negative has no case-B positive; it falls back to case A when j >= 2 (counted in
``num_hard_fallbacks``), so a well-separated class still contributes a triplet. Queries with no negative,
no positive (singleton classes) or neither case possible give no triplet (``num_without_triplet``).

Distances are computed on the embeddings as given (the model L2-normalises them); the miner does not use
PML's ``distance`` object, so passing one is an error rather than silently ignored.
"""
from __future__ import annotations

import math

import torch
from pytorch_metric_learning.miners import BaseMiner

STAT_NAMES = ("num_queries", "num_semi_hard_chosen", "num_case_a", "num_case_b", "num_case_c",
              "num_hard_fallbacks", "num_without_triplet", "num_triplets", "mean_pos_distance",
              "mean_neg_distance")


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


class Algorithm1Miner(BaseMiner):
    """PML miner returning (anchor, positive, negative) index tuples, one triplet per class (see module doc).

    ``hard_threshold`` is the largest rank a case-B positive may have (None: never drop). Randomness (query
    choice, semi-hard/hard draws) comes from ``generator`` or a new one seeded with ``seed``; its state is
    part of ``state_dict()`` so a resumed run mines the same triplets.
    """

    def __init__(self, semi_hard_probability: float = 0.5, hard_threshold: int | None = None,
                 one_per_class: bool = True, generator: torch.Generator | None = None, seed: int | None = None,
                 **kwargs):
        if "distance" in kwargs:
            raise TypeError("Algorithm1Miner ranks by squared Euclidean distance; it takes no `distance`")
        super().__init__(**kwargs)
        if generator is not None and seed is not None:
            raise ValueError("pass either a generator or a seed, not both")
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        self.generator = generator
        self.semi_hard_probability = semi_hard_probability
        self.hard_threshold = hard_threshold
        self.one_per_class = one_per_class
        self.add_to_recordable_attributes(list_of_names=[n for n in STAT_NAMES if n != "num_triplets"],
                                          is_stat=True)
        no_queries = torch.zeros(0, dtype=torch.bool)
        self._set_stats(no_queries, no_queries, no_queries, no_queries, no_queries, torch.zeros(2, 0))

    @property
    def semi_hard_probability(self) -> float:
        return self._semi_hard_probability

    @semi_hard_probability.setter
    def semi_hard_probability(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"semi_hard_probability must be in [0, 1], got {value}")
        self._semi_hard_probability = float(value)

    @property
    def hard_threshold(self) -> int | None:
        return self._hard_threshold

    @hard_threshold.setter
    def hard_threshold(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
            raise ValueError(f"hard_threshold must be a non-negative integer rank or None, got {value!r}")
        self._hard_threshold = None if value is None else int(value)

    @property
    def last_stats(self) -> dict[str, float]:
        """Statistics of the last call (counts as int, mean squared distances as float, NaN if no triplet)."""
        return {name: getattr(self, name) for name in STAT_NAMES}

    def get_extra_state(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        queries = self.select_queries(labels)
        semi_hard = self.draw_semi_hard(len(queries)).to(labels.device)
        return self.triplets_for_queries(embeddings, labels, ref_emb, ref_labels, queries, semi_hard)

    def select_queries(self, labels: torch.Tensor) -> torch.Tensor:
        """One member per class present, uniformly at random (sorted by label), or every sample."""
        if not self.one_per_class:
            return torch.arange(len(labels), device=labels.device)
        permutation = torch.randperm(len(labels), generator=self.generator)
        shuffled = labels.cpu()[permutation]
        by_label = torch.sort(shuffled, stable=True).indices
        sorted_labels = shuffled[by_label]
        first_of_class = torch.ones(len(labels), dtype=torch.bool)
        first_of_class[1:] = sorted_labels[1:] != sorted_labels[:-1]
        return permutation[by_label[first_of_class]].to(labels.device)

    def draw_semi_hard(self, num_queries: int) -> torch.Tensor:
        """True = semi-hard draw. Always consumes one number per query, whatever the probability."""
        return torch.rand(num_queries, generator=self.generator) < self.semi_hard_probability

    def triplets_for_queries(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor,
                             ref_labels: torch.Tensor, queries: torch.Tensor, semi_hard: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The deterministic core: given the queries and their draws, one (or no) triplet per query.

        Anchors index ``embeddings``; positives and negatives index ``ref_emb`` (PML's convention). The query
        is excluded from its own ranking only when ``ref_emb is embeddings``.
        """
        if semi_hard.shape != queries.shape:
            raise ValueError(f"{len(queries)} queries but {len(semi_hard)} semi-hard draws")
        semi_hard = semi_hard.to(queries.device)
        dist = squared_euclidean(embeddings[queries], ref_emb)
        ranking = torch.sort(dist, dim=1, stable=True).indices
        if ref_emb is embeddings:  # drop each query from its own ranking (exactly one entry per row)
            num_others = max(ranking.shape[1] - 1, 0)
            ranking = ranking[ranking != queries[:, None]].view(len(queries), num_others)
        is_positive = ref_labels[ranking] == labels[queries][:, None]
        is_negative = ~is_positive
        ranks = torch.arange(ranking.shape[1], device=ranking.device)

        has_negative = is_negative.any(dim=1)
        first_negative = first_true(is_negative)
        positive_after_negative = is_positive & (ranks > first_negative[:, None])
        has_hard_positive = has_negative & positive_after_negative.any(dim=1)
        hard_positive = first_true(positive_after_negative)

        can_semi_hard = has_negative & (first_negative >= 2)
        use_a = can_semi_hard & (semi_hard | ~has_hard_positive)
        use_b = ~use_a & has_hard_positive
        too_hard = torch.zeros_like(use_b)
        if self.hard_threshold is not None:
            too_hard = use_b & (hard_positive > self.hard_threshold)
        keep = use_a | (use_b & ~too_hard)

        positive_rank = torch.where(use_a, first_negative - 1, hard_positive)
        kept_rows = ranking[keep]
        anchors = queries[keep]
        positives = kept_rows.gather(1, positive_rank[keep, None]).squeeze(1)
        negatives = kept_rows.gather(1, first_negative[keep, None]).squeeze(1)
        kept_dist = dist[keep]
        pos_dist = kept_dist.gather(1, positives[:, None]).squeeze(1)
        neg_dist = kept_dist.gather(1, negatives[:, None]).squeeze(1)
        self._set_stats(semi_hard, use_a, use_b & ~too_hard, too_hard, use_a & ~semi_hard,
                        torch.stack([pos_dist, neg_dist]))
        return anchors, positives, negatives

    def _set_stats(self, semi_hard, case_a, case_b, case_c, hard_fallbacks, distances) -> None:
        self.num_queries = len(semi_hard)
        self.num_semi_hard_chosen = int(semi_hard.sum())
        self.num_case_a = int(case_a.sum())
        self.num_case_b = int(case_b.sum())
        self.num_case_c = int(case_c.sum())
        self.num_hard_fallbacks = int(hard_fallbacks.sum())
        self.num_triplets = self.num_case_a + self.num_case_b
        self.num_without_triplet = self.num_queries - self.num_triplets - self.num_case_c
        if distances.shape[1]:
            self.mean_pos_distance, self.mean_neg_distance = distances.double().mean(dim=1).tolist()
        else:
            self.mean_pos_distance = self.mean_neg_distance = math.nan
