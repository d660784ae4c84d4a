"""P x K class-balanced batches for metric learning on long-tailed data (landmarks).

Every batch holds ``P`` distinct classes with ``K`` images each, so each image has K - 1 positives and
(P - 1) K negatives in the batch whatever the class frequencies. Classes are visited in passes: each pass is
a random permutation of the eligible classes, so every class is seen once before any class is seen twice
(landmark data has tens of thousands of classes, most with a handful of images; sampling classes in
proportion to their size would almost never show the tail).

Reproducibility and resuming: batch ``b`` of epoch ``e`` is a pure function of ``(seed, e, b)`` (the class
plan of the epoch is drawn from ``(seed, e)``, the images of batch ``b`` from ``(seed, e, b)``). The state is
therefore just (epoch, number of batches already handed out); a resumed run draws exactly the batches the
uninterrupted run would have drawn.
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from msretrieval.utils.errors import UserError

logger = logging.getLogger(__name__)


def class_members(labels: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
    """label -> indices of its samples (ascending), labels in ascending order."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    order = np.argsort(labels, kind="stable")
    values, starts = np.unique(labels[order], return_index=True)
    return {int(v): order[s:e] for v, s, e in zip(values, starts, list(starts[1:]) + [len(labels)])}


def plan_epoch_classes(classes: np.ndarray, classes_per_batch: int, num_batches: int,
                       rng: np.random.Generator) -> np.ndarray:
    """(num_batches, P) class ids: consecutive passes over random permutations of ``classes``.

    A batch that straddles two passes takes the leftovers of the old pass and fills up with the first
    classes of the new pass that it does not already hold; the skipped ones stay in the new pass.
    """
    plan = np.empty((num_batches, classes_per_batch), dtype=classes.dtype)
    pool = rng.permutation(classes)
    for b in range(num_batches):
        if len(pool) >= classes_per_batch:
            plan[b], pool = pool[:classes_per_batch], pool[classes_per_batch:]
            continue
        leftover = pool
        fresh = rng.permutation(classes)
        usable = ~np.isin(fresh, leftover)
        take = np.flatnonzero(usable)[:classes_per_batch - len(leftover)]
        plan[b] = np.concatenate([leftover, fresh[take]])
        keep = np.ones(len(fresh), dtype=bool)
        keep[take] = False
        pool = fresh[keep]
    return plan


