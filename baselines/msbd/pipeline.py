"""The MSBD float descriptor (MSBD-float): global, object and salient branches, fused.

- global: FEN of the image at scales {1.25, 1, 0.75}, averaged, L2 (Eq. 1);
- object: object proposals over the scales -> top patches (``roi_align`` crops resized to a square) ->
  FEN -> PCA to ``patch_dim`` -> soft-assignment VLAD with intra-normalisation (Eq. 2-3);
- salient: saliency map x image -> FEN (Eq. 4);
- each branch L2 -> PCA to D1 -> L2, concatenated (Eq. 5), divided by sqrt(3) so the result is unit-norm.

A pipeline is fitted once on the training split (PCAs, codebook, class-probability head, optional FEN
fine-tuning) and shared by every MSBD method built from one MethodContext, which also share its
descriptors: results are memoised by image content, so ``msbd@64``, ``msbd@256``, ``msbd_h``, ``itq``...
evaluated one after the other extract the expensive branches once.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import roi_align
from tqdm.auto import tqdm

from msretrieval.data.datasets import ImageDataset
from msretrieval.data.samplers import spread_over_classes
from msretrieval.models.backbones import Backbone, Preprocessing
from msretrieval.models.hashing import SignCodes, learn_itq
from msretrieval.models.pca import PCA
from msretrieval.models.pooling import l2n
from msretrieval.retrieval.descriptors.extract import SizeBucketBatchSampler, output_sizes

from .binary import learn_msbd
from .classifier import SoftmaxClassifier
from .fen import FEN
from .finetune import finetune_fen
from .opencv import opencv
from .proposals import create_proposer, multi_scale_boxes
from .saliency import create_saliency
from .settings import MSBDSettings
from .vlad import Codebook, soft_vlad

log = logging.getLogger(__name__)

BRANCHES = ("global", "object", "salient")
#: binary learning variants: "msbd" (sparse, Algorithm 1), "msbd_s" (no sparsity), "itq"
LEARNERS = ("msbd", "msbd_s", "itq")


class BranchTimer:
    """Seconds and image counts per branch (and per step inside the object branch)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.images: dict[str, int] = defaultdict(int)

    def add(self, name: str, seconds: float, images: int) -> None:
        self.seconds[name] += seconds
        self.images[name] += images

    def summary(self) -> str:
        return ", ".join(f"{name} {self.images[name] / max(s, 1e-9):.1f} img/s ({s:.1f} s)"
                         for name, s in self.seconds.items())


