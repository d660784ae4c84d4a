"""Image loading that survives real-world files.

Every image that enters the pipeline goes through :func:`load_image`: EXIF orientation is applied, any
PIL mode (grayscale, palette, RGBA, CMYK, 16-bit, ...) becomes RGB, and a missing, corrupt or truncated file
raises :class:`ImageLoadError` naming the file. Failing loudly is deliberate: silently skipping a database
image would change mAP without anyone noticing.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

from msretrieval.utils.errors import UserError

# A truncated JPEG must raise, not decode grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageLoadError(UserError, RuntimeError):
    """An image file could not be read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        # One-argument form: a ready message (how DataLoader workers re-raise exceptions).
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}" if reason is not None else self.path)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white: transparent pixels otherwise become black (or arbitrary palette colours).
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16/32-bit grayscale: PIL's own conversion clips to 0..255; scale 16-bit ranges down first.
        values = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values * (255.0 / max(float(values.max(initial=0)), 1.0))
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read ``path`` as an upright RGB image, or raise :class:`ImageLoadError`."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        with warnings.catch_warnings():
            # PIL warns on oversized images and some odd EXIF blocks; they are still readable.
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.load()
                # in place: without it Pillow returns a copy of every image, rotated or not
                ImageOps.exif_transpose(image, in_place=True)
                image = _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(path, f"{type(error).__name__}: {error}") from None
    if image.width < 1 or image.height < 1:
        raise ImageLoadError(path, f"empty image ({image.width}x{image.height})")
    return image


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(path, f"{type(error).__name__}: {error}") from None
    # Orientations 5-8 swap width and height.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def image_list_fingerprint(paths: Sequence[str | Path], boxes: Sequence | None = None,
                           labels: np.ndarray | None = None) -> str:
    """A hash of an image list: each image's resolved path, size and modification time (and its box and
    label when given). Folders are resolved once each, files are only ``stat``-ed: cheap for a million files."""
    digest = hashlib.sha1()
    folders: dict[str, str] = {}
    for i, path in enumerate(paths):
        folder, name = os.path.split(os.fspath(path))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder or ".")
        resolved = os.path.join(folders[folder], name)
        try:
            stat = os.stat(resolved)
        except FileNotFoundError:
            raise ImageLoadError(path, "file not found") from None
        box = "" if boxes is None or boxes[i] is None else repr(tuple(float(v) for v in boxes[i]))
        digest.update(f"{resolved}\t{stat.st_size}\t{stat.st_mtime_ns}\t{box}\n".encode())
    if labels is not None:
        digest.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes())
    return digest.hexdigest()
