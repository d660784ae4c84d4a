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
- ``hash_bits`` (any head): a deep-hashing layer last (``models.hashing.HashHead``: linear -> tanh(beta x)
  in training, sign in eval), initialised by ITQ on the training descriptors (training starts from the
  unsupervised ITQ codes). The network then outputs K-bit codes scaled by 1/sqrt(K): unit vectors once the
  codes are binary, so the triplet margin, the miners and inner-product ranking work unchanged
  (<b1, b2> / K = 1 - 2 Hamming / K); ``RetrievalNet.codes`` gives the bits to pack.

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

from msretrieval.utils.errors import UserError
from msretrieval.utils.files import atomic_write

from .backbones import FEATURES, Backbone, Preprocessing, create_backbone
from .hashing import HashHead
from .netvlad import NetVLAD, multiscale_columns, single_scale_columns
from .pca import principal_axes
from .pooling import GeM

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "msretrieval-model-v2"


@torch.no_grad()
def init_linear_pca(linear: nn.Linear, descriptors: torch.Tensor, whiten: bool, option: str,
                    eps: float = 1e-6) -> None:
    """``linear`` := the principal axes (scaled by 1/sqrt(variance) when whitening) of ``descriptors``.

    A PCA to k dimensions from fewer than 2k descriptors is badly posed (the trailing axes are noise, and
    whitening blows them up), so that is an error naming what to raise (``option`` sets k)."""
    k = linear.out_features
    if len(descriptors) < 2 * k:
        raise UserError(f"PCA to {k} dimensions needs at least {2 * k} training descriptors, got "
                         f"{len(descriptors)}: raise model.init_images or lower {option}")
    x = descriptors.double()
    if x.shape[1] < k:
        raise UserError(f"PCA to {k} dimensions of {x.shape[1]}-d descriptors: lower {option}")
    mean = x.mean(0)
    axes, s = principal_axes(x - mean, k, exact=True)
    weight = axes.T
    if whiten:
        weight = weight / (s[:k] / np.sqrt(len(x) - 1)).clamp(min=eps).unsqueeze(1)
    linear.weight.copy_(weight.float())
    linear.bias.copy_((-weight @ mean).float())


class Projection(nn.Module):
    """Linear map to ``out_dim`` after aggregation, initialised by PCA of training descriptors, then L2."""

    def __init__(self, in_dim: int, out_dim: int, whiten: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.whiten = whiten

    @torch.no_grad()
    def init_pca(self, descriptors: torch.Tensor) -> None:
        init_linear_pca(self.linear, descriptors, self.whiten, "model.head.out_dim")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=-1)


