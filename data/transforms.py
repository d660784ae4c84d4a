"""Evaluation-time resizing and normalisation.

Retrieval benchmarks keep the aspect ratio and never crop. Resize modes (``size`` = N):

- ``shorter``: the shorter side to N (labelled sets: Flowers, CUB, ...);
- ``longer``: the longer side to N;
- ``shorter_max``: the shorter side to N, shrinking only (SCDA's "shorter side <= 700" rule);
- ``longer_max``: PIL's ``Image.thumbnail((N, N))`` - the longer side to at most N, shrinking only, with
  Pillow's thumbnail rounding (:func:`thumbnail_shape`) and its resampling (``reducing_gap=2.0``). This is
  ``imresize`` of cnnimageretrieval-pytorch (``cirtorch/datasets/datahelpers.py``), the revisitop protocol;
- ``none``: the image as it is.

**Crops keep the scale of their full image.** A query cropped to its box (the revisitop ``bbx``) is resized by
the factor its *full* image gets, not as an image of its own: the transform is told the full image's size
(``full_size``). For ``longer_max`` this is the published rule, ``imresize(crop, N * max(crop.size) /
max(full.size))`` (``ImagesFromList.__getitem__`` of ``cirtorch/datasets/genericdataset.py``), so a 300 x 200
crop of a 1024 x 768 photo stays 300 x 200 at N = 1024 instead of growing to 1024 x 683. The other modes scale
the crop by the factor of their rule applied to the full image (``shorter``: N / min(full); ``longer``: N /
max(full); ``shorter_max``: min(1, N / min(full)); ``none``: 1), then round each side.

Degenerate images (a 1-pixel-wide strip) would otherwise explode to tens of thousands of pixels, so the longer
side is capped at ``max_aspect`` times the target (computed on the full image for a crop) and every side is
at least ``min_side`` pixels (the image is stretched there: a 1-pixel image has no aspect ratio worth keeping;
this is the one place ``longer_max`` departs from the reference, which would keep a 20-pixel side).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from msretrieval.utils.errors import UserError

RESIZE_MODES = ("shorter", "longer", "shorter_max", "longer_max", "none")
#: resampling of ``longer_max``: Pillow's thumbnail first reduces by an integer factor while the image stays
#: at least this many times the target, then resamples (see ``PIL.Image.Image.thumbnail``)
THUMBNAIL_REDUCING_GAP = 2.0
_PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "lanczos": Image.LANCZOS}


def thumbnail_shape(width: int, height: int, bound: float) -> tuple[int, int]:
    """(width, height) of ``Image.thumbnail((bound, bound))`` on a ``width`` x ``height`` image (Pillow >= 7.0,
    checked against 13.0): ``bound`` is floored; an image that fits is kept; otherwise the side whose ratio
    to the bound is larger becomes ``floor(bound)`` and the other side is floor or ceil of its exact size,
    whichever keeps the aspect ratio better (floor on a tie), and at least 1. (Pillow < 7 truncated the
    other side instead.) A bound under 1 counts as 1, where Pillow would divide by zero."""
    limit = max(math.floor(bound), 1)
    if limit >= width and limit >= height:
        return width, height
    aspect = width / height
    if aspect <= 1:  # portrait or square: the height is the limit (Pillow: x / y >= aspect with x = y)
        target = limit * aspect
        other = min(math.floor(target), math.ceil(target), key=lambda n: abs(aspect - n / limit))
        return max(other, 1), limit
    target = limit / aspect
    other = min(math.floor(target), math.ceil(target), key=lambda n: 0 if n == 0 else abs(aspect - limit / n))
    return limit, max(other, 1)


def _scale(width: int, height: int, size: int, mode: str, max_aspect: float) -> float:
    """The factor the rule of ``mode`` resizes a ``width`` x ``height`` image by (before rounding)."""
    if mode == "none":
        return 1.0
    reference = max(width, height) if mode == "longer" else min(width, height)
    scale = size / reference
    if mode == "shorter_max":
        scale = min(scale, 1.0)
    longest_allowed = max_aspect * size
    if max(width, height) * scale > longest_allowed:
        scale = longest_allowed / max(width, height)
    return scale


def resized_shape(width: int, height: int, size: int, mode: str, max_aspect: float = 4.0,
                  min_side: int = 32, full_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Target (width, height) for resizing a ``width`` x ``height`` image to ``size`` by the rule of ``mode``
    (see the module docstring). ``full_size``: the image is a crop of a ``full_size`` image and keeps that
    image's scale."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    full_w, full_h = (width, height) if full_size is None else full_size
    if mode == "longer_max":
        # cirtorch's bound for a crop, in its order of operations: imsize * max(crop.size) / imfullsize
        new_w, new_h = thumbnail_shape(width, height, size * max(width, height) / max(full_w, full_h))
    else:
        scale = _scale(full_w, full_h, size, mode, max_aspect)
        new_w, new_h = round(width * scale), round(height * scale)
    return max(min_side, new_w), max(min_side, new_h)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> its (H, W, 3) uint8 pixels as a tensor (the decoded array, no copy)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    return torch.from_numpy(np.array(image))


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels (..., H, W, 3) -> float32 (..., 3, H, W) ``(pixel / 255 - mean) / std``, one image or a batch.

    The values are torchvision's ``normalize(to_tensor(image))`` to the bit (the same three roundings per
    value), and the result keeps the pixels' interleaved layout: a batch comes out channels-last, which the
    networks read directly, so normalising a stacked uint8 batch saves the float stack and the layout copy."""
    if pixels.dtype != torch.uint8 or pixels.dim() < 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels (..., H, W, 3), got {pixels.dtype} {tuple(pixels.shape)}")
    tensor = pixels.movedim(-1, -3).to(torch.float32).div_(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=tensor.device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=tensor.device).view(3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


def to_normalized_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB PIL image -> (3, H, W) float32 tensor ``(pixel / 255 - mean) / std``: the values of torchvision's
    ``normalize(to_tensor(image))`` to the bit, with two passes over the pixels fewer (no transposed copy, no
    clone)."""
    return normalize_pixels(to_pixels(image), mean, std)


@dataclass(frozen=True)
class EvalTransform:
    """PIL image -> normalised float tensor (C, H, W), aspect ratio kept, no crop."""

    size: int
    mode: str = "shorter"
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    max_aspect: float = 4.0
    min_side: int = 32
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.mode not in RESIZE_MODES:
            raise UserError(f"resize mode must be one of {RESIZE_MODES}, got {self.mode!r}")
        if self.interpolation not in _PIL_FILTERS:
            raise UserError(f"interpolation must be one of {sorted(_PIL_FILTERS)}, got {self.interpolation!r}")
        if self.size < 1:
            raise UserError(f"image size must be positive, got {self.size}")

    def output_size(self, width: int, height: int, full_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Resized (width, height); ``full_size``: the image is a crop of an image of that size (it keeps
        that image's scale)."""
        return resized_shape(width, height, self.size, self.mode, self.max_aspect, self.min_side, full_size)

    def __call__(self, image: Image.Image, full_size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.normalize(self.pixels(image, full_size))

    def pixels(self, image: Image.Image, full_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The resized image's uint8 pixels (H, W, 3); :meth:`normalize` finishes the transform, for one
        image or a stacked batch (batch extraction normalises once per batch)."""
        width, height = self.output_size(*image.size, full_size=full_size)
        if (width, height) != image.size:
            # longer_max resamples as PIL's thumbnail does (its pixels, to the bit, unless min_side stretched)
            gap = THUMBNAIL_REDUCING_GAP if self.mode == "longer_max" else None
            image = image.resize((width, height), _PIL_FILTERS[self.interpolation], reducing_gap=gap)
        return to_pixels(image)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (..., H, W, 3) -> the normalised float tensor (..., 3, H, W)."""
        return normalize_pixels(pixels, self.mean, self.std)

    def describe(self) -> str:
        return f"{self.mode}{self.size}-{self.interpolation}"
