"""DELF-style dense local descriptors from a backbone feature map.

Every spatial position of a feature map (one tap of a :class:`~models.backbones.Backbone`) is a local
descriptor. DELF (Noh et al., ICCV 2017) ranks them by a learned attention score; we have no attention
network, so the **score is the L2 norm of the feature vector** at that position (the raw activation energy,
the usual training-free stand-in: strongly activated positions are the ones a pooled descriptor is made of).
Each image keeps its ``max_features`` best-scoring positions, over all ``scales`` together
(``per_scale=False``, the default), or ``max_features`` at *each* scale (``per_scale=True``: the match-kernel
methods' choice, so that every extra scale adds up to ``max_features`` features to an image as every detected
region's crop does for R-ASMK); ties are broken by scale order, then raster order (deterministic).

Positions are the centres of the feature-map cells in normalised image coordinates: ``cx = (j + 0.5) / w``,
``cy = (i + 0.5) / h`` for row ``i``, column ``j`` of an ``h x w`` map, both in [0, 1] whatever the scale
(DELF uses the receptive-field centre in pixels; the cell centre ignores the network's padding, an error of
under half a cell).

Descriptors are post-processed as DELF does: L2 -> PCA to ``dims`` (fitted on training images' descriptors,
no whitening) -> L2, with :class:`models.pca.PCA` (same three steps). PCA is fitted under a fixed torch
seed (its randomised SVD would otherwise draw from the global generator) so a refit on the same data gives the
same basis - a cached codebook in that PCA space stays valid.

Default tap for EfficientNet/MobileNet backbones: ``blocks5_expand`` (stride 16, ReLU6 output, 672 channels
for Lite0) - DELF takes ResNet's stride-16 conv4 block for the same reason: the stride-32 last map has too few
positions (7 x 9 at 224 x 288 px against 14 x 18).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from msretrieval.models.pca import PCA
from msretrieval.models.backbones import FEATURES, Backbone
from msretrieval.models.pooling import l2n
from msretrieval.utils.errors import UserError


@dataclass
class LocalFeatures:
    """The local features of one image."""

    descriptors: np.ndarray  # (n, d) float32, L2-normalised rows
    positions: np.ndarray    # (n, 2) float32: (cx, cy) in [0, 1] of the image
    scores: np.ndarray       # (n,) float32, descending
    scales: np.ndarray       # (n,) float32: the image scale each feature came from

    def __len__(self) -> int:
        return len(self.descriptors)


def grid_positions(height: int, width: int) -> torch.Tensor:
    """(height * width, 2) cell centres (cx, cy) in [0, 1], in raster order (row by row)."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)


