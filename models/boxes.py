"""Box utilities for the landmark detector: IoU, NMS and VOC-style detection metrics.

Boxes are ``[x1, y1, x2, y2]`` (x right, y down), in any unit as long as predictions and ground truth share it
(the detector reports them normalised to [0, 1]). Functions take NumPy arrays (or anything ``np.asarray``
accepts) and return NumPy values.

Detection metrics follow the PASCAL VOC protocol (the VOC2010+ development kit, class-agnostic here):

* every prediction of the whole set is sorted by score, highest first (ties keep their input order);
* each prediction is compared with the ground truth of *its own image*; it is a true positive when its
  best-overlapping ground-truth box has IoU >= ``iou`` (VOC writes ``> 0.5``; the two differ only on exact
  ties) and that box is not matched yet, otherwise a false positive. A second detection of an already matched
  box (a duplicate) is a false positive: VOC does not fall back to the next-best ground truth;
* AP is the area under the precision-recall curve with all-point interpolation (precision at recall r is the
  highest precision at any recall >= r), VOC2010+'s definition;
* recall is the fraction of ground-truth boxes matched by any prediction (the curve's last recall).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torchvision


def as_boxes(boxes, name: str = "boxes") -> np.ndarray:
    """``boxes`` as a float64 (N, 4) array; a clear error for any other shape or non-finite values."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} must be an (N, 4) array of [x1, y1, x2, y2], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return array


def box_area(boxes) -> np.ndarray:
    boxes = as_boxes(boxes)
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def union_area(boxes) -> float:
    """Area of the union of boxes (overlaps counted once): the sum over the cells of the grid their edges make
    of the cells some box covers. Exact; meant for a handful of boxes (cost grows with the square of N)."""
    boxes = as_boxes(boxes)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    if not len(boxes):
        return 0.0
    xs, ys = np.unique(boxes[:, [0, 2]]), np.unique(boxes[:, [1, 3]])
    centre_x, centre_y = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    inside_x = (boxes[:, None, 0] <= centre_x[None]) & (centre_x[None] <= boxes[:, None, 2])   # (N, X)
    inside_y = (boxes[:, None, 1] <= centre_y[None]) & (centre_y[None] <= boxes[:, None, 3])   # (N, Y)
    covered = (inside_y[:, :, None] & inside_x[:, None, :]).any(axis=0)                        # (Y, X)
    return float((np.diff(ys)[:, None] * np.diff(xs)[None, :] * covered).sum())


def box_iou(a, b) -> np.ndarray:
    """(N, M) intersection over union of two box sets; 0 where the union is empty (degenerate boxes)."""
    a, b = as_boxes(a, "a"), as_boxes(b, "b")
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    intersection = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = box_area(a)[:, None] + box_area(b)[None, :] - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / np.where(union > 0, union, 1), 0.0)


def nms(boxes, scores, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, highest score first.

    A box is dropped when its IoU with a kept, higher-scoring box is *greater than* ``iou_threshold``
    (torchvision's rule)."""
    boxes = as_boxes(boxes)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    keep = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), float(iou_threshold))
    return keep.numpy().astype(np.int64)


@dataclass(frozen=True)
class DetectionMetrics:
    ap: float            # VOC all-point AP at the IoU threshold (NaN without ground truth)
    recall: float        # matched ground truth / all ground truth (NaN without ground truth)
    precision: float     # true positives / predictions (NaN without predictions)
    num_ground_truth: int
    num_predictions: int
    true_positives: int

    def to_dict(self) -> dict:
        return asdict(self)


def _prediction_arrays(predictions, num_images: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(predictions) != num_images:
        raise ValueError(f"predictions for {len(predictions)} images but ground truth for {num_images}")
    result = []
    for index, item in enumerate(predictions):
        try:
            boxes, scores = item
        except (TypeError, ValueError):
            raise ValueError(f"predictions[{index}] must be a (boxes, scores) pair") from None
        boxes = as_boxes(boxes, f"predictions[{index}] boxes")
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(boxes):
            raise ValueError(f"predictions[{index}]: {len(boxes)} boxes but {len(scores)} scores")
        result.append((boxes, scores))
    return result


def detection_metrics(predictions: Sequence, ground_truth: Sequence, iou: float = 0.5) -> DetectionMetrics:
    """VOC-style AP and recall of class-agnostic detections (see the module docstring).

    ``predictions``: per image a ``(boxes (n, 4), scores (n,))`` pair; ``ground_truth``: per image an (m, 4)
    array, in the same order."""
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must lie in (0, 1], got {iou}")
    truth = [as_boxes(g, f"ground_truth[{i}]") for i, g in enumerate(ground_truth)]
    preds = _prediction_arrays(predictions, len(truth))
    num_truth = sum(len(g) for g in truth)
    image_of = np.concatenate([np.full(len(s), i, dtype=np.int64) for i, (_, s) in enumerate(preds)] or
                              [np.zeros(0, dtype=np.int64)])
    box_of = np.concatenate([b for b, _ in preds] or [np.zeros((0, 4))])
    score_of = np.concatenate([s for _, s in preds] or [np.zeros(0)])
    order = np.argsort(-score_of, kind="stable")
    matched = [np.zeros(len(g), dtype=bool) for g in truth]
    hits = np.zeros(len(order), dtype=bool)
    for rank, index in enumerate(order):
        gt = truth[image_of[index]]
        if len(gt) == 0:
            continue
        overlaps = box_iou(box_of[index:index + 1], gt)[0]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou and not matched[image_of[index]][best]:
            matched[image_of[index]][best] = True
            hits[rank] = True
    true_positives = int(hits.sum())
    num_predictions = len(order)
    precision_all = true_positives / num_predictions if num_predictions else float("nan")
    if num_truth == 0:
        return DetectionMetrics(float("nan"), float("nan"), precision_all, 0, num_predictions, true_positives)
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    recall = tp / num_truth
    precision = tp / np.maximum(tp + fp, 1)
    # All-point interpolation (VOC2010+): sentinel ends, precision made non-increasing from the right, area
    # summed where recall changes.
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changes = np.where(mrec[1:] != mrec[:-1])[0]
    ap = float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))
    return DetectionMetrics(ap, true_positives / num_truth, precision_all, num_truth, num_predictions,
                            true_positives)


def average_precision_at_iou(predictions: Sequence, ground_truth: Sequence, iou: float = 0.5) -> float:
    """VOC all-point AP of class-agnostic detections at an IoU threshold (AP@0.5 by default)."""
    return detection_metrics(predictions, ground_truth, iou).ap


def recall_at_iou(predictions: Sequence, ground_truth: Sequence, iou: float = 0.5) -> float:
    """Fraction of ground-truth boxes matched (one prediction each, VOC matching) at an IoU threshold."""
    return detection_metrics(predictions, ground_truth, iou).recall
