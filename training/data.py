"""Training images: which set, and loading batches of them (augmented) on a few threads.

Every image of a batch is augmented with its own seed, derived from (run seed, step, position), so the
batches of a resumed run are exactly those of an uninterrupted run, however many threads or processes load
them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from data.images import load_image
from data.manifest import LabelledImageSet, flowers102, read_csv_manifest


def load_training_set(spec: str, data_root: str | Path) -> LabelledImageSet:
    """``flowers102[:SPLIT]`` | ``csv:PATH[:SPLIT]`` | ``gldv2:PATH`` (train.csv or train_clean.csv)."""
    kind, _, rest = spec.partition(":")
    if kind == "flowers102":
        return flowers102(data_root, rest or "train")
    if kind == "csv":
        path, _, split = rest.partition(":")
        return read_csv_manifest(path, split=split or None)
    if kind == "gldv2":
        from data.gldv2 import read_gldv2
        return read_gldv2(rest)
    raise ValueError(f"unknown training set {spec!r}; use flowers102[:SPLIT], csv:PATH[:SPLIT] or gldv2:PATH")


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


class BatchLoader:
    """Loads ``indices`` of an image set through ``transform(image, generator)`` on ``workers`` threads."""

    def __init__(self, images: LabelledImageSet, transform: Callable, workers: int = 2):
        self.images = images
        self.transform = transform
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))

    def _one(self, index: int, seed: int | None) -> torch.Tensor:
        image = load_image(self.images.paths[index])
        if seed is None:
            return self.transform(image)
        generator = torch.Generator().manual_seed(seed)
        return self.transform(image, generator)

    def load(self, indices: Sequence[int], seeds: Sequence[int] | None = None) -> list[torch.Tensor]:
        seeds = seeds if seeds is not None else [None] * len(indices)
        return list(self.pool.map(self._one, indices, seeds))

    def close(self) -> None:
        self.pool.shutdown(wait=False)
