"""Torch datasets over image paths (optionally cropped to per-image boxes)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset

from .images import ImageLoadError, image_size, load_image

Box = tuple[float, float, float, float]


class ImageDataset(Dataset):
    """``(transform(image), index)`` for each path; ``boxes[i]`` = [x1, y1, x2, y2] crops image ``i`` first.

    A cropped image is handed to the transform with the size of the image it was cropped from,
    ``transform(crop, full_size=(width, height))``, so that the crop keeps the scale of its full image (the
    revisitop query rule, :mod:`data.transforms`); a transform for a dataset with boxes must accept it.
    Loading errors propagate as :class:`ImageLoadError` naming the file, so evaluation stops instead of
    silently changing the database.
    """

    def __init__(self, paths: Sequence[str | Path], transform: Callable | None = None,
                 boxes: Sequence[Box | None] | None = None):
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"{len(boxes)} boxes for {len(paths)} images")
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        image = load_image(self.paths[index])
        box = self.boxes[index] if self.boxes is not None else None
        if box is not None:
            image = crop_to_box(image, box, self.paths[index])
        return image

    def full_size(self, index: int) -> tuple[int, int] | None:
        """(width, height) of the whole image ``index`` when it is cropped to a box (read from its header,
        EXIF orientation applied, as :meth:`load` decodes it); None when it is not cropped."""
        if self.boxes is None or self.boxes[index] is None:
            return None
        return image_size(self.paths[index])

    def __getitem__(self, index: int):
        image = self.load(index)
        if self.transform is None:
            return image, index
        full_size = self.full_size(index)
        if full_size is None:
            return self.transform(image), index
        return self.transform(image, full_size=full_size), index


def box_pixels(box: Box, width: int, height: int, path: str | Path = "<image>") -> tuple[int, int, int, int]:
    """[x1, y1, x2, y2] clipped to a width x height image and rounded to pixels; a box that leaves less than
    one pixel is an error naming the file."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, y1 = max(0.0, x1), max(0.0, y1)
    x2, y2 = min(float(width), x2), min(float(height), y2)
    left, top, right, bottom = round(x1), round(y1), round(x2), round(y2)
    if x2 - x1 < 1 or y2 - y1 < 1 or right <= left or bottom <= top:
        raise ImageLoadError(path, f"box {list(box)} is empty inside the {width}x{height} image")
    return left, top, right, bottom


def crop_to_box(image, box: Box, path: str | Path = "<image>"):
    """Crop to [x1, y1, x2, y2] (clipped to the image); an empty box is an error naming the file."""
    return image.crop(box_pixels(box, image.width, image.height, path))