def dense_features(fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C, h, w) map -> descriptors (B, h*w, C), scores (B, h*w) = L2 norms, positions (h*w, 2); raster order."""
    if fmap.ndim != 4:
        raise ValueError(f"expected a (B, C, h, w) feature map, got shape {tuple(fmap.shape)}")
    b, c, h, w = fmap.shape
    descriptors = fmap.float().reshape(b, c, h * w).transpose(1, 2)
    return descriptors, descriptors.norm(dim=2), grid_positions(h, w)


def top_by_score(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest of a 1-D tensor, best first, ties in ascending index (a stable sort)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def select_local_features(fmap: torch.Tensor, max_features: int) -> list[LocalFeatures]:
    """Top ``max_features`` positions of each image of a (B, C, h, w) map by feature norm (scale 1, no PCA;
    descriptors L2-normalised)."""
    return _select([(1.0, fmap)], max_features)


def _select(maps: Sequence[tuple[float, torch.Tensor]], max_features: int,
            per_scale: bool = False) -> list[LocalFeatures]:
    """Merge the positions of several scales' maps (same batch) and keep each image's best ``max_features``
    (``per_scale``: the best ``max_features`` of each scale, then all of them sorted by score)."""
    if max_features < 1:
        raise UserError(f"max_features must be at least 1, got {max_features}")
    parts = [(scale, *dense_features(fmap)) for scale, fmap in maps]
    batch = parts[0][1].shape[0]
    out = []
    for i in range(batch):
        if per_scale:  # each scale's best first, so the merged sort below keeps them all
            picks = [top_by_score(p[2][i], max_features) for p in parts]
            parts_i = [(p[0], p[1][i][k], p[2][i][k], p[3][k]) for p, k in zip(parts, picks)]
        else:
            parts_i = [(p[0], p[1][i], p[2][i], p[3]) for p in parts]
        descriptors = torch.cat([p[1] for p in parts_i])
        scores = torch.cat([p[2] for p in parts_i])
        positions = torch.cat([p[3] for p in parts_i])
        scales = torch.cat([torch.full((len(p[3]),), p[0], dtype=torch.float32) for p in parts_i])
        keep = top_by_score(scores, len(scores) if per_scale else max_features)
        out.append(LocalFeatures(l2n(descriptors[keep]).numpy().astype(np.float32, copy=False),
                                 positions[keep].numpy(), scores[keep].numpy().astype(np.float32, copy=False),
                                 scales[keep].numpy()))
    return out


class LocalFeatureExtractor:
    """Local descriptors of a batch of equally sized images: one forward pass per scale.

    ``dims=None`` skips PCA (descriptors are then the L2-normalised raw features). With ``dims`` set,
    :meth:`fit_pca` (or :meth:`fit`) must run before :meth:`__call__`.
    """

    def __init__(self, backbone: Backbone, tap: str | None = None, max_features: int = 300,
                 scales: Sequence[float] = (1.0,), dims: int | None = 128, pca_seed: int = 0,
                 per_scale: bool = False):
        if tap is None:
            tap = "blocks5_expand" if "blocks5_expand" in backbone.taps else FEATURES
        if not scales or any(s <= 0 for s in scales):
            raise UserError(f"scales must be positive, got {scales}")
        self.backbone = backbone
        self.tap = tap
        self.max_features = int(max_features)
        self.scales = tuple(float(s) for s in scales)
        self.dims = dims
        self.pca_seed = pca_seed
        self.per_scale = bool(per_scale)
        self.pca: PCA | None = None

    def features_per_image(self, scales: Sequence[float] | None = None) -> int:
        """The most features an image can have (at the extractor's scales, or at ``scales``)."""
        return self.max_features * (len(self.scales if scales is None else scales) if self.per_scale else 1)

    def config(self) -> dict:
        """Everything that changes the descriptors (key caches with it, plus what the PCA was fitted on)."""
        # "backbone_mode": the features (and the PCA and codebook fitted on them) come from the backbone in eval
        # mode; caches made before that was enforced have no such key, so they are never reused
        # "max_features_per": only for per-scale selection over several scales, the one case that selects other
        # features than the original rule (so every earlier configuration keeps its cache key)
        per = {"max_features_per": "scale"} if self.per_scale and len(self.scales) > 1 else {}
        return {"backbone": self.backbone.describe(), "tap": self.tap, "max_features": self.max_features,
                "scales": list(self.scales), "score": "l2norm", "dims": self.dims, "pca_seed": self.pca_seed,
                "backbone_mode": "eval", **per}

    @torch.no_grad()
    def raw(self, images: torch.Tensor, scales: Sequence[float] | None = None) -> list[LocalFeatures]:
        """Selected features before PCA (L2-normalised full-width descriptors) of (B, 3, H, W) images, at the
        extractor's scales or at ``scales`` (e.g. the database side of an asymmetric method).

        The backbone runs in eval mode (it is set so): in training mode its BatchNorm layers would normalise
        with each batch's statistics and overwrite the running ones that every later pass uses."""
        self.backbone.eval()
        maps = []
        for scale in self.scales if scales is None else scales:
            x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                          align_corners=False, antialias=scale < 1.0)
            maps.append((scale, self.backbone.forward_taps(x, [self.tap])[self.tap]))
        return _select(maps, self.max_features, self.per_scale)

    def fit_pca(self, descriptors) -> None:
        """Fit the PCA on raw training descriptors (N, C) (the rows of :meth:`raw` outputs)."""
        if self.dims is None:
            return
        x = torch.as_tensor(np.asarray(descriptors, dtype=np.float32))
        if len(x) <= self.dims:  # PCA would keep fewer dimensions, and every later consumer expects ``dims``
            raise UserError(f"the local-feature PCA to {self.dims} dimensions needs more than {self.dims} training "
                            f"descriptors, got {len(x)}: fit on more images (--fit-images) or more features per "
                            f"image (--max-features)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.pca_seed)
            self.pca = PCA.fit(x, self.dims, name=f"local features {self.tap}")

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor], max_descriptors: int | None = None) -> np.ndarray:
        """Fit the PCA on the features of training image batches; returns the reduced training descriptors
        (e.g. to fit a codebook on). ``max_descriptors`` caps what is kept (the first ones, in batch order)."""
        collected, total = [], 0
        for images in batches:
            for features in self.raw(images):
                collected.append(features.descriptors)
                total += len(features)
            if max_descriptors is not None and total >= max_descriptors:
                break
        raw = np.concatenate(collected)[:max_descriptors]
        self.fit_pca(raw)
        return self.reduce_descriptors(raw)

    def reduce_descriptors(self, descriptors: np.ndarray) -> np.ndarray:
        """L2 -> PCA -> L2 of raw descriptors (identity-with-L2 when ``dims`` is None)."""
        x = torch.as_tensor(np.asarray(descriptors, dtype=np.float32))
        if self.dims is None:
            return l2n(x).numpy()
        if self.pca is None:
            raise RuntimeError("the local-feature PCA is not fitted: call fit() or fit_pca() first")
        return self.pca(x).numpy().astype(np.float32, copy=False)

    def __call__(self, images: torch.Tensor, scales: Sequence[float] | None = None) -> list[LocalFeatures]:
        """Final local features of (B, 3, H, W) equally sized images: one :class:`LocalFeatures` per image
        (``scales``: as in :meth:`raw`)."""
        out = []
        for features in self.raw(images, scales):
            features.descriptors = self.reduce_descriptors(features.descriptors)
            out.append(features)
        return out

    def pca_state(self) -> dict[str, np.ndarray]:
        if self.pca is None:
            return {}
        return {"mean": self.pca.mean.numpy(), "basis": self.pca.basis.numpy()}

    def load_pca_state(self, state: dict[str, np.ndarray]) -> None:
        self.pca = PCA(torch.as_tensor(state["mean"]), torch.as_tensor(state["basis"]))
