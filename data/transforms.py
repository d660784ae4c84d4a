"""Evaluation-time resizing and normalisation.

Retrieval benchmarks keep the aspect ratio and never crop: labelled sets (Flowers, CUB, ...) resize the
shorter side to N, the revisitop sets resize the longer side to N. Degenerate images (a 1-pixel-wide strip)
would otherwise explode to tens of thousands of pixels, so the longer side is capped at ``max_aspect`` times
the target and every side is at least ``min_side`` pixels (the image is stretched there: a 1-pixel image
has no aspect ratio worth keeping).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from utils.errors import UserError

# shorter_max: shrink only images whose shorter side exceeds the size (SCDA's "shorter side <= 700" rule).
RESIZE_MODES = ("shorter", "longer", "shorter_max", "none")
_PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "lanczos": Image.LANCZOS}


def resized_shape(width: int, height: int, size: int, mode: str, max_aspect: float = 4.0,
                  min_side: int = 32) -> tuple[int, int]:
    """Target (width, height) for resizing one side of a ``width`` x ``height`` image to ``size``."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if mode == "none":
        new_w, new_h = float(width), float(height)
    else:
        reference = max(width, height) if mode == "longer" else min(width, height)
        scale = size / reference
        if mode == "shorter_max":
            scale = min(scale, 1.0)
        longest_allowed = max_aspect * size
        if max(width, height) * scale > longest_allowed:
            scale = longest_allowed / max(width, height)
        new_w, new_h = width * scale, height * scale
    return max(min_side, round(new_w)), max(min_side, round(new_h))


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

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return resized_shape(width, height, self.size, self.mode, self.max_aspect, self.min_side)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.pixels(image))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The resized image's uint8 pixels (H, W, 3); :meth:`normalize` finishes the transform, for one
        image or a stacked batch (batch extraction normalises once per batch)."""
        width, height = self.output_size(*image.size)
        if (width, height) != image.size:
            image = image.resize((width, height), _PIL_FILTERS[self.interpolation])
        return to_pixels(image)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (..., H, W, 3) -> the normalised float tensor (..., 3, H, W)."""
        return normalize_pixels(pixels, self.mean, self.std)

    def describe(self) -> str:
        return f"{self.mode}{self.size}-{self.interpolation}"
