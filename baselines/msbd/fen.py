"""FEN, the feature extracting network: global max pooling of three conv layers, each L2-normalised,
concatenated and L2-normalised again.

The paper takes VGG-16 conv5_1, conv5_3 and pool5 (with an L2-normalisation layer before the pooling, which
the per-layer normalisation here stands in for: it keeps a wide layer from drowning the others).
"""
from __future__ import annotations

import torch
from torch import nn

from msretrieval.models.backbones import FEATURES, Backbone
from msretrieval.models.pooling import l2n
from msretrieval.utils.errors import UserError

# Three taps per backbone family. VGG: the paper's layers (first and last conv of the last stage, and the
# final pooled map). ResNet: the last three stages (layer4 is also `features`). EfficientNet: the same roles
# as VGG's - blocks5_expand is the ReLU6 expansion opening the last stride-32 stage, still at stride 16 like
# conv5_1; blocks6 is the last block's output (stride 32, like conv5_3); `features` is the 1x1 head conv
# after ReLU6, the final map (like pool5). Block outputs are linear (signed); max pooling copes with that.
FEN_TAPS = {
    "vgg16": ("conv5_1", "conv5_3", "pool5"),
    "vgg19": ("conv5_1", "conv5_4", "pool5"),
    "resnet": ("layer2", "layer3", "layer4"),
    "efficientnet": ("blocks5_expand", "blocks6", FEATURES),
}


def fen_taps(backbone_name: str) -> tuple[str, str, str]:
    arch = backbone_name.split(".")[0]
    if arch.startswith("vgg16"):
        return FEN_TAPS["vgg16"]
    if arch.startswith("vgg19"):
        return FEN_TAPS["vgg19"]
    if arch.startswith(("resnet", "resnext", "wide_resnet", "seresnet")):
        return FEN_TAPS["resnet"]
    if "efficientnet" in arch or arch.startswith("mobilenet"):
        return FEN_TAPS["efficientnet"]
    raise UserError(f"no FEN layers known for backbone {backbone_name!r}; known families: {', '.join(FEN_TAPS)}")


class FEN(nn.Module):
    """(B, 3, H, W) normalised images -> (B, dim) L2-normalised multi-layer max-pooled descriptors."""

    def __init__(self, backbone: Backbone, taps: tuple[str, ...] | None = None):
        super().__init__()
        self.backbone = backbone
        self.taps = tuple(taps or fen_taps(backbone.name))

    @property
    def dim(self) -> int:
        return sum(self.backbone.channels(tap) for tap in self.taps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone.forward_taps(images, self.taps)
        return l2n(torch.cat([l2n(maps[tap].amax(dim=(2, 3))) for tap in self.taps], dim=1))

    def batched(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """FEN of many same-sized images (patches) in bounded batches."""
        if len(images) == 0:
            return torch.zeros(0, self.dim)
        return torch.cat([self(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