def draw_class_images(members: np.ndarray, images_per_class: int, rng: np.random.Generator) -> np.ndarray:
    """K indices of one class: without replacement if it has >= K images; otherwise each image once plus
    the missing ones drawn with replacement (so a small class still shows all its views)."""
    if len(members) >= images_per_class:
        return rng.choice(members, size=images_per_class, replace=False)
    extra = rng.choice(members, size=images_per_class - len(members), replace=True)
    return rng.permutation(np.concatenate([members, extra]))


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``classes_per_batch`` (P) classes x ``images_per_class`` (K) dataset indices.

    Use as ``DataLoader(dataset, batch_sampler=sampler)``. Classes with fewer than ``min_per_class`` images
    are skipped (a single image has no positive); classes with fewer than K images are topped up with
    replacement. ``num_batches`` per epoch defaults to (images in eligible classes) // (P K).
    Each batch lists its classes one after the other, K indices per class.

    Epochs follow ``torch.utils.data.DistributedSampler``: call ``set_epoch(e)`` before each epoch.
    Iterating continues from the current position, and a completed epoch resets it to 0.

    Distributed training (``num_replicas`` > 1): every process builds the same global P x K batch from the
    shared seed and keeps its own ``P / num_replicas`` whole classes, so the parts of the replicas are
    disjoint, their union is the global batch, and every process still sees K - 1 positives per image (a
    split inside a class would leave a loss without positives unless embeddings are gathered). With
    ``accelerate``, give each process ``rank=accelerator.process_index``,
    ``num_replicas=accelerator.num_processes`` and do not pass this DataLoader through
    ``accelerator.prepare`` (it would shard the batches a second time). Equivalently keep
    ``num_replicas=1`` and let accelerate split each batch (``DataLoaderConfiguration(split_batches=True)``):
    its contiguous slices are the same whole-class parts when P is a multiple of the process count.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, classes_per_batch: int, images_per_class: int,
                 num_batches: int | None = None, min_per_class: int = 2, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        if classes_per_batch < 1 or images_per_class < 1:
            raise UserError(f"need P >= 1 classes x K >= 1 images per batch, got {classes_per_batch} x "
                             f"{images_per_class}")
        if min_per_class < 1:
            raise ValueError(f"min_per_class must be >= 1, got {min_per_class}")
        if seed < 0:
            raise UserError(f"seed must be >= 0 (numpy seed sequences), got {seed}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        if classes_per_batch % num_replicas:
            raise ValueError(f"P = {classes_per_batch} classes per batch cannot be split into whole classes "
                             f"across {num_replicas} replicas")
        members = class_members(labels)
        self.members = {c: idx for c, idx in members.items() if len(idx) >= min_per_class}
        self.classes = np.fromiter(self.members, dtype=np.int64, count=len(self.members))
        if len(self.classes) < classes_per_batch:
            raise UserError(f"only {len(self.classes)} classes have >= {min_per_class} images; "
                             f"a batch needs P = {classes_per_batch} distinct classes")
        self.classes_per_batch = classes_per_batch
        self.images_per_class = images_per_class
        self.min_per_class = min_per_class
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_images = len(np.asarray(labels))
        eligible_images = sum(len(idx) for idx in self.members.values())
        if num_batches is None:
            num_batches = max(1, eligible_images // (classes_per_batch * images_per_class))
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.num_batches = int(num_batches)
        self.epoch = 0
        self.position = 0
        logger.info("class-balanced sampler: %d of %d classes eligible (>= %d images, %d images), "
                    "%d batches of %d x %d per epoch%s", len(self.classes), len(members), min_per_class,
                    eligible_images, self.num_batches, classes_per_batch, images_per_class,
                    f", replica {rank} of {num_replicas}" if num_replicas > 1 else "")

    @property
    def batch_size(self) -> int:
        """Indices per batch of this replica (accelerate reads it)."""
        return self.classes_per_batch * self.images_per_class // self.num_replicas

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch starts at its first batch, the same one keeps the position."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def global_batch(self, epoch: int, batch_index: int, class_plan: np.ndarray | None = None) -> list[int]:
        """All P x K indices of a batch, before the split across replicas."""
        if class_plan is None:
            class_plan = self.class_plan(epoch)
        rng = np.random.default_rng((self.seed, epoch, batch_index))
        parts = [draw_class_images(self.members[int(c)], self.images_per_class, rng)
                 for c in class_plan[batch_index]]
        return np.concatenate(parts).tolist()

    def class_plan(self, epoch: int) -> np.ndarray:
        return plan_epoch_classes(self.classes, self.classes_per_batch, self.num_batches,
                                  np.random.default_rng((self.seed, epoch)))

    def replica_part(self, batch: list[int]) -> list[int]:
        size = self.batch_size
        return batch[self.rank * size:(self.rank + 1) * size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        plan = self.class_plan(epoch)
        while self.position < self.num_batches:
            batch = self.global_batch(epoch, self.position, plan)
            # Counted before the yield: state_dict() taken after consuming a batch must skip it on resume.
            self.position += 1
            yield self.replica_part(batch)
        self.position = 0

    def fingerprint(self) -> dict:
        """What must match for a saved position to mean the same batches."""
        return {"classes_per_batch": self.classes_per_batch, "images_per_class": self.images_per_class,
                "num_batches": self.num_batches, "min_per_class": self.min_per_class,
                "num_images": self.num_images, "num_classes": len(self.classes), "num_replicas": self.num_replicas}

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """Seed, epoch and position inside the epoch.

        The position defaults to the batches this sampler has handed out. A DataLoader with workers
        prefetches batches ahead of the training loop, so pass ``batches_consumed`` (the loop's step within
        the epoch) there; without workers the default is exact.
        """
        position = self.position if batches_consumed is None else int(batches_consumed)
        if not 0 <= position <= self.num_batches:
            raise ValueError(f"position {position} is outside the epoch of {self.num_batches} batches")
        return {"seed": self.seed, "epoch": self.epoch, "position": position, **self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position; a state from a different configuration is an error."""
        mismatched = {key: (state.get(key), value) for key, value in self.fingerprint().items()
                      if state.get(key) != value}
        if mismatched:
            raise UserError(f"sampler state does not match this sampler (saved, current): {mismatched}")
        if not 0 <= state["position"] <= self.num_batches:
            raise UserError(f"saved position {state['position']} is outside the epoch of {self.num_batches}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def spread_over_classes(labels: np.ndarray, limit: int) -> np.ndarray:
    """The first ``limit`` indices when images are dealt one per class in turn (deterministic)."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_class = np.arange(len(labels)) - starts
    dealt = order[np.lexsort((sorted_labels, rank_in_class))]
    return np.sort(dealt[:limit])
