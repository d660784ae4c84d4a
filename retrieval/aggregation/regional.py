"""Regional search (Detect-to-Retrieve §4.2): database images are described by several regions, the full
image always first, and a query scores an image by the max (or average) of its regional similarities.

Regions come from a trained landmark detector (``--detector CHECKPOINT``; :class:`RegionProposer`) and exist
on the database side only: queries are well-localised regions already (the benchmarks crop them to their
box), so the methods here are *asymmetric*.

Database rows are fixed-width arrays (the harness cache stores (N, D) arrays):
``[region count, region 1 (D) ... region R (D)]`` with unused regions zero; ``descriptor_bytes`` counts the
regions an image really has.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from msretrieval.data.transforms import resized_shape
from msretrieval.models.backbones import Preprocessing
from msretrieval.utils.errors import UserError
from msretrieval.utils.files import sha256_file

from msretrieval.retrieval.descriptors.methods import MethodContext, PooledFeatures, RetrievalMethod, register_method
from msretrieval.retrieval.search.scores import ScoreSource, as_tensor

log = logging.getLogger(__name__)

POOLINGS = ("max", "avg")


class DetectorMissing(UserError):
    """A regional method was asked for without a detector checkpoint."""


class RegionProposer:
    """A trained detector's boxes (normalised [x1, y1, x2, y2], the full image first) for normalised image
    tensors, remembered per image content so that several regional methods detect each image once."""

    def __init__(self, checkpoint: str | Path, max_regions: int = 4, score_threshold: float | None = None,
                 nms_threshold: float | None = None, device: str = "cpu"):
        from msretrieval.models.detector import load_detector  # torchvision detection: only when regions are asked for

        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_file():
            raise DetectorMissing(f"detector checkpoint not found: {self.checkpoint}")
        self.detector = load_detector(self.checkpoint, map_location=device)
        # thresholds: the detector checkpoint's own (0.3 score, 0.5 NMS by default) unless given
        config = self.detector.config
        self.max_regions = max_regions
        self.score_threshold = config.score_threshold if score_threshold is None else score_threshold
        self.nms_threshold = config.nms_threshold if nms_threshold is None else nms_threshold
        self.fingerprint = sha256_file(self.checkpoint)[:16]
        self._memo: dict[str, np.ndarray] = {}

    def config(self) -> dict:
        return {"detector": str(self.checkpoint), "detector_fingerprint": self.fingerprint,
                "max_regions": self.max_regions, "score_threshold": self.score_threshold,
                "nms_threshold": self.nms_threshold, "min_box_side": self.detector.config.min_box_side}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, preprocessing: Preprocessing) -> list[np.ndarray]:
        """(B, 3, H, W) images normalised with ``preprocessing`` -> per image an (n, 4) box array."""
        mean = torch.tensor(preprocessing.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(preprocessing.std, device=images.device).view(1, 3, 1, 1)
        pixels = (images.float() * std + mean).clamp(0, 1).contiguous()
        keys = [hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest() for image in pixels]
        missing = [i for i, key in enumerate(keys) if key not in self._memo]
        if missing:
            boxes = self.detector.propose([pixels[i] for i in missing], max_boxes=self.max_regions,
                                          score_threshold=self.score_threshold, nms_threshold=self.nms_threshold)
            for i, image_boxes in zip(missing, boxes):
                self._memo[keys[i]] = np.asarray(image_boxes, dtype=np.float32)
        return [self._memo[key] for key in keys]


def proposer_from_context(context: MethodContext, method: str) -> RegionProposer:
    if context.detector is None:
        raise DetectorMissing(
            f"{method} needs a landmark detector: train one with `python scripts/train_detector.py` and pass "
            f"--detector RUN_DIR/best.pt")
    key = ("proposer", context.detector, context.max_regions, context.region_score_threshold,
           context.region_nms_threshold)
    if key not in context._shared:  # one detector (and one memo of its boxes) for every regional method
        context._shared[key] = RegionProposer(context.detector, max_regions=context.max_regions,
                                              score_threshold=context.region_score_threshold,
                                              nms_threshold=context.region_nms_threshold, device=context.device)
    return context._shared[key]


#: ``region_size`` value (``--region-size native``): a detected region is described from its pixels as they are in
#: the evaluated image, at the image's own scale (DELF crops the box and extracts from the crop unresized)
NATIVE = "native"


def parse_region_size(text: str) -> int | str:
    """``--region-size``: a shorter side in pixels (an integer >= 0; 0 for the regional kernels' in-box
    selection) or ``native``."""
    value = str(text).strip().lower()
    if value == NATIVE:
        return NATIVE
    try:
        size = int(value)
    except ValueError:
        raise UserError(f"--region-size must be a number of pixels or 'native', got {text!r}") from None
    if size < 0:
        raise UserError(f"--region-size must be >= 0 or 'native', got {size}")
    return size


def crop_region(image: torch.Tensor, box, shorter_side: int | str) -> torch.Tensor:
    """(3, H, W) -> the box's pixels resized (bilinear, aspect kept) by the rule that sizes every evaluation image
    (:func:`data.transforms.resized_shape`): shorter side ``shorter_side``, but the longer side at most 4x that
    and no side under 32 px (or ``shorter_side`` if smaller). Without the cap a sliver box (a detection clipped
    at the image border, 1 px wide) became a 224 x 66,528 crop whose forward pass took 13 s.

    ``shorter_side="native"`` (:data:`NATIVE`): the box's pixels as they are, except that a side under 32 px is
    stretched to 32 (the same floor; a crop cannot be larger than its image, so no cap is needed).

    The box covers pixels ``floor(x1 W) .. ceil(x2 W)`` (at least one), as DELF's crop does."""
    height, width = image.shape[-2:]
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = int(np.floor(x1 * width)), int(np.floor(y1 * height))
    right, bottom = max(left + 1, int(np.ceil(x2 * width))), max(top + 1, int(np.ceil(y2 * height)))
    crop = image[:, top:bottom, left:right]
    if shorter_side == NATIVE:
        new_width, new_height = resized_shape(crop.shape[-1], crop.shape[-2], 0, "none", min_side=32)
        if (new_height, new_width) == tuple(crop.shape[-2:]):
            return crop
    else:
        new_width, new_height = resized_shape(crop.shape[-1], crop.shape[-2], shorter_side, "shorter",
                                               min_side=min(32, shorter_side))
    return F.interpolate(crop[None], size=(new_height, new_width), mode="bilinear", align_corners=False)[0]


