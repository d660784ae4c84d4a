"""Aggregated match kernels as harness methods: ``vlad``, ``asmk``, ``asmk_star`` and their regional versions
``r_vlad``, ``r_asmk_naive``, ``r_asmk``, ``r_asmk_star`` (Detect-to-Retrieve §4.3).

Pipeline: backbone tap -> DELF-style local features (top 300 by feature norm, L2 -> PCA 128 -> L2;
:mod:`retrieval.local_features`) -> nearest of C = 256 k-means words (:mod:`retrieval.codebook`, cached on
disk) -> the kernel's per-word aggregation (:mod:`retrieval.aggregation`). ``fit`` learns the PCA and the
codebook on the benchmark's training images, once for every kernel built from one :class:`MethodContext`.

The regional kernels aggregate the database image over its detected regions (the full image first; regions on
the database side only, as in the paper), each detected region described by the local features of its crop
(as DELF does); queries are aggregated whole. Descriptors are the padded rows of
:func:`retrieval.aggregation.to_rows`; ``descriptor_bytes`` counts an image's real words (2-byte word id +
float32 vector, or d bits for the starred kernels).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models.backbones import Preprocessing

from . import aggregation as agg
from .codebook import Codebook, fit_or_load_codebook
from .descriptor_cache import image_list_fingerprint
from .local_features import LocalFeatureExtractor
from .methods import MethodContext, RetrievalMethod, register_method, state_fingerprint
from .regional import RegionProposer, crop_region, proposer_from_context
from .scores import ScoreSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelSettings:
    words: int = 256             # 256 beat 1,024 on Flowers (about 265 features per image leave most words empty)
    dims: int = 128
    max_features: int = 300
    fit_images: int = 300        # training images whose local features fit the PCA and the codebook
    # regional kernels: a detected region's features come from its crop, resized to this shorter side (DELF
    # re-extracts each region: a small object gets as many features as a query); 0 = select the whole image's
    # features inside the box instead (no extra forward pass, but a small object keeps only a few of them)
    region_size: int = 224
    kmeans_iterations: int = 20
    seed: int = 0


#: name -> (whole-image kernel, regional kernel or None, selectivity)
KERNELS = {
    "vlad": ("vlad", None, agg.IDENTITY),
    "asmk": ("asmk", None, agg.ASMK_SELECTIVITY),
    "asmk_star": ("asmk_star", None, agg.ASMK_SELECTIVITY),
    "r_vlad": ("vlad", "rvlad", agg.IDENTITY),
    "r_asmk_naive": ("asmk", "naive_rasmk", agg.ASMK_SELECTIVITY),
    "r_asmk": ("asmk", "rasmk", agg.ASMK_SELECTIVITY),
    "r_asmk_star": ("asmk_star", "rasmk_star", agg.ASMK_SELECTIVITY),
}


class LocalVocabulary:
    """Local features + their PCA + the codebook: fitted once, shared by every kernel of a harness run."""

    def __init__(self, extractor: LocalFeatureExtractor, settings: KernelSettings, cache_dir: str | None):
        self.extractor, self.settings, self.cache_dir = extractor, settings, cache_dir
        self.codebook: Codebook | None = None
        self.fitted_on: str | None = None

    def config(self) -> dict:
        """The settings alone: what the vocabulary was fitted on is not here (it would change a kernel's cache
        key once another kernel has fitted the shared vocabulary); the harness keys on the training images."""
        return {"local_features": self.extractor.config(), "words": self.settings.words,
                "region_size": self.settings.region_size,
                "fit_images": self.settings.fit_images, "kmeans_iterations": self.settings.kmeans_iterations,
                "seed": self.settings.seed}

    @torch.no_grad()
    def fit(self, train_images) -> None:
        """PCA and codebook from the local features of (up to ``fit_images``) training images. The codebook
        cache is keyed by everything its input descriptors depend on: the local-feature settings, the chosen
        images (paths, sizes, modification times) and transform, and the whole fitted PCA (mean and basis: a
        refit at another thread count can flip basis vectors with a bit-identical mean)."""
        count = min(self.settings.fit_images, len(train_images))
        chosen = np.sort(np.random.default_rng(self.settings.seed).choice(len(train_images), count, replace=False))
        fingerprint = image_list_fingerprint([train_images.paths[i] for i in chosen])[:16]
        fitted_on = f"{count} images {fingerprint} {train_images.transform.describe()}"
        if self.fitted_on == fitted_on:
            return
        subset = torch.utils.data.Subset(train_images, chosen.tolist())
        batches = (images for images, _ in tqdm(DataLoader(subset, batch_size=1), desc="local features (fit)",
                                                 unit="img", leave=False, disable=None))
        descriptors = self.extractor.fit(batches)
        log.info("local-feature PCA fitted on %d descriptors of %d training images", len(descriptors), count)
        source = {"local_features": self.extractor.config(), "images": fitted_on,
                  "pca": state_fingerprint(self.extractor.pca_state())}
        self.codebook = fit_or_load_codebook(descriptors, self.settings.words, self.cache_dir, source,
                                             niter=self.settings.kmeans_iterations, seed=self.settings.seed)
        self.fitted_on = fitted_on

    def __call__(self, images: torch.Tensor):
        """Per image: (descriptors, positions, words) of its local features."""
        if self.codebook is None:
            raise RuntimeError("the local vocabulary is not fitted: call fit() on training images first")
        out = []
        for features in self.extractor(images):
            words, _ = self.codebook.assign(features.descriptors)
            out.append((features.descriptors, features.positions, words))
        return out


class MatchKernelMethod(RetrievalMethod):
    """One aggregated match kernel over a shared :class:`LocalVocabulary` (regional ones also over a
    :class:`RegionProposer`)."""

    def __init__(self, name: str, vocabulary: LocalVocabulary, proposer: RegionProposer | None = None,
                 word_budget: float = 0.0):
        if name not in KERNELS:
            raise ValueError(f"unknown kernel {name!r}; one of {', '.join(KERNELS)}")
        super().__init__(name)
        self.whole, self.regional, self.sigma = KERNELS[name]
        if self.regional is not None and proposer is None:
            raise ValueError(f"{name} aggregates detected regions: it needs a RegionProposer")
        if word_budget < 0:
            raise ValueError(f"word_budget must be >= 0 (0: no cap), got {word_budget}")
        self.word_budget = word_budget if self.regional in ("rasmk", "rasmk_star") else 0.0
        self.vocabulary, self.proposer = vocabulary, proposer
        self.asymmetric = self.regional is not None
        self.binary = name.endswith("_star")
        self.max_words = min(vocabulary.settings.words,
                             vocabulary.extractor.max_features * len(vocabulary.extractor.scales))
        self.backbone = vocabulary.extractor.backbone  # a submodule: extraction moves it to the device

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing

    def config(self) -> dict:
        regions = self.proposer.config() if self.proposer is not None else {}
        budget = {"word_budget": self.word_budget} if self.word_budget else {}  # absent: no cap
        return {"name": self.name, **self.vocabulary.config(), **regions, **budget}

    def needs_fit(self) -> bool:
        return True

    def fit(self, train_images, labels=None) -> None:
        self.vocabulary.fit(train_images)

    def fitted_objects(self) -> list:
        codebook = self.vocabulary.codebook
        return [*super().fitted_objects(), self.vocabulary.extractor.pca_state(),
                None if codebook is None else codebook.centroids]

    def _aggregate(self, kernel: str, descriptors, positions, words, boxes=None) -> agg.Aggregated:
        """``positions=None``: ``descriptors`` is one (descriptors, words) pair per region."""
        codebook = self.vocabulary.codebook
        if kernel == "vlad":
            return agg.vlad(descriptors, codebook, words=words)
        if kernel in ("asmk", "asmk_star"):
            return agg.asmk(descriptors, codebook, words=words, binary=kernel == "asmk_star")
        if kernel == "rvlad":
            return agg.rvlad(descriptors, positions, boxes, codebook, words=words)
        if kernel == "naive_rasmk":
            return agg.naive_rasmk(descriptors, positions, boxes, codebook, words=words)
        return agg.rasmk(descriptors, positions, boxes, codebook, words=words, binary=kernel == "rasmk_star",
                         word_budget=self.word_budget)

    def _rows(self, items: list[agg.Aggregated]) -> torch.Tensor:
        return torch.from_numpy(agg.to_rows(items, self.max_words, self.vocabulary.settings.dims, self.binary))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._rows([self._aggregate(self.whole, *features) for features in self.vocabulary(images)])

    @torch.no_grad()
    def encode_database(self, images: torch.Tensor) -> torch.Tensor:
        if self.regional is None:
            return self.encode(images)
        boxes = self.proposer(images, self.preprocessing)
        size = self.vocabulary.settings.region_size
        items = []
        for image, (descriptors, positions, words), image_boxes in zip(images, self.vocabulary(images), boxes):
            if size <= 0:
                items.append(self._aggregate(self.regional, descriptors, positions, words,
                                             boxes=[tuple(b) for b in image_boxes]))
                continue
            regions = [(descriptors, words)]  # the full image (box 0) as it is, then each detected crop
            for box in image_boxes[1:]:
                crop_descriptors, _, crop_words = self.vocabulary(crop_region(image, box, size)[None])[0]
                regions.append((crop_descriptors, crop_words))
            items.append(self._aggregate(self.regional, regions, None, None))
        return self._rows(items)

    def scores(self, queries: np.ndarray, database: np.ndarray) -> ScoreSource:
        dims, words = self.vocabulary.settings.dims, self.vocabulary.settings.words
        return agg.AggregatedScores(agg.from_rows(queries, dims),
                                    agg.AggregatedDatabase.build(agg.from_rows(database, dims), words), self.sigma)

    def descriptor_bytes(self, descriptors: np.ndarray) -> int:
        return int(round(float(agg.rows_descriptor_bytes(descriptors, self.vocabulary.settings.dims,
                                                          self.vocabulary.settings.words).mean())))


def shared_vocabulary(context: MethodContext, settings: KernelSettings = KernelSettings()) -> LocalVocabulary:
    key = ("local vocabulary", settings)
    if key not in context._shared:
        backbone = context.create_backbone()
        extractor = LocalFeatureExtractor(backbone, max_features=settings.max_features, dims=settings.dims,
                                          pca_seed=settings.seed)
        codebooks = None if context.cache_dir is None else f"{context.cache_dir}/codebooks"
        context._shared[key] = LocalVocabulary(extractor, settings, codebooks)
    return context._shared[key]


def _kernel_factory(name: str):
    def factory(context: MethodContext) -> RetrievalMethod:
        regional = KERNELS[name][1] is not None
        settings = KernelSettings(region_size=context.region_size)
        return MatchKernelMethod(name, shared_vocabulary(context, settings),
                                 proposer_from_context(context, name) if regional else None, context.word_budget)
    factory.__doc__ = f"{name}: aggregated match kernel over local features ({KERNELS[name][1] or 'whole image'})."
    return factory


for _name in KERNELS:
    register_method(_name)(_kernel_factory(_name))
