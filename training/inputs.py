"""What a training step feeds the network: augmented images, or cached maps of a frozen backbone.

``ImageInputs`` loads and augments images and runs the whole network. When only the head trains, the
backbone's output never changes, so ``CachedTrunkInputs`` computes each training image's feature map once
(a centre square slightly larger than the training crop) and augments in feature space: a random window of
the training map size and a horizontal flip. Steps then cost a head pass instead of a backbone pass, which
makes hundreds of CPU steps affordable. It needs the maps in memory (C x s x s x 2 bytes per image), so it
suits small training sets such as Flowers-102, not GLDv2.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from data.manifest import LabelledImageSet
from data.transforms import EvalTransform
from data.train_transforms import TrainTransform
from models.retrieval_net import RetrievalNet

from .data import BatchLoader

log = logging.getLogger(__name__)


class ImageInputs:
    """Images through the whole network (any trainable set)."""

    def __init__(self, images: LabelledImageSet, model: RetrievalNet, size: int, workers: int):
        pre = model.preprocessing
        self.train_loader = BatchLoader(images, TrainTransform(size, mean=pre.mean, std=pre.std), workers)
        self.plain_loader = BatchLoader(images, EvalTransform(size, "shorter", pre.mean, pre.std), workers)

    def plain_images(self, indices) -> list[torch.Tensor]:
        """Unaugmented images (shorter side = train size) for initialisation."""
        return [image[None] for image in self.plain_loader.load(indices)]

    def embed(self, model, indices, seeds=None) -> torch.Tensor:
        """Descriptors of ``indices``: augmented with per-image ``seeds`` (a batch), else plain one by one."""
        if seeds is None:
            return torch.cat([model(image) for image in self.plain_images(indices)])
        return model(torch.stack(self.train_loader.load(indices, seeds)))

    def feature_maps(self, model: RetrievalNet, indices) -> list[torch.Tensor]:
        return [model.feature_map(image) for image in self.plain_images(indices)]


class CachedTrunkInputs:
    """Frozen-backbone feature maps computed once; augmentation = random window + flip of the map."""

    def __init__(self, images: LabelledImageSet, model: RetrievalNet, size: int, workers: int, margin: int = 32):
        pre = model.preprocessing
        crop = size + margin
        loader = BatchLoader(images, _CentreSquare(crop, pre.mean, pre.std), workers)
        maps = []
        model.eval()
        with torch.no_grad():
            for start in tqdm(range(0, len(images), 16), desc="cache backbone maps", unit="batch", leave=False):
                batch = torch.stack(loader.load(range(start, min(start + 16, len(images)))))
                maps.append(model.feature_map(batch).half())
        loader.close()
        self.maps = torch.cat(maps)
        with torch.no_grad():
            self.window = model.feature_map(torch.zeros(1, 3, size, size)).shape[-1]
        log.info("cached %d backbone maps of %s (%.0f MB); training window %d", len(self.maps),
                 tuple(self.maps.shape[1:]), self.maps.numel() * 2 / 2**20, self.window)

    def _windows(self, indices, seeds) -> torch.Tensor:
        maps = self.maps[torch.as_tensor(list(indices))].float()
        full, w = maps.shape[-1], self.window
        if seeds is None:
            offset = (full - w) // 2
            return maps[..., offset:offset + w, offset:offset + w]
        out = []
        for fmap, seed in zip(maps, seeds):
            rng = np.random.default_rng(seed)
            y, x = rng.integers(0, full - w + 1, size=2)
            window = fmap[:, y:y + w, x:x + w]
            out.append(window.flip(-1) if rng.random() < 0.5 else window)
        return torch.stack(out)

    def embed(self, model, indices, seeds=None) -> torch.Tensor:
        return model(self._windows(indices, seeds), from_features=True)

    def feature_maps(self, model: RetrievalNet, indices) -> list[torch.Tensor]:
        return list(self._windows(indices, None).split(1))


class _CentreSquare:
    """Shorter side -> size, centre square crop, normalise (the cached view of each training image)."""

    def __init__(self, size: int, mean, std):
        self.resize = EvalTransform(size, "shorter", mean, std)
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        tensor = self.resize(image)
        h, w = tensor.shape[-2:]
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return tensor[:, top:top + self.size, left:left + self.size]


def create_inputs(kind: str, images: LabelledImageSet, model: RetrievalNet, size: int, workers: int):
    if kind == "cached_trunk":
        return CachedTrunkInputs(images, model, size, workers)
    if kind == "images":
        return ImageInputs(images, model, size, workers)
    raise ValueError(f"train.inputs must be 'images' or 'cached_trunk', got {kind!r}")