def pack_regions(regions: list[torch.Tensor], slots: int, dim: int) -> torch.Tensor:
    """Per image an (n, D) tensor -> (B, 1 + slots * D) rows ``[n, regions..., zeros]``."""
    rows = torch.zeros(len(regions), 1 + slots * dim)
    for i, descriptors in enumerate(regions):
        count = min(len(descriptors), slots)
        rows[i, 0] = count
        rows[i, 1:1 + count * dim] = descriptors[:count].reshape(-1).float().cpu()
    return rows


def unpack_regions(rows: np.ndarray, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_regions`: (N, slots, D) descriptors and an (N, slots) validity mask."""
    rows = as_tensor(rows).float()
    slots = (rows.shape[1] - 1) // dim
    if rows.shape[1] != 1 + slots * dim:
        raise ValueError(f"regional rows of width {rows.shape[1]} do not hold {dim}-d regions")
    counts = rows[:, 0].long()
    mask = torch.arange(slots)[None, :] < counts[:, None]
    return rows[:, 1:].reshape(len(rows), slots, dim), mask


class RegionalScores(ScoreSource):
    """Query descriptors (Q, D) against regional database rows: max or mean of the regional inner products."""

    def __init__(self, queries, database_rows, dim: int, pooling: str):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.queries = as_tensor(queries).float()
        self.regions, self.mask = unpack_regions(database_rows, dim)
        self.pooling = pooling
        self.num_queries, self.num_database = len(self.queries), len(self.regions)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        similarities = torch.einsum("qd,nrd->qnr", self.queries[start:stop], self.regions)
        if self.pooling == "max":
            return similarities.masked_fill(~self.mask[None], float("-inf")).amax(dim=2)
        return (similarities * self.mask[None]).sum(dim=2) / self.mask.sum(dim=1).clamp(min=1)[None]


class RegionalSearch(RetrievalMethod):
    """A global descriptor per region: the full image as it is, and each detected box re-encoded from its
    pixels with the shorter side at ``region_size`` (a small object is enlarged to about the scale of a query;
    224 keeps a region as cheap as a standard query), or at the image's own scale (``region_size="native"``);
    image score = max / average of the region similarities."""

    asymmetric = True

    def __init__(self, name: str, describer: RetrievalMethod, proposer: RegionProposer, pooling: str,
                 region_size: int | str = 224):
        super().__init__(name)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if region_size != NATIVE and region_size < 16:
            raise ValueError(f"region_size must be at least 16 pixels or 'native', got {region_size}")
        self.describer, self.proposer, self.pooling, self.region_size = describer, proposer, pooling, region_size
        self.slots = 1 + proposer.max_regions

    @property
    def preprocessing(self) -> Preprocessing:
        return self.describer.preprocessing

    def config(self) -> dict:
        # no pooling here: max and avg share the database descriptors (and their cache entry)
        return {"name": "regional_search", "describer": self.describer.config(), "region_size": self.region_size,
                **self.proposer.config()}

    @property
    def cache_name(self) -> str:
        return "regional_search"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.describer.encode(images)

    def encode_database(self, images: torch.Tensor) -> torch.Tensor:
        boxes = self.proposer(images, self.preprocessing)
        full = self.describer.encode(images)  # the whole batch at once (and shared with other methods)
        regions = []
        for image, whole, image_boxes in zip(images, full, boxes):
            crops = [self.describer.encode(crop_region(image, box, self.region_size)[None]) for box in image_boxes[1:]]
            regions.append(torch.cat([whole[None], *crops]))
        return pack_regions(regions, self.slots, full.shape[1])

    def scores(self, queries: np.ndarray, database: np.ndarray) -> ScoreSource:
        return RegionalScores(queries, database, queries.shape[1], self.pooling)

    def descriptor_bytes(self, descriptors: np.ndarray) -> int:
        dim = (descriptors.shape[1] - 1) // self.slots
        return int(round(float(descriptors[:, 0].mean()) * dim * 4))


def _regional_gem(pooling: str):
    def factory(context: MethodContext) -> RetrievalMethod:
        name = f"regional_search_{pooling}"
        gem = PooledFeatures("gem", context.create_backbone(), "gem", p=3.0, learn_p=False)
        if context.region_size != NATIVE and context.region_size < 16:
            raise UserError(f"{name} describes each region's crop: --region-size must be at least 16 pixels or "
                            f"'native', got {context.region_size} (0 is for the regional kernels only)")
        return RegionalSearch(name, gem, proposer_from_context(context, name), pooling, context.region_size)
    factory.__doc__ = f"GeM per detected region (and the full image), image score = {pooling} over regions."
    return factory


for _pooling in POOLINGS:
    register_method(f"regional_search_{_pooling}")(_regional_gem(_pooling))
