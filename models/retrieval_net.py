"""Retrieval networks: a backbone plus a global head, built by name and described by a plain config.

``create_model("msnetvlad", backbone="tf_efficientnet_lite0", pretrained=True)`` mirrors timm's factory.
``model.config()`` holds everything needed to rebuild the network (architecture, backbone, head settings,
preprocessing), so a checkpoint describes itself: ``load_model(path)`` needs no training flags.

Heads (all end in an L2-normalised descriptor):
- ``gem``: GeM pooling (learnable p, cirtorch's default).
- ``netvlad``: every position of the last conv map is a local descriptor -> NetVLAD (K clusters).
- ``msnetvlad``: the multi-scale pooled NetVLAD of Vaccaro et al. (ICMR 2020): the raw (post-activation)
  last conv map is max-pooled with 2x2 and 3x3 windows at stride 1, every position of both pooled maps is a
  column -> NetVLAD -> intra-normalisation -> L2. No reduction happens before aggregation.
- ``out_dim`` (any head): a linear map after aggregation, initialised as PCA (``whiten``: PCA-whitening) of
  the training descriptors and then trained with the network; null keeps the aggregated descriptor.

Columns must outnumber clusters or some centroids see nothing: a w x h map gives (w-1)(h-1) + (w-2)(h-2)
columns (160 px crops of EfficientNet-Lite0: 5 x 5 -> 25; a 224 x 299 test image: 7 x 9 -> 83), so the main
job uses K = 8, not the paper's K = 64 (designed for 512+ px inputs).
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import FEATURES, Backbone, Preprocessing, create_backbone
from .netvlad import NetVLAD, multiscale_columns, single_scale_columns
from .pooling import GeM

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "msretrieval-model-v2"


class Projection(nn.Module):
    """Linear map to ``out_dim`` after aggregation, initialised by PCA of training descriptors, then L2."""

    def __init__(self, in_dim: int, out_dim: int, whiten: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.whiten = whiten

    @torch.no_grad()
    def init_pca(self, descriptors: torch.Tensor, eps: float = 1e-6) -> None:
        """Principal axes (scaled by 1/sqrt(variance) when whitening) of ``descriptors`` (N, in_dim).

        A PCA to k dimensions from fewer than 2k descriptors is badly posed (the trailing axes are noise,
        and whitening blows them up), so that is an error naming what to raise."""
        k = self.linear.out_features
        if len(descriptors) < 2 * k:
            raise ValueError(f"PCA to {k} dimensions needs at least {2 * k} training descriptors, got "
                             f"{len(descriptors)}: raise model.init_images or lower model.head.out_dim")
        x = descriptors.double()
        mean = x.mean(0)
        _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
        weight = vt[:k]
        if self.whiten:
            weight = weight / (s[:k] / np.sqrt(len(x) - 1)).clamp(min=eps).unsqueeze(1)
        self.linear.weight.copy_(weight.float())
        self.linear.bias.copy_((-weight @ mean).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=-1)


class Head(nn.Module):
    """Aggregation (``aggregate``: feature map -> L2-normalised vector) plus the optional projection."""

    def __init__(self, aggregated_dim: int, out_dim: int | None, whiten: bool):
        super().__init__()
        self.projection = Projection(aggregated_dim, out_dim, whiten) if out_dim else None
        self.out_dim = out_dim or aggregated_dim

    def aggregate(self, fmap: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def initialise_aggregation(self, fmaps: list[torch.Tensor]) -> None:
        """Data-dependent set-up of the aggregation (NetVLAD: k-means centroids); default: none."""

    @torch.no_grad()
    def initialise(self, fmaps: list[torch.Tensor]) -> None:
        """Set up the head from feature maps of training images (a list of (B, C, H, W)): the aggregation
        first, then the projection's PCA on the aggregated descriptors."""
        self.initialise_aggregation(fmaps)
        if self.projection is not None:
            self.projection.init_pca(torch.cat([self.aggregate(fmap) for fmap in fmaps]))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.aggregate(fmap)
        return self.projection(x) if self.projection is not None else x


class GeMHead(Head):
    def __init__(self, in_channels: int, p: float = 3.0, out_dim: int | None = None, whiten: bool = False):
        super().__init__(in_channels, out_dim, whiten)
        self.pool = GeM(p=p)

    def aggregate(self, fmap: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pool(fmap.float()), dim=-1)


