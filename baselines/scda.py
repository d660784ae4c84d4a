"""SCDA - Selective Convolutional Descriptor Aggregation (Wei et al., TIP 2017), unsupervised.

Faithful to the official MATLAB code (version Dec. 18, 2016):

1. aggregation map A = channel sum of the last conv map (VGG-16 pool5); mask = A > mean(A);
2. keep the largest connected component of the mask (8-connectivity; on equal sizes the component met first
   in column-major order, as MATLAB's ``bwconncomp`` + ``max`` pick);
3. SCDA+ also uses an earlier layer (VGG-16 relu5_2): its own mask A' > mean(A') AND the last-layer component
   upsampled to its size (nearest, MATLAB ``imresize`` convention = torch ``nearest-exact``);
4. per layer: average- and max-pool over the *selected* descriptors only, each L2-normalised;
   SCDA = [avg, max] of the last layer; SCDA+ = [avg_last, max_last, 0.5 avg_early, 0.5 max_early];
   SCDA_flip+ = SCDA+ of the image and of its horizontal flip, concatenated; the result is L2-normalised.

An empty selection (an all-zero map, or an empty intersection in step 3) falls back to all positions, so a
descriptor is never NaN. The official code leaves the deep descriptors of the image at its own resolution
(only shrinking images whose shorter side exceeds 700 px): use ``--resize-mode shorter_max --image-size 700``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from msretrieval.models.backbones import FEATURES, Backbone, Preprocessing
from msretrieval.models.pooling import l2n, mac, spoc
from msretrieval.retrieval.descriptors.methods import MethodContext, RetrievalMethod, register_method
from msretrieval.utils.errors import UserError

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# (last layer, earlier layer) per backbone family. VGG-16 is the paper's pair. For the others the earlier
# layer is the last non-negative (post-ReLU) map at stride 16, the position relu5_2 has in VGG-16: ResNet
# layer3; EfficientNet the ReLU6 output of the expansion conv opening stage 6 (block outputs are linear and
# signed, which would break the "activation sum" reading of A).
_LAYER_PAIRS = {
    "vgg16": ("pool5", "relu5_2"),
    "vgg19": ("pool5", "relu5_2"),
    "resnet": (FEATURES, "layer3"),
    "efficientnet": (FEATURES, "blocks5_expand"),
}


def scda_layers(backbone_name: str) -> tuple[str, str]:
    arch = backbone_name.split(".")[0]
    for prefix, pair in _LAYER_PAIRS.items():
        if arch.startswith(prefix) or (prefix == "efficientnet" and "efficientnet" in arch):
            return pair
    if arch.startswith(("resnext", "wide_resnet", "seresnet")):
        return _LAYER_PAIRS["resnet"]
    raise UserError(f"no SCDA layer pair known for backbone {backbone_name!r}; "
                     f"known families: {', '.join(_LAYER_PAIRS)}")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean (h, w) mask; an empty mask selects everything."""
    if not mask.any():
        return np.ones_like(mask, dtype=bool)
    # Label the transpose so that label order is column-major, like MATLAB's bwconncomp.
    labels, count = ndimage.label(mask.T, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return (labels == int(np.argmax(sizes))).T


def aggregation_masks(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> boolean (B, h, w): positions whose channel sum exceeds the map's mean."""
    activation = fmap.sum(dim=1)
    return activation > activation.mean(dim=(1, 2), keepdim=True)


def scda_masks(last: torch.Tensor, earlier: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Selection masks (B, 1, h, w) of the last layer and, if given, the earlier layer."""
    above = aggregation_masks(last).cpu().numpy()
    component = torch.from_numpy(np.stack([largest_component(m) for m in above])).unsqueeze(1).to(last.device)
    if earlier is None:
        return component, None
    return component, aggregation_masks(earlier).unsqueeze(1) & upsample_mask(component, earlier.shape[-2:])


def upsample_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of a boolean (B, 1, h, w) mask, as MATLAB's ``imresize(m, size, 'nearest')``."""
    return F.interpolate(mask.float(), size=tuple(size), mode="nearest-exact") > 0.5


def select_and_pool(fmap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[L2(avg of selected), L2(max of selected)] -> (B, 2C)."""
    return torch.cat([l2n(spoc(fmap, mask)), l2n(mac(fmap, mask))], dim=1)


def component_boxes(masks: torch.Tensor, image_sizes: list[tuple[int, int]]) -> np.ndarray:
    """Boxes [x1, y1, x2, y2] in image pixels around each (1, h, w) mask, for images of (width, height)."""
    boxes = []
    for mask, (width, height) in zip(masks, image_sizes):
        grid = mask[0].cpu().numpy()
        rows, cols = np.flatnonzero(grid.any(1)), np.flatnonzero(grid.any(0))
        h, w = grid.shape
        boxes.append([cols[0] * width / w, rows[0] * height / h, (cols[-1] + 1) * width / w,
                      (rows[-1] + 1) * height / h])
    return np.asarray(boxes, dtype=np.float64)


@dataclass(frozen=True)
class SCDAVariant:
    name: str
    use_earlier: bool
    flip: bool


VARIANTS = {
    "scda": SCDAVariant("scda", use_earlier=False, flip=False),
    "scda_plus": SCDAVariant("scda_plus", use_earlier=True, flip=False),
    "scda_flip_plus": SCDAVariant("scda_flip_plus", use_earlier=True, flip=True),
}


class SCDA(RetrievalMethod):
    """SCDA / SCDA+ / SCDA_flip+ on any backbone with a known layer pair."""

    def __init__(self, backbone: Backbone, variant: str = "scda_flip_plus", earlier_weight: float = 0.5,
                 layers: tuple[str, str] | None = None):
        super().__init__(variant)
        self.variant = VARIANTS[variant]
        self.backbone = backbone
        self.last_layer, self.earlier_layer = layers or scda_layers(backbone.name)
        self.earlier_weight = earlier_weight

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing

    def config(self) -> dict:
        return {"name": self.name, "backbone": self.backbone.describe(), "last": self.last_layer,
                "earlier": self.earlier_layer if self.variant.use_earlier else None,
                "earlier_weight": self.earlier_weight, "flip": self.variant.flip}

    def feature_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        taps = [self.last_layer] + ([self.earlier_layer] if self.variant.use_earlier else [])
        maps = self.backbone.forward_taps(images, taps)
        return maps[self.last_layer], maps.get(self.earlier_layer) if self.variant.use_earlier else None

    def describe_images(self, images: torch.Tensor) -> torch.Tensor:
        """SCDA or SCDA+ of each image (no flip, no final normalisation)."""
        last, earlier = self.feature_maps(images)
        last_mask, earlier_mask = scda_masks(last, earlier)
        parts = [select_and_pool(last, last_mask)]
        if earlier is not None:
            parts.append(self.earlier_weight * select_and_pool(earlier, earlier_mask))
        return torch.cat(parts, dim=1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if not self.variant.flip:
            return l2n(self.describe_images(images))
        # Two passes of B images: measurably faster on CPU than one pass of 2B (cache-bound convolutions).
        original, flipped = self.describe_images(images), self.describe_images(images.flip(-1))
        return l2n(torch.cat([original, flipped], dim=1))

    def localize(self, images: torch.Tensor) -> torch.Tensor:
        """The largest-component masks (B, 1, h, w) of the last layer: where SCDA looks."""
        last = self.backbone.forward_taps(images, [self.last_layer])[self.last_layer]
        return scda_masks(last)[0]


def _factory(variant: str):
    def build(context: MethodContext) -> RetrievalMethod:
        return SCDA(context.create_backbone(), variant)
    return build


for _variant in VARIANTS:
    register_method(_variant)(_factory(_variant))
