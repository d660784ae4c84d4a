"""What a training step feeds the network: augmented images, or cached maps of the frozen part of the backbone.

``ImageInputs`` loads and augments images and runs the whole network.

``CachedPrefixInputs``: the backbone stages before the first trainable one (``Backbone.stages``) never change
during training, so each training image goes through them once (a centre square slightly larger than the
training crop) and their output map is kept in memory (float16). Augmentation then happens in feature space:
a random window of the map the training crop would give, and a horizontal flip. A step (and a mining round)
costs only the trainable stages and the head; with a frozen backbone that is the head alone. The maps must
fit in memory (C x s x s x 2 bytes per image), which suits sets of a few thousand images such as
Flowers-102, not GLDv2 (use ``images`` there).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from data.manifest import LabelledImageSet
from data.train_transforms import TrainTransform
from data.transforms import EvalTransform
from models.retrieval_net import RetrievalNet

from .data import BatchLoader

log = logging.getLogger(__name__)


class ImageInputs:
    """Images through the whole network (any trainable set)."""

    def __init__(self, images: LabelledImageSet, model: RetrievalNet, size: int, workers: int):
        pre = model.preprocessing
        self.train_loader = BatchLoader(images, TrainTransform(size, mean=pre.mean, std=pre.std), workers)
        self.plain_loader = BatchLoader(images, EvalTransform(size, "shorter", pre.mean, pre.std), workers)

    def embed(self, model, indices, seeds=None) -> torch.Tensor:
        """Descriptors of ``indices``: augmented with per-image ``seeds`` (a batch), else plain one by one."""
        if seeds is None:
            return torch.cat([model(image[None]) for image in self.plain_loader.load(indices)])
        return model(torch.stack(self.train_loader.load(indices, seeds)))

    def feature_maps(self, model: RetrievalNet, indices) -> list[torch.Tensor]:
        """Unaugmented final backbone maps (for head initialisation)."""
        return [model.feature_map(image[None]) for image in self.plain_loader.load(indices)]


def first_trainable_stage(model: RetrievalNet) -> int:
    """Index of the first backbone stage with a trainable parameter (len(stages) if none is trainable)."""
    stages = model.backbone.stages()
    if not stages:
        raise ValueError(f"train.inputs=cached_prefix: backbone {model.backbone.name} has no known stage layout; "
                         "use train.inputs=images")
    for i, (_, module) in enumerate(stages):
        if any(p.requires_grad for p in module.parameters()):
            return i
    return len(stages)


class CachedPrefixInputs:
    """Frozen-prefix maps computed once; augmentation = random window + flip of the map."""

    def __init__(self, images: LabelledImageSet, model: RetrievalNet, size: int, workers: int, margin: int = 32,
                 batch_size: int = 16):
        if model.tap != "features":
            raise ValueError("train.inputs=cached_prefix needs a model on the backbone's last feature map")
        self.from_stage = first_trainable_stage(model)
        frozen = [name for name, _ in model.backbone.stages()[:self.from_stage]]
        log.info("cached prefix: %d frozen backbone stages (%s ... %s)", len(frozen), frozen[0] if frozen else "-",
                 frozen[-1] if frozen else "-")
        pre = model.preprocessing
        loader = BatchLoader(images, _CentreSquare(size + margin, pre.mean, pre.std), workers)
        maps = []
        model.eval()
        with torch.no_grad():
            for start in tqdm(range(0, len(images), batch_size), desc="cache frozen maps", unit="batch",
                              leave=False):
                batch = torch.stack(loader.load(range(start, min(start + batch_size, len(images)))))
                maps.append(model.backbone.forward_stages(batch, stop=self.from_stage).half())
            self.window = model.backbone.forward_stages(torch.zeros(1, 3, size, size), stop=self.from_stage).shape[-1]
        loader.close()
        self.maps = torch.cat(maps)
        log.info("cached %d maps of %s (%.0f MB); training window %d", len(self.maps), tuple(self.maps.shape[1:]),
                 self.maps.numel() * 2 / 2**20, self.window)

    def windows(self, indices, seeds=None) -> torch.Tensor:
        """Centre windows (``seeds`` None) or, per seed, a random window flipped with probability 0.5."""
        maps = self.maps[torch.as_tensor(list(indices), dtype=torch.long)].float()
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

    def embed(self, model, indices, seeds=None, batch_size: int = 64) -> torch.Tensor:
        indices = list(indices)
        if seeds is not None:
            return model(self.windows(indices, seeds), from_stage=self.from_stage)
        return torch.cat([model(self.windows(indices[s:s + batch_size]), from_stage=self.from_stage)
                          for s in range(0, len(indices), batch_size)])

    def feature_maps(self, model: RetrievalNet, indices) -> list[torch.Tensor]:
        return [model.backbone.forward_stages(self.windows([i]), start=self.from_stage) for i in indices]


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
    if kind == "cached_prefix":
        return CachedPrefixInputs(images, model, size, workers)
    if kind == "images":
        return ImageInputs(images, model, size, workers)
    raise ValueError(f"train.inputs must be 'images' or 'cached_prefix', got {kind!r}")
