"""Where each step's images and triplets come from.

- :class:`ClassBalancedBatches` (in-batch miners ``batch`` / ``semihard`` / ``hard``): P classes x K images
  per batch (``data.samplers.ClassBalancedBatchSampler``); the triplets are mined inside the batch from the
  embeddings that carry the gradient.
- :class:`MiningPoolBatches` (``algorithm1``): every ``refresh_every`` steps, or when the pool runs short, a
  mining batch of ``classes`` x ``per_class`` training images (a P x K batch of the same sampler) is embedded
  without gradient and mined with Algorithm 1; the pool then serves ``triplets_per_step`` triplets a step as
  fixed (a, p, n) tuples.

Both are deterministic functions of the run seed and their own state (``state_dict``), and every process of
a distributed run computes the same global batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from msretrieval.data.samplers import ClassBalancedBatchSampler
from msretrieval.miners import Algorithm1Miner, MiningPool, MiningSchedule

from .data import derived_seed

log = logging.getLogger(__name__)
#: Mining rounds in a row that may find no triplet before the run stops (each with a new mining batch).
MAX_EMPTY_MINING_ROUNDS = 10


@dataclass
class Batch:
    """Dataset indices of a global batch; ``triplets`` index it (fixed tuples) or None (mine in the batch)."""

    indices: list[int]
    triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    #: statistics of a mining round run to produce this batch (Algorithm 1), else empty
    mining_stats: dict = field(default_factory=dict)


class ClassBalancedBatches:
    def __init__(self, labels: np.ndarray, classes_per_batch: int, images_per_class: int, seed: int):
        self.sampler = ClassBalancedBatchSampler(labels, classes_per_batch, images_per_class, seed=seed)
        self._plan: tuple[int, np.ndarray] | None = None

    def next(self, step: int) -> Batch:
        sampler = self.sampler
        if sampler.position >= len(sampler):
            sampler.set_epoch(sampler.epoch + 1)
        if self._plan is None or self._plan[0] != sampler.epoch:
            self._plan = (sampler.epoch, sampler.class_plan(sampler.epoch))
        indices = sampler.global_batch(sampler.epoch, sampler.position, self._plan[1])
        sampler.position += 1
        return Batch(indices)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class MiningPoolBatches:
    """Algorithm 1's mining rounds feeding a pool of triplets (see the module doc).

    ``embed(indices) -> (N, D)`` embeds images without gradient (the same result on every process);
    ``agree(triplets)`` makes the mined triplets those of process 0 on every process
    (:func:`training.distributed.broadcast_from_main`; the identity in one process).
    """

    def __init__(self, labels: np.ndarray, miner: Algorithm1Miner, schedule: MiningSchedule, triplets_per_step: int,
                 classes: int, per_class: int, seed: int, embed: Callable[[np.ndarray], torch.Tensor],
                 agree: Callable[[tuple], tuple] = lambda triplets: triplets, micro_batches: int = 1):
        self.labels = labels
        self.miner = miner
        self.schedule = schedule
        available = int((np.unique(labels, return_counts=True)[1] >= 2).sum())  # the sampler's eligible classes
        if classes > available:
            log.info("mining.classes = %d but the training set has %d classes with 2 or more images: mining "
                     "batches hold all of them", classes, available)
        # the mining batches are the P x K batches of their own sampler (P = classes, K = per_class)
        self.mining_batches = ClassBalancedBatches(labels, min(classes, available), per_class,
                                                   derived_seed(seed, 1))
        self.embed = embed
        self.agree = agree
        # the pool serves micro-batches: a step of ``micro_batches`` of them holds triplets_per_step triplets, and
        # refresh_every counts steps
        self.micro_batches = micro_batches
        self.pool = MiningPool(triplets_per_step // micro_batches, schedule.refresh_every * micro_batches, seed=seed)

    def refresh(self, step: int) -> dict:
        self.schedule.apply(self.miner, step, self.pool)  # sets the phase's refresh period, in steps ...
        self.pool.refresh_every *= self.micro_batches      # ... which the pool counts in micro-batches
        indices = np.asarray(self.mining_batches.next(step).indices)
        embeddings = self.embed(indices)
        labels = torch.as_tensor(self.labels[indices], device=embeddings.device)
        triplets = self.agree(self.miner(embeddings, labels))
        count = self.pool.refill(indices, triplets)
        return {**self.miner.last_stats, "triplets": count,
                "semi_hard_probability": self.miner.semi_hard_probability}

    def next(self, step: int) -> Batch:
        stats: dict = {}
        empty_rounds = 0
        while self.pool.refresh_due:
            stats = self.refresh(step)
            if self.pool.remaining:
                break
            empty_rounds += 1
            if empty_rounds == MAX_EMPTY_MINING_ROUNDS:
                raise RuntimeError(f"step {step}: {empty_rounds} mining rounds in a row found no triplet (last: "
                                   f"{stats}); check mining.classes / per_class and the schedule's hard_threshold")
        indices = self.pool.next_batch()
        return Batch(indices, MiningPool.indices_tuple(len(indices)), stats)

    def state_dict(self) -> dict:
        """The pool and the mining-batch sampler (the miner's own state is the trainer's to save)."""
        return {"pool": self.pool.state_dict(), "mining_batches": self.mining_batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pool.load_state_dict(state["pool"])
        self.mining_batches.load_state_dict(state["mining_batches"])


def without_self_pairs(triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor], indices,
                       reference_indices=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The in-batch triplets whose anchor and positive are different images. A class with fewer than K images
    repeats some of them in a P x K batch (:class:`ClassBalancedBatches`), and the miner, which sees labels only,
    would pair an image with another view of itself (and, mining a cross-batch memory, with its own copy in
    the reference set). Anchors index the batch, whose positions hold the dataset indices ``indices``;
    positives and negatives index the reference set, whose dataset indices are ``reference_indices`` (default:
    the batch itself)."""
    anchors, positives, _ = triplets
    dataset = torch.as_tensor(indices, device=anchors.device)
    reference = dataset if reference_indices is None else torch.as_tensor(reference_indices, device=anchors.device)
    keep = dataset[anchors] != reference[positives]
    return tuple(t[keep] for t in triplets)