class Head(nn.Module):
    """Aggregation (``aggregate``: feature map -> L2-normalised vector), the optional projection and the
    optional hashing layer (codes scaled by 1/sqrt(bits))."""

    def __init__(self, aggregated_dim: int, out_dim: int | None, whiten: bool, hash_bits: int | None = None):
        super().__init__()
        self.projection = Projection(aggregated_dim, out_dim, whiten) if out_dim else None
        self.hash = HashHead(out_dim or aggregated_dim, hash_bits) if hash_bits else None
        self.out_dim = hash_bits or out_dim or aggregated_dim

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
        if self.hash is not None:
            self.initialise_hash(fmaps)

    @torch.no_grad()
    def initialise_hash(self, fmaps: list[torch.Tensor]) -> None:
        """The hashing layer as ITQ of the float descriptors (PCA + rotation: ITQ's codes to start from)."""
        self.hash.init_itq(torch.cat([self.descriptor(fmap) for fmap in fmaps]))

    def descriptor(self, fmap: torch.Tensor) -> torch.Tensor:
        """The float descriptor (before any hashing layer)."""
        x = self.aggregate(fmap)
        return self.projection(x) if self.projection is not None else x

    def forward(self, fmap: torch.Tensor, with_descriptor: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The output; ``with_descriptor``: (output, the float descriptor it was computed from)."""
        x = self.descriptor(fmap)
        out = x if self.hash is None else self.hash(x) * self.hash.bits ** -0.5  # unit length once the codes are +-1
        return (out, x) if with_descriptor else out


class GeMHead(Head):
    def __init__(self, in_channels: int, p: float = 3.0, out_dim: int | None = None, whiten: bool = False,
                 hash_bits: int | None = None):
        super().__init__(in_channels, out_dim, whiten, hash_bits)
        self.pool = GeM(p=p)

    def aggregate(self, fmap: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pool(fmap.float()), dim=-1)


class NetVLADHead(Head):
    def __init__(self, in_channels: int, num_clusters: int = 8, multiscale: bool = True,
                 out_dim: int | None = None, whiten: bool = False, hash_bits: int | None = None):
        self.multiscale = multiscale
        vlad = NetVLAD(in_channels, num_clusters)
        super().__init__(vlad.out_dim, out_dim, whiten, hash_bits)
        self.vlad = vlad

    def local_descriptors(self, fmap: torch.Tensor) -> torch.Tensor:
        fmap = fmap.float()
        return multiscale_columns(fmap) if self.multiscale else single_scale_columns(fmap)

    def aggregate(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.vlad(self.local_descriptors(fmap))  # NetVLAD aggregates in float32, autocast or not

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

    def add_hash_head(self, bits: int) -> None:
        """Give a float network a (not yet initialised) hashing layer: fine-tuning a float release into a
        hashing one. ``head.initialise_hash`` sets it up from training images."""
        if self.hash_bits is not None:
            raise ValueError(f"the network already hashes ({self.hash_bits} bits)")
        device = next(self.head.parameters(), torch.zeros(0)).device
        self.head.hash = HashHead(self.head.out_dim, bits).to(device)
        self.head.out_dim = bits
        self._config = {**self._config, "head": {**self._config["head"], "hash_bits": bits}}

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        if self.tap == FEATURES and not self.backbone.sharing_forward:  # the plain call (traced by exports)
            return self.backbone.forward_features(images)
        return self.backbone.forward_taps(images, [self.tap])[self.tap]

    @property
    def hash_bits(self) -> int | None:
        """Code length of a hashing network, None for a float one."""
        return self.head.hash.bits if getattr(self.head, "hash", None) is not None else None

    def forward(self, images: torch.Tensor, with_descriptor: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``with_descriptor``: (output, float descriptor), for a hashing network the descriptor before the
        hashing layer from the same pass (the distillation term's teacher). A keyword of ``forward``, not
        another method, so a DDP-wrapped network takes it too."""
        return self.head(self.feature_map(images), with_descriptor)

    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """(B, bits) booleans (True = +1) of a hashing network, for ``retrieval.search.binary.pack_bits``."""
        if self.hash_bits is None:
            raise ValueError("codes() needs a hashing network (model.head.hash_bits)")
        return self.head.hash.codes(self.head.descriptor(self.feature_map(images)))

    @torch.no_grad()
    def code_parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projection, floats) of a hashing network, from one forward pass: the hashing layer's linear output
        (float32; its entries >= 0 are :meth:`codes`), which asymmetric search scores against database codes,
        and the L2-normalised float descriptor the layer reads, which two-stage search re-ranks with."""
        if self.hash_bits is None:
            raise ValueError("code_parts() needs a hashing network (model.head.hash_bits)")
        floats = self.head.descriptor(self.feature_map(images)).float()
        return self.head.hash.linear(floats).float(), F.normalize(floats, dim=-1)


#: architecture -> (head factory, the options it takes)
_HEADS: dict[str, tuple[Callable[..., Head], tuple[str, ...]]] = {
    "gem": (lambda c, **kw: GeMHead(c, **kw), ("p", "out_dim", "whiten", "hash_bits")),
    "netvlad": (lambda c, **kw: NetVLADHead(c, multiscale=False, **kw),
                ("num_clusters", "out_dim", "whiten", "hash_bits")),
    "msnetvlad": (lambda c, **kw: NetVLADHead(c, multiscale=True, **kw),
                  ("num_clusters", "out_dim", "whiten", "hash_bits")),
}
HEAD_OPTIONS = ("p", "num_clusters", "out_dim", "whiten", "hash_bits")


def available_models() -> list[str]:
    return sorted(_HEADS)


def create_model(architecture: str, backbone: str = "tf_efficientnet_lite0", pretrained: bool = False,
                 weights: str | None = None, tap: str = FEATURES, **head_options) -> RetrievalNet:
    """Backbone + head. Head options that another architecture takes (e.g. ``p`` for ``msnetvlad``) are
    ignored, so one config can switch architectures; options no head takes are an error."""
    if architecture not in _HEADS:
        raise UserError(f"unknown architecture {architecture!r}; available: {', '.join(available_models())}")
    unknown = set(head_options) - set(HEAD_OPTIONS)
    if unknown:
        raise UserError(f"unknown head option(s) {sorted(unknown)}; known: {HEAD_OPTIONS}")
    factory, accepted = _HEADS[architecture]
    used = {k: v for k, v in head_options.items() if k in accepted and v is not None}
    trunk = create_backbone(backbone, pretrained=pretrained, weights=weights)
    head = factory(trunk.channels(tap), **used)
    config = {"architecture": architecture, "backbone": backbone, "tap": tap, "head": used}
    return RetrievalNet(trunk, head, config, tap=tap)


def save_model(model: RetrievalNet, path: str | Path, extra: dict | None = None) -> None:
    """A self-describing checkpoint: the config to rebuild the network plus its weights (written atomically)."""
    payload = {"format": CHECKPOINT_FORMAT, "config": model.config(), "state_dict": model.state_dict(), **(extra or {})}
    atomic_write(path, lambda handle: torch.save(payload, handle))


def model_from_config(config: dict) -> RetrievalNet:
    return create_model(config["architecture"], backbone=config["backbone"], pretrained=False,
                        tap=config.get("tap", FEATURES), **config.get("head", {}))


class UnsafeCheckpointError(UserError):
    """A checkpoint holds pickled objects other than tensors and plain values: it is refused unread."""


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    """``torch.load(weights_only=True)``: tensors and plain Python values only, so a file that would run code
    when unpickled is refused before anything in it executes."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsafeCheckpointError(f"refusing {path}: it is not a plain-tensor checkpoint ({reason})") from None
    except RuntimeError as error:  # torch refuses a TorchScript archive under weights_only rather than run it
        if "TorchScript" not in str(error):
            raise
        raise UnsafeCheckpointError(f"refusing {path}: it is not a plain-tensor checkpoint (a TorchScript "
                                    "archive, which would run code)") from None


def read_model_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    """:func:`read_checkpoint`, checked to be this repository's self-describing format."""
    checkpoint = read_checkpoint(path, map_location)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return checkpoint


def load_model(path: str | Path, map_location: str = "cpu") -> RetrievalNet:
    checkpoint = read_model_checkpoint(path, map_location)
    model = model_from_config(checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    # Preprocessing travels with the checkpoint (it may differ from the architecture's default).
    model.backbone.preprocessing = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in checkpoint["config"]["preprocessing"].items()})
    return model.eval()
