"""Retrieval networks: a backbone plus a global head, built by name and described by a plain config.

``create_model("msnetvlad", backbone="tf_efficientnet_lite0", pretrained=True)`` mirrors timm's factory.
``model.config()`` holds everything needed to rebuild the network (architecture, backbone, head settings,
preprocessing), so a checkpoint describes itself: ``load_model(path)`` needs no training flags.

Heads:
- ``gem``: GeM pooling (learnable p) -> optional projection -> L2.
- ``netvlad``: 1x1 reduction -> every position as a local descriptor -> NetVLAD -> optional projection -> L2.
- ``msnetvlad``: the same with the multi-scale columns (2x2 and 3x3 stride-1 max-pooling) of the ICMR 2020 paper.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import FEATURES, Backbone, Preprocessing, create_backbone
from .netvlad import NetVLAD, multiscale_columns, single_scale_columns
from .pooling import GeM

CHECKPOINT_FORMAT = "msretrieval-model-v1"


class Projection(nn.Module):
    """Linear map to ``out_dim`` (initialised as PCA-whitening of training descriptors) followed by L2."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    @torch.no_grad()
    def init_pca_whitening(self, descriptors: torch.Tensor, eps: float = 1e-6) -> None:
        x = descriptors.double()
        mean = x.mean(0)
        # Thin SVD of the centred data: right singular vectors are the principal axes.
        _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
        k = self.linear.out_features
        if vt.shape[0] < k:
            raise ValueError(f"PCA to {k} dims needs at least {k} training descriptors, got {vt.shape[0]}")
        scale = (s[:k] / np.sqrt(max(len(x) - 1, 1))).clamp(min=eps)
        weight = vt[:k] / scale.unsqueeze(1)
        self.linear.weight.copy_(weight.float())
        self.linear.bias.copy_((-weight @ mean).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=-1)


class GeMHead(nn.Module):
    def __init__(self, in_channels: int, p: float = 3.0, out_dim: int | None = None):
        super().__init__()
        self.pool = GeM(p=p)
        self.projection = Projection(in_channels, out_dim) if out_dim else None
        self.out_dim = out_dim or in_channels

    def pre_projection(self, fmap: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pool(fmap), dim=-1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.pre_projection(fmap)
        return self.projection(x) if self.projection is not None else x


class NetVLADHead(nn.Module):
    def __init__(self, in_channels: int, num_clusters: int = 64, local_dim: int | None = 128,
                 out_dim: int | None = None, multiscale: bool = True):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, local_dim, 1) if local_dim else None
        self.multiscale = multiscale
        self.vlad = NetVLAD(local_dim or in_channels, num_clusters)
        self.projection = Projection(self.vlad.out_dim, out_dim) if out_dim else None
        self.out_dim = out_dim or self.vlad.out_dim

    def local_descriptors(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.reduce is not None:
            fmap = self.reduce(fmap)
        return multiscale_columns(fmap) if self.multiscale else single_scale_columns(fmap)

    @torch.no_grad()
    def init_reduction_pca(self, fmap_columns: torch.Tensor) -> None:
        """Initialise the 1x1 reduction as PCA of backbone columns (M, C), so it starts informative."""
        if self.reduce is None:
            return
        x = fmap_columns.double()
        mean = x.mean(0)
        _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
        weight = vt[: self.reduce.out_channels]
        self.reduce.weight.copy_(weight.float()[:, :, None, None])
        self.reduce.bias.copy_((-weight @ mean).float())

    def pre_projection(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.vlad(self.local_descriptors(fmap))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.pre_projection(fmap)
        return self.projection(x) if self.projection is not None else x


class RetrievalNet(nn.Module):
    """Backbone + head; ``forward(images) -> (B, D)`` L2-normalised global descriptors."""

    def __init__(self, backbone: Backbone, head: nn.Module, config: dict, tap: str = FEATURES):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tap = tap
        self._config = config

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing

    @property
    def out_dim(self) -> int:
        return self.head.out_dim

    def config(self) -> dict:
        return {**self._config, "preprocessing": self.preprocessing.to_dict(), "out_dim": self.out_dim}

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        if self.tap == FEATURES:
            return self.backbone.forward_features(images)
        return self.backbone.forward_taps(images, [self.tap])[self.tap]

    def forward(self, images: torch.Tensor, from_stage: int = 0) -> torch.Tensor:
        """Descriptors of images, or (``from_stage`` > 0) of the output of backbone stage ``from_stage - 1``
        (see ``Backbone.stages``; ``len(stages)`` means finished feature maps: the head alone)."""
        if from_stage == 0:
            return self.head(self.feature_map(images))
        if self.tap != FEATURES:
            raise ValueError("from_stage needs a model on the backbone's last feature map")
        return self.head(self.backbone.forward_stages(images, start=from_stage))


_HEADS: dict[str, Callable[..., nn.Module]] = {
    "gem": lambda c, **kw: GeMHead(c, p=kw.get("p", 3.0), out_dim=kw.get("out_dim")),
    "netvlad": lambda c, **kw: NetVLADHead(c, kw.get("num_clusters", 64), kw.get("local_dim", 128),
                                           kw.get("out_dim"), multiscale=False),
    "msnetvlad": lambda c, **kw: NetVLADHead(c, kw.get("num_clusters", 64), kw.get("local_dim", 128),
                                             kw.get("out_dim"), multiscale=True),
}
HEAD_OPTIONS = ("p", "num_clusters", "local_dim", "out_dim")


def available_models() -> list[str]:
    return sorted(_HEADS)


def create_model(architecture: str, backbone: str = "tf_efficientnet_lite0", pretrained: bool = False,
                 weights: str | None = None, tap: str = FEATURES, **head_options) -> RetrievalNet:
    if architecture not in _HEADS:
        raise ValueError(f"unknown architecture {architecture!r}; available: {', '.join(available_models())}")
    unknown = set(head_options) - set(HEAD_OPTIONS)
    if unknown:
        raise ValueError(f"unknown head option(s) {sorted(unknown)} for {architecture}; known: {HEAD_OPTIONS}")
    trunk = create_backbone(backbone, pretrained=pretrained, weights=weights)
    head = _HEADS[architecture](trunk.channels(tap), **head_options)
    config = {"architecture": architecture, "backbone": backbone, "tap": tap,
              "head": {k: v for k, v in head_options.items() if v is not None}}
    return RetrievalNet(trunk, head, config, tap=tap)


def save_model(model: RetrievalNet, path: str | Path, extra: dict | None = None) -> None:
    """A self-describing checkpoint: the config to rebuild the network plus its weights."""
    torch.save({"format": CHECKPOINT_FORMAT, "config": model.config(), "state_dict": model.state_dict(),
                **(extra or {})}, path)


def model_from_config(config: dict) -> RetrievalNet:
    return create_model(config["architecture"], backbone=config["backbone"], pretrained=False,
                        tap=config.get("tap", FEATURES), **config.get("head", {}))


def load_model(path: str | Path, map_location: str = "cpu") -> RetrievalNet:
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    model = model_from_config(checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    # Preprocessing travels with the checkpoint (it may differ from the architecture's default).
    model.backbone.preprocessing = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in checkpoint["config"]["preprocessing"].items()})
    return model.eval()
