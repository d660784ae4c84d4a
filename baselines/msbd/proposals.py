"""Object proposals for the object branch, pluggable by name.

``create_proposer(name, **options)`` returns ``f(rgb uint8 (H, W, 3)) -> (n, 4) float boxes [x1, y1, x2,
y2]``, best first. The paper uses EdgeBoxes, which needs a structured-edge model file (OpenCV's
``model.yml.gz``, not installable offline): pass ``edge_model=PATH``. Without it selective search (OpenCV
contrib) is the default; ``grid`` (MOP-CNN's sliding windows) needs nothing and is deterministic.
:func:`multi_scale_boxes` runs a proposer over the paper's scales and merges the results.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torchvision.ops import nms

from msretrieval.utils.errors import UserError

from .opencv import opencv

Proposer = Callable[[np.ndarray], np.ndarray]
SELECTIVE_SEARCH_MODES = ("single", "fast", "quality")


def _selective_search(mode: str = "single", **_) -> Proposer:
    """OpenCV selective search; ``single`` (one colour space and strategy) is ~7x faster than ``fast``."""
    if mode not in SELECTIVE_SEARCH_MODES:
        raise UserError(f"selective search mode must be one of {SELECTIVE_SEARCH_MODES}, got {mode!r}")
    search = opencv().ximgproc.segmentation.createSelectiveSearchSegmentation()

    def propose(rgb: np.ndarray) -> np.ndarray:
        search.setBaseImage(np.ascontiguousarray(rgb[..., ::-1]))
        {"single": search.switchToSingleStrategy, "fast": search.switchToSelectiveSearchFast,
         "quality": search.switchToSelectiveSearchQuality}[mode]()
        return _xywh_to_xyxy(search.process())
    return propose


def _edge_boxes(edge_model: str | None = None, max_boxes: int = 200, **_) -> Proposer:
    """EdgeBoxes (the paper's detector) on structured edges from an OpenCV model file."""
    if not edge_model:
        raise UserError("EdgeBoxes needs a structured-edge model file (OpenCV's model.yml.gz): set edge_model")
    cv2 = opencv()
    detector = cv2.ximgproc.createStructuredEdgeDetection(str(edge_model))
    boxes_finder = cv2.ximgproc.createEdgeBoxes()
    boxes_finder.setMaxBoxes(max_boxes)

    def propose(rgb: np.ndarray) -> np.ndarray:
        edges = detector.detectEdges(rgb.astype(np.float32) / 255.0)
        orientation = detector.computeOrientation(edges)
        edges = detector.edgesNms(edges, orientation)
        boxes, _ = boxes_finder.getBoundingBoxes(edges, orientation)
        return _xywh_to_xyxy(boxes)
    return propose


def _grid(levels: tuple[int, ...] = (1, 2, 3), **_) -> Proposer:
    """Sliding windows: an n x n grid of half-overlapping squares per level (MOP-CNN style)."""
    def propose(rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        boxes = []
        for n in levels:
            side = min(width, height) * 2 / (n + 1)
            xs = np.linspace(0, width - side, n) if n > 1 else [(width - side) / 2]
            ys = np.linspace(0, height - side, n) if n > 1 else [(height - side) / 2]
            boxes += [[x, y, x + side, y + side] for y in ys for x in xs]
        return np.asarray(boxes, dtype=np.float64)
    return propose


PROPOSERS: dict[str, Callable[..., Proposer]] = {
    "selective_search": _selective_search,
    "edge_boxes": _edge_boxes,
    "grid": _grid,
}


def create_proposer(name: str, **options) -> Proposer:
    if name not in PROPOSERS:
        raise UserError(f"unknown proposal method {name!r}; available: {', '.join(PROPOSERS)}")
    return PROPOSERS[name](**options)


def _xywh_to_xyxy(boxes) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def multi_scale_boxes(rgb: np.ndarray, proposer: Proposer, side: int, scales, count: int,
                      min_area: float = 0.02, nms_iou: float = 0.5) -> np.ndarray:
    """Top ``count`` boxes (in ``rgb`` pixels) over the image resized to shorter side ``side * s`` per scale.

    Proposals are merged rank by rank across scales (each detector's best first), boxes smaller than
    ``min_area`` of the image are dropped, near duplicates removed by NMS. Never empty: the whole image is
    the fallback.
    """
    cv2 = opencv()
    height, width = rgb.shape[:2]
    ranked = []
    for scale_index, scale in enumerate(scales):
        factor = side * scale / min(height, width)
        small = cv2.resize(rgb, (max(8, round(width * factor)), max(8, round(height * factor))),
                           interpolation=cv2.INTER_AREA)
        boxes = proposer(small) / factor
        boxes = np.clip(boxes, 0, [width, height, width, height])
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np.flatnonzero(area >= min_area * width * height)
        ranked += [(rank, scale_index, boxes[i]) for rank, i in enumerate(keep)]
    if not ranked:
        return np.array([[0.0, 0.0, width, height]])
    ranked.sort(key=lambda item: (item[0], item[1]))
    boxes = torch.tensor(np.stack([box for _, _, box in ranked]), dtype=torch.float32)
    order_scores = -torch.arange(len(boxes), dtype=torch.float32)
    kept = nms(boxes, order_scores, nms_iou)[:count]
    return boxes[kept].double().numpy()
