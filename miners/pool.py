"""Triplets mined from one mining batch, served as training batches until the next refresh.

Algorithm 1 re-mines every ``refresh_every`` iterations; between refreshes the training loop draws batches of
``triplets_per_batch`` triplets (3T images) from this pool. A refresh is due after ``refresh_every`` batches,
when less than a full batch is left (so batches have the same size however many processes share them; a
round that mined fewer than T triplets serves them as one short batch), or before the first fill. The state is plain Python (lists, ints, the NumPy bit
generator's dict) so a checkpoint resumes on exactly the same batches and the same later shuffles.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from msretrieval.utils.errors import UserError

STATE_KEYS = ("triplets_per_batch", "refresh_every", "triplets", "cursor", "iterations_since_refresh",
              "refills", "rng_state")


class MiningPool:
    def __init__(self, triplets_per_batch: int, refresh_every: int = 8, shuffle: bool = True,
                 seed: int | None = None):
        if triplets_per_batch < 1 or refresh_every < 1:
            raise UserError("triplets_per_batch and refresh_every must be >= 1")
        self.triplets_per_batch = triplets_per_batch
        self.refresh_every = refresh_every
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.triplets: list[list[int]] = []
        self.cursor = 0
        self.iterations_since_refresh = 0
        self.refills = 0

    @property
    def remaining(self) -> int:
        return len(self.triplets) - self.cursor

    @property
    def refresh_due(self) -> bool:
        return (self.refills == 0 or self.remaining < self.triplets_per_batch
                or self.iterations_since_refresh >= self.refresh_every)

    def refill(self, dataset_indices: Sequence[int] | np.ndarray | torch.Tensor,
               indices_tuple: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> int:
        """Replace the pool with mined triplets; ``indices_tuple`` indexes the mining batch, whose images are
        ``dataset_indices``. Returns the number of triplets."""
        lookup = np.asarray(dataset_indices.cpu() if isinstance(dataset_indices, torch.Tensor) else dataset_indices,
                            dtype=np.int64)
        positions = np.stack([np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t, dtype=np.int64).reshape(-1)
                              for t in indices_tuple], axis=1)
        triplets = lookup[positions]
        if self.shuffle:
            triplets = triplets[self.rng.permutation(len(triplets))]
        self.triplets = triplets.tolist()
        self.cursor = 0
        self.iterations_since_refresh = 0
        self.refills += 1
        return len(self.triplets)

    def next_batch(self) -> list[int]:
        """3T dataset indices laid out [anchors, positives, negatives]; the last batch may be shorter."""
        if self.remaining == 0:
            raise RuntimeError("the mining pool is empty: refill it (check refresh_due) before drawing a batch")
        chunk = self.triplets[self.cursor:self.cursor + self.triplets_per_batch]
        self.cursor += len(chunk)
        self.iterations_since_refresh += 1
        return [triplet[role] for role in range(3) for triplet in chunk]

    @staticmethod
    def indices_tuple(num_images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The PML (anchor, positive, negative) tuple for a batch produced by :meth:`next_batch`."""
        if num_images % 3:
            raise ValueError(f"a triplet batch has a multiple of 3 images, got {num_images}")
        return tuple(torch.arange(role * num_images // 3, (role + 1) * num_images // 3) for role in range(3))

    def state_dict(self) -> dict:
        return {"triplets_per_batch": self.triplets_per_batch, "refresh_every": self.refresh_every,
                "triplets": [list(t) for t in self.triplets], "cursor": self.cursor,
                "iterations_since_refresh": self.iterations_since_refresh, "refills": self.refills,
                "rng_state": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        missing = set(STATE_KEYS) - set(state)
        if missing:
            raise UserError(f"mining pool state lacks {sorted(missing)}")
        self.triplets_per_batch = int(state["triplets_per_batch"])
        self.refresh_every = int(state["refresh_every"])
        self.triplets = [[int(i) for i in t] for t in state["triplets"]]
        self.cursor = int(state["cursor"])
        self.iterations_since_refresh = int(state["iterations_since_refresh"])
        self.refills = int(state["refills"])
        self.rng.bit_generator.state = state["rng_state"]
