"""Training images: which set, the validation classes held out of it, and loading batches of them.

Every image of a batch is augmented with its own seed, derived from (run seed, step, position), so the
batches of a resumed run are exactly those of an uninterrupted run, however many threads or processes load
them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from data.images import load_image
from data.manifest import LabelledImageSet, flowers102, read_csv_manifest
from data.train_transforms import TrainTransform
from data.transforms import EvalTransform


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


def split_validation_classes(images: LabelledImageSet, count: int, seed: int
                             ) -> tuple[LabelledImageSet, LabelledImageSet | None]:
    """(training part, validation part): ``count`` whole classes drawn with ``seed`` are held out, so
    validation is class-disjoint like the test protocol. ``count`` 0: no validation set."""
    if count == 0:
        return images, None
    classes = np.unique(images.labels)
    if not 0 < count <= len(classes) - 2:
        raise ValueError(f"data.val_classes = {count}: {images.name} has {len(classes)} classes; hold out "
                         f"between 1 and {len(classes) - 2} of them, or 0 for no validation")
    held_out = np.random.default_rng(seed).choice(classes, size=count, replace=False)
    is_val = np.isin(images.labels, held_out)
    return (images.subset(np.flatnonzero(~is_val), name=f"{images.name}-fit"),
            images.subset(np.flatnonzero(is_val), name=f"{images.name}-val"))


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


class CentreSquare:
    """Shorter side -> ``size`` (bilinear), centre square crop: the unaugmented view (mining, head set-up)."""

    def __init__(self, size: int):
        self.resize = EvalTransform(size, "shorter", min_side=size)
        self.size = size

    def __call__(self, image):
        width, height = self.resize.output_size(*image.size)
        image = image.resize((width, height), Image.BILINEAR) if (width, height) != image.size else image
        return TF.center_crop(image, [self.size, self.size])


class ImageBatches:
    """Loads images of a training set as normalised (B, 3, size, size) float tensors on ``device`` in
    channels-last layout: augmented (:class:`TrainTransform`, one seed per image) or plain
    (:class:`CentreSquare`).

    Decoding and PIL cropping run on ``workers`` threads; the conversion to a normalised tensor is one
    batched operation in the calling thread (torch operations on helper threads start OpenMP teams whose
    spinning threads slow the network down), done after the uint8 batch is on the device (4x less to copy).
    ``keep_decoded`` keeps every decoded image in memory after its first use (a few hundred MB for
    Flowers-102's training split; JPEG decoding is then paid once instead of at every step). Leave it off
    for large sets (GLDv2)."""

    def __init__(self, images: LabelledImageSet, size: int, mean, std, device: torch.device, workers: int = 2,
                 scale: Sequence[float] = (0.5, 1.0), keep_decoded: bool = False):
        self.images = images
        self.device = device
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.augment = TrainTransform(size, mean=mean, std=std, scale=tuple(scale))
        self.plain = CentreSquare(size)
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.decoded: dict[int, Image.Image] | None = {} if keep_decoded else None

    def _decode(self, index: int) -> Image.Image:
        if self.decoded is None:
            return load_image(self.images.paths[index])
        if index not in self.decoded:
            self.decoded[index] = load_image(self.images.paths[index])
        return self.decoded[index]

    def _one(self, index: int, seed: int | None) -> np.ndarray:
        image = self._decode(index)
        view = self.plain(image) if seed is None else self.augment.augment(image, torch.Generator().manual_seed(seed))
        return np.asarray(view, dtype=np.uint8)

    def load(self, indices: Sequence[int], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Augmented with per-image ``seeds``, or plain when ``seeds`` is None."""
        seeds = list(seeds) if seeds is not None else [None] * len(indices)
        if len(seeds) != len(indices):
            raise ValueError(f"{len(indices)} images but {len(seeds)} seeds")
        arrays = list(self.pool.map(self._one, indices, seeds))
        pixels = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, self.size, self.size, 3,
                                                                              dtype=torch.uint8)
        # (B, H, W, 3) uint8 -> (B, 3, H, W) view, which is channels-last; the same arithmetic as
        # torchvision's to_tensor + normalize
        batch = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div(255)
        return batch.sub(self.mean).div(self.std).contiguous(memory_format=torch.channels_last)

    def close(self) -> None:
        self.pool.shutdown(wait=False)
