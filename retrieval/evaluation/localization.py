"""Object localisation scores: box IoU, PCP, and ground-truth boxes read from a manifest.

Boxes are ``[x1, y1, x2, y2]`` in continuous pixel coordinates: ``x1, y1`` the top-left corner, ``x2, y2``
the bottom-right one, so a box ``[0, 0, w, h]`` covers a whole ``w`` x ``h`` image and its area is
``(x2 - x1) * (y2 - y1)`` (no ``+ 1``). :func:`baselines.scda.component_boxes` uses the same convention.

PCP (Percentage of Correctly localized Parts) is the SCDA paper's localisation score (Wei et al., TIP 2017,
Sec. IV-C on CUB-200-2011): a predicted box is correct when its IoU with the ground truth is *strictly
greater* than 0.5.

A manifest may carry ground-truth boxes in the optional columns ``x1, y1, x2, y2``, in pixels of the
original photo. When the manifest also has ``orig_w, orig_h`` (resized packs such as ``flowers102``), the
boxes are in that frame; :func:`rescale_boxes` moves them to the frame of the file actually loaded.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from msretrieval.data.boxes import finite_number
from msretrieval.data.manifest import LabelledImageSet
from msretrieval.utils.errors import UserError

BOX_COLUMNS = ("x1", "y1", "x2", "y2")
ORIGINAL_SIZE_COLUMNS = ("orig_w", "orig_h")


def _as_boxes(boxes, name: str) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} must be an (N, 4) array of [x1, y1, x2, y2] boxes, got shape {array.shape}")
    return array


def box_iou(a, b) -> np.ndarray:
    """Intersection over union of aligned box pairs: (N, 4) x (N, 4) -> (N,).

    A pair whose union has zero area (two degenerate boxes) has IoU 0.
    """
    a, b = _as_boxes(a, "a"), _as_boxes(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"box arrays differ in length: {len(a)} vs {len(b)} (boxes are compared pairwise)")
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    intersection = width * height
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def pcp(predicted, ground_truth, threshold: float = 0.5) -> float:
    """Fraction of predicted boxes whose IoU with their ground truth is strictly above ``threshold``."""
    iou = box_iou(predicted, ground_truth)
    if len(iou) == 0:
        raise ValueError("PCP of zero boxes is undefined")
    return float(np.mean(iou > threshold))


def boxes_from_manifest(image_set: LabelledImageSet) -> np.ndarray | None:
    """Ground-truth boxes (N, 4) from the manifest columns ``x1, y1, x2, y2``; None when they are absent.

    Raises ValueError, naming the image file, on a non-numeric or non-finite value or an inverted box
    (``x2 < x1`` or ``y2 < y1``), and when only some of the four columns exist.
    """
    present = [c for c in BOX_COLUMNS if c in image_set.extra]
    if not present:
        return None
    if len(present) != len(BOX_COLUMNS):
        missing = [c for c in BOX_COLUMNS if c not in image_set.extra]
        raise UserError(f"{image_set.name}: box columns {missing} missing (found {present}); "
                         f"boxes need all of {list(BOX_COLUMNS)}")
    boxes = np.empty((len(image_set), 4), dtype=np.float64)
    for i, path in enumerate(image_set.paths):
        boxes[i] = [finite_number(image_set.extra[c][i], f"box column {c}", path, UserError) for c in BOX_COLUMNS]
        x1, y1, x2, y2 = boxes[i]
        if x2 < x1 or y2 < y1:
            raise UserError(f"box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] has x2 < x1 or y2 < y1 (file {path})")
    return boxes


def original_sizes(image_set: LabelledImageSet) -> list[tuple[float, float]] | None:
    """(width, height) of the original photos from the columns ``orig_w, orig_h``; None when absent."""
    if not all(c in image_set.extra for c in ORIGINAL_SIZE_COLUMNS):
        return None
    sizes = []
    for i, path in enumerate(image_set.paths):
        width, height = (finite_number(image_set.extra[c][i], f"column {c}", path, UserError)
                         for c in ORIGINAL_SIZE_COLUMNS)
        if width <= 0 or height <= 0:
            raise UserError(f"original size {width:g}x{height:g} is not positive (file {path})")
        sizes.append((width, height))
    return sizes


def rescale_boxes(boxes, from_sizes: Sequence[tuple[float, float]],
                  to_sizes: Sequence[tuple[float, float]]) -> np.ndarray:
    """Boxes (N, 4) given in images of ``from_sizes`` (width, height) -> the same boxes in ``to_sizes``."""
    boxes = _as_boxes(boxes, "boxes")
    source, target = np.asarray(from_sizes, dtype=np.float64), np.asarray(to_sizes, dtype=np.float64)
    if source.shape != (len(boxes), 2) or target.shape != (len(boxes), 2):
        raise ValueError(f"need one (width, height) per box: {len(boxes)} boxes, "
                         f"{len(source)} source and {len(target)} target sizes")
    scale = target / source
    return boxes * np.concatenate([scale, scale], axis=1)