class MSBDPipeline(nn.Module):
    def __init__(self, backbone: Backbone, settings: MSBDSettings | None = None):
        super().__init__()
        self.settings = settings or MSBDSettings()
        self.fen = FEN(backbone)
        name, options = self.settings.proposer
        self.proposer = create_proposer(name, **options)
        self.saliency = create_saliency(self.settings.saliency)
        self.timer = BranchTimer()
        self.patch_pca: PCA | None = None
        self.codebook: Codebook | None = None
        self.branch_pca: dict[str, PCA] = {}
        self.classifier: SoftmaxClassifier | None = None
        self.train_float: np.ndarray | None = None
        self._fit_key: str | None = None
        self._memo: dict[bytes, tuple[np.ndarray, np.ndarray | None]] = {}
        self._binary: dict[tuple, SignCodes] = {}

    @property
    def backbone(self) -> Backbone:
        return self.fen.backbone

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing

    def config(self) -> dict:
        return {"backbone": self.backbone.describe(), "fen_taps": list(self.fen.taps), **self.settings.to_dict()}

    # ---- raw branch features -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the network is: images are described there, fitted state (PCA, codebook) stays on the CPU."""
        return next(self.fen.parameters()).device

    def _stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.preprocessing
        return (torch.tensor(pre.mean, device=images.device).view(1, 3, 1, 1),
                torch.tensor(pre.std, device=images.device).view(1, 3, 1, 1))

    def _pixels01(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(images)
        return images * std + mean

    def _normalise(self, pixels01: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(pixels01)
        return (pixels01 - mean) / std

    def _rgb(self, images: torch.Tensor) -> list[np.ndarray]:
        """The batch as uint8 RGB arrays (H, W, 3), what OpenCV's detectors take."""
        pixels = (self._pixels01(images).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return [np.ascontiguousarray(p.permute(1, 2, 0).numpy()) for p in pixels]

    def global_features(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 1: FEN averaged over the scales, L2."""
        total = 0
        for scale in self.settings.scales:
            scaled = images if scale == 1 else F.interpolate(
                images, size=[max(32, round(s * scale)) for s in images.shape[-2:]], mode="bilinear",
                align_corners=False, antialias=scale < 1)
            total = total + self.fen(scaled)
        return l2n(total / len(self.settings.scales))

    def patch_features(self, images: torch.Tensor, rgbs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 3: FEN of the top proposals of each image -> (patches (n, dim), owner image index (n,))."""
        s = self.settings
        start = time.perf_counter()
        boxes = [torch.from_numpy(multi_scale_boxes(rgb, self.proposer, s.proposal_side, s.proposal_scales,
                                                    s.patches, s.min_box_area)).float().to(images.device)
                 for rgb in rgbs]
        self.timer.add("object:proposals", time.perf_counter() - start, len(rgbs))
        crops = roi_align(images, boxes, output_size=(s.patch_size, s.patch_size), spatial_scale=1.0,
                          sampling_ratio=2, aligned=True)
        owners = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)])
        return self.fen.batched(crops), owners

    def salient_features(self, images: torch.Tensor, rgbs: list[np.ndarray]) -> torch.Tensor:
        """Eq. 4: FEN of saliency map x image (the map computed on a ``saliency_size`` square)."""
        size = self.settings.saliency_size
        height, width = images.shape[-2:]
        cv2 = opencv()
        maps = [cv2.resize(self.saliency(cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)),
                           (width, height), interpolation=cv2.INTER_LINEAR) for rgb in rgbs]
        masks = torch.from_numpy(np.stack(maps)).float()[:, None].to(images.device)
        return self.fen(self._normalise(masks * self._pixels01(images)))

    def raw_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Branch features before fusion: global (B, dim), patches (n, dim) + owners (n,), salient (B, dim);
        computed on the network's device, returned on the CPU."""
        images = images.to(self.device)
        timed = {}
        start = time.perf_counter()
        timed["global"] = self.global_features(images)
        self.timer.add("global", time.perf_counter() - start, len(images))
        start = time.perf_counter()
        rgbs = self._rgb(images)
        timed["patches"], timed["owners"] = self.patch_features(images, rgbs)
        self.timer.add("object", time.perf_counter() - start, len(images))
        start = time.perf_counter()
        timed["salient"] = self.salient_features(images, rgbs)
        self.timer.add("salient", time.perf_counter() - start, len(images))
        return {name: value.cpu() for name, value in timed.items()}

    # ---- fitting ---------------------------------------------------------------------------------------

    def _object_vlad(self, patches: torch.Tensor, owners: torch.Tensor, count: int) -> torch.Tensor:
        return soft_vlad(self.patch_pca(patches), owners, count, self.codebook.centroids,
                         self.settings.nearest_words, self.codebook.sigma2)

    def _fuse(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 5: each branch L2 -> PCA -> L2, concatenated; / sqrt(3) for a unit-norm descriptor."""
        return torch.cat([self.branch_pca[b](parts[b]) for b in BRANCHES], dim=1) / math.sqrt(len(BRANCHES))

    @staticmethod
    def _fit_subset(dataset: ImageDataset, labels, limit: int | None) -> tuple[ImageDataset, np.ndarray]:
        labels = np.asarray(labels)
        if limit is None or limit >= len(dataset):
            return dataset, labels
        keep = spread_over_classes(labels, limit)
        return ImageDataset([dataset.paths[i] for i in keep], dataset.transform), labels[keep]

    @torch.no_grad()
    def _train_features(self, dataset: ImageDataset) -> dict[str, torch.Tensor]:
        loader = DataLoader(dataset, batch_sampler=SizeBucketBatchSampler(output_sizes(dataset), 4), num_workers=1)
        dim = self.fen.dim
        glob, salient = torch.zeros(len(dataset), dim), torch.zeros(len(dataset), dim)
        patches, owners = [], []
        for images, indices in tqdm(loader, desc="msbd fit features", unit="batch", leave=False,
                                    disable=None):
            raw = self.raw_features(images)
            glob[indices], salient[indices] = raw["global"], raw["salient"]
            patches.append(raw["patches"].half())  # half precision: tens of thousands of wide patch vectors
            owners.append(indices[raw["owners"]])
        return {"global": glob, "salient": salient, "patches": torch.cat(patches).float(), "owners": torch.cat(owners)}

    def fit(self, dataset: ImageDataset, labels=None) -> None:
        """Fit on training images (once per training set): optional FEN fine-tuning, the patch PCA and
        codebook, the branch PCAs and the class-probability head (when labels are given)."""
        s = self.settings
        dataset, labels = self._fit_subset(dataset, labels if labels is not None else np.zeros(len(dataset)),
                                           s.fit_images)
        key = hashlib.sha1(repr((sorted(map(str, dataset.paths)), repr(dataset.transform))).encode()).hexdigest()
        if key == self._fit_key:
            return
        log.info("fitting MSBD on %d training images", len(dataset))
        torch.manual_seed(s.seed)  # randomised PCA: the same fit in every process (descriptor caches mix them)
        self._memo.clear()
        self._binary.clear()
        if s.finetune_steps > 0:
            finetune_fen(self.fen, dataset, labels, s.finetune_steps, s.finetune_lr, s.finetune_batch, s.seed)
        self.eval()
        raw = self._train_features(dataset)
        log.info("MSBD branch timing: %s", self.timer.summary())
        self.patch_pca = PCA.fit(raw["patches"], s.patch_dim, "patches")
        reduced = self.patch_pca(raw["patches"])
        words = min(s.codebook, len(reduced))
        if words < s.codebook:
            log.warning("only %d training patches: codebook reduced to %d words", len(reduced), words)
        self.codebook = Codebook.fit(reduced.numpy(), words, seed=s.seed)
        parts = {"global": raw["global"], "salient": raw["salient"],
                 "object": self._object_vlad(raw["patches"], raw["owners"], len(dataset))}
        self.branch_pca = {b: PCA.fit(parts[b], s.branch_dims, b) for b in BRANCHES}
        self.train_float = self._fuse(parts).numpy()
        self.classifier = None
        if len(np.unique(labels)) > 1:
            self.classifier = SoftmaxClassifier.fit(raw["global"], labels, steps=s.classifier_steps, seed=s.seed)
        self._fit_key = key

    @property
    def fitted(self) -> bool:
        return self._fit_key is not None

    # ---- descriptors -----------------------------------------------------------------------------------

    @torch.no_grad()
    def describe(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, 3, H, W) -> (msbd_float (B, 3 * D1), class probabilities (B, C) or None), memoised by content."""
        if not self.fitted:
            raise RuntimeError("MSBD is not fitted: call fit() on training images first")
        keys = [hashlib.blake2b(image.numpy().tobytes() + repr(tuple(image.shape)).encode(), digest_size=16).digest()
                for image in images.cpu()]
        if not all(k in self._memo for k in keys):
            raw = self.raw_features(images)
            parts = {"global": raw["global"], "salient": raw["salient"],
                     "object": self._object_vlad(raw["patches"], raw["owners"], len(images))}
            fused = self._fuse(parts).numpy()
            probs = self.classifier.probabilities(raw["global"]).numpy() if self.classifier else None
            for i, k in enumerate(keys):
                self._memo[k] = (fused[i], None if probs is None else probs[i])
        floats = np.stack([self._memo[k][0] for k in keys])
        probs = None if self.classifier is None else np.stack([self._memo[k][1] for k in keys])
        return floats, probs

    def binary_model(self, learner: str, bits: int) -> SignCodes:
        """The binary projection learned on the training descriptors (once per learner and code length)."""
        if learner not in LEARNERS:
            raise ValueError(f"unknown binary learner {learner!r}; available: {', '.join(LEARNERS)}")
        if self.train_float is None:
            raise RuntimeError("MSBD is not fitted: call fit() on training images first")
        key = (learner, bits)
        if key not in self._binary:
            s = self.settings
            start = time.perf_counter()
            if learner == "itq":
                model = learn_itq(self.train_float, bits, s.itq_iterations, s.seed)
            else:
                model = learn_msbd(self.train_float, bits, density=s.density if learner == "msbd" else None,
                                   iterations=s.iterations, itq_iterations=s.itq_iterations, sparsify=s.sparsify,
                                   trials=s.trials, alpha=s.alpha, monotone=s.monotone, seed=s.seed)
            log.info("binary learning %s, %d bits: %.1f s, objective %.4g -> %.4g", learner, bits,
                     time.perf_counter() - start, model.objective[0], model.objective[-1])
            self._binary[key] = model
        return self._binary[key]
