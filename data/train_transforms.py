"""Training augmentation for retrieval fine-tuning, and the labelled dataset that applies it.

Random resized crop to a square ``size`` x ``size`` (fixed-size tensors so P x K batches stack), horizontal
flip, and optional mild colour jitter (off by default: colour is often what tells two landmarks or flowers
apart). Randomness comes from torch: the ``generator`` passed to the call (a per-image seed makes batches
independent of thread or worker scheduling), otherwise torch's global RNG, which DataLoader seeds per worker
from its own generator, so ``torch.manual_seed`` (or ``DataLoader(generator=...)``) reproduces it.
The draws follow torchvision's ``RandomResizedCrop`` and ``ColorJitter`` (whose ``get_params`` only use the
global RNG, hence the two small samplers below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from msretrieval.utils.errors import UserError

from .images import load_image
from .manifest import LabelledImageSet


def uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def random_resized_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                            generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering ``scale`` of the area with aspect ratio in ``ratio``
    (log-uniform): torchvision's algorithm, 10 tries then the central crop, drawn from ``generator``."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * uniform(scale[0], scale[1], generator)
        aspect = math.exp(uniform(log_low, log_high, generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(image: Image.Image, strength: float, generator: torch.Generator | None = None) -> Image.Image:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s], applied in random order."""
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    order = torch.randperm(len(adjust), generator=generator).tolist()
    factors = [uniform(1 - strength, 1 + strength, generator) for _ in adjust]
    for k in order:
        image = adjust[k](image, factors[k])
    return image


@dataclass(frozen=True)
class TrainTransform:
    """PIL image -> normalised float tensor (3, size, size), randomly cropped, flipped and jittered.

    ``scale`` is the range of the crop's area as a fraction of the image, ``ratio`` the range of its aspect
    ratio before it is resized to the square. ``color_jitter`` = s sets brightness, contrast and saturation
    jitter to s (0 = off; hue is never changed).
    """

    size: int
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    color_jitter: float = 0.0

    def __post_init__(self):
        if self.size < 1:
            raise UserError(f"image size must be positive, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise UserError(f"crop scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < low <= high, got {self.ratio}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip probability must be in [0, 1], got {self.flip_probability}")
        if not 0 <= self.color_jitter < 1:
            raise ValueError(f"colour jitter must be in [0, 1), got {self.color_jitter}")

    def augment(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """The random crop, flip and jitter alone (a PIL image of size x size), without tensor conversion."""
        top, left, height, width = random_resized_crop_box(image.width, image.height, self.scale, self.ratio,
                                                           generator)
        image = TF.resized_crop(image, top, left, height, width, [self.size, self.size],
                                interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        if torch.rand(1, generator=generator).item() < self.flip_probability:
            image = TF.hflip(image)
        if self.color_jitter > 0:
            image = color_jitter(image, self.color_jitter, generator)
        return image

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(self.augment(image, generator)), self.mean, self.std)

    def describe(self) -> str:
        jitter = f"-jitter{self.color_jitter:g}" if self.color_jitter else ""
        return f"rrc{self.size}-scale{self.scale[0]:g}-{self.scale[1]:g}-flip{self.flip_probability:g}{jitter}"


class TrainDataset(Dataset):
    """``(transform(image), label, index)`` for each image of a :class:`LabelledImageSet`.

    The index lets a training loop trace a sample (or a loss spike) back to its file. A missing or corrupt
    image raises :class:`ImageLoadError` naming the file: skipping it would silently change the classes'
    sizes that the sampler was built on.
    """

    def __init__(self, image_set: LabelledImageSet, transform: Callable | None = None):
        self.image_set = image_set
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, index: int):
        image = load_image(self.image_set.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.image_set.labels[index]), index