class NetVLADHead(Head):
    def __init__(self, in_channels: int, num_clusters: int = 8, multiscale: bool = True,
                 out_dim: int | None = None, whiten: bool = False):
        self.multiscale = multiscale
        vlad = NetVLAD(in_channels, num_clusters)
        super().__init__(vlad.out_dim, out_dim, whiten)
        self.vlad = vlad

    def local_descriptors(self, fmap: torch.Tensor) -> torch.Tensor:
        fmap = fmap.float()  # aggregation in float32 under autocast: softmax and sums of many columns
        return multiscale_columns(fmap) if self.multiscale else single_scale_columns(fmap)

    def aggregate(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.vlad(self.local_descriptors(fmap))

    def initialise_aggregation(self, fmaps: list[torch.Tensor]) -> None:
        columns = [self.local_descriptors(fmap) for fmap in fmaps]
        fewest = min(c.shape[1] for c in columns)
        if fewest < self.vlad.num_clusters:
            log.warning("NetVLAD: %d clusters but only %d columns per image at this input size; some clusters "
                        "see no descriptor (use fewer clusters or larger inputs)", self.vlad.num_clusters, fewest)
        self.vlad.init_from_descriptors(torch.cat([c.reshape(-1, c.shape[-1]) for c in columns]).cpu())


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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_map(images))


#: architecture -> (head factory, the options it takes)
_HEADS: dict[str, tuple[Callable[..., Head], tuple[str, ...]]] = {
    "gem": (lambda c, **kw: GeMHead(c, **kw), ("p", "out_dim", "whiten")),
    "netvlad": (lambda c, **kw: NetVLADHead(c, multiscale=False, **kw), ("num_clusters", "out_dim", "whiten")),
    "msnetvlad": (lambda c, **kw: NetVLADHead(c, multiscale=True, **kw), ("num_clusters", "out_dim", "whiten")),
}
HEAD_OPTIONS = ("p", "num_clusters", "out_dim", "whiten")


def available_models() -> list[str]:
    return sorted(_HEADS)


def create_model(architecture: str, backbone: str = "tf_efficientnet_lite0", pretrained: bool = False,
                 weights: str | None = None, tap: str = FEATURES, **head_options) -> RetrievalNet:
    """Backbone + head. Head options that another architecture takes (e.g. ``p`` for ``msnetvlad``) are
    ignored, so one config can switch architectures; options no head takes are an error."""
    if architecture not in _HEADS:
        raise ValueError(f"unknown architecture {architecture!r}; available: {', '.join(available_models())}")
    unknown = set(head_options) - set(HEAD_OPTIONS)
    if unknown:
        raise ValueError(f"unknown head option(s) {sorted(unknown)}; known: {HEAD_OPTIONS}")
    factory, accepted = _HEADS[architecture]
    used = {k: v for k, v in head_options.items() if k in accepted and v is not None}
    trunk = create_backbone(backbone, pretrained=pretrained, weights=weights)
    head = factory(trunk.channels(tap), **used)
    config = {"architecture": architecture, "backbone": backbone, "tap": tap, "head": used}
    return RetrievalNet(trunk, head, config, tap=tap)


def save_model(model: RetrievalNet, path: str | Path, extra: dict | None = None) -> None:
    """A self-describing checkpoint: the config to rebuild the network plus its weights."""
    torch.save({"format": CHECKPOINT_FORMAT, "config": model.config(), "state_dict": model.state_dict(),
                **(extra or {})}, path)


def model_from_config(config: dict) -> RetrievalNet:
    return create_model(config["architecture"], backbone=config["backbone"], pretrained=False,
                        tap=config.get("tap", FEATURES), **config.get("head", {}))


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects other than tensors and plain values: it is refused unread."""


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    """``torch.load(weights_only=True)``: tensors and plain Python values only, so a file that would run code
    when unpickled is refused before anything in it executes."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsafeCheckpointError(f"refusing {path}: it is not a plain-tensor checkpoint ({reason})") from None


def read_model_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    """:func:`read_checkpoint`, checked to be this repository's self-describing format."""
    checkpoint = read_checkpoint(path, map_location)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return checkpoint


def load_model(path: str | Path, map_location: str = "cpu") -> RetrievalNet:
    checkpoint = read_model_checkpoint(path, map_location)
    model = model_from_config(checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    # Preprocessing travels with the checkpoint (it may differ from the architecture's default).
    model.backbone.preprocessing = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in checkpoint["config"]["preprocessing"].items()})
    return model.eval()
