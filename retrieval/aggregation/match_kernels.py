"""Aggregated match kernels as harness methods: ``vlad``, ``asmk``, ``asmk_star`` and their regional versions
``r_vlad``, ``r_asmk_naive``, ``r_asmk``, ``r_asmk_star`` (Detect-to-Retrieve §4.3).

Pipeline: backbone tap -> DELF-style local features (top 300 by feature norm at each scale, L2 -> PCA 128 -> L2;
:mod:`.local_features`) -> nearest of C = 256 k-means words (:mod:`.codebook`, cached on disk) -> the kernel's
per-word aggregation (:mod:`.vlad_asmk`). ``fit`` learns the PCA and the codebook on the benchmark's training
images, once for every kernel built from one :class:`MethodContext`. Codebook size, features per image and scale,
the scales and the number of fitting images are :class:`KernelSettings` (``--words``, ``--max-features``,
``--scales``, ``--fit-images``).

The regional kernels aggregate the database image over its detected regions (the full image first; regions on
the database side only, as in the paper), each detected region described by the local features of its crop
(as DELF does), resized to ``region_size`` on its shorter side or at the image's own scale (``"native"``);
queries are aggregated whole. Descriptors are the padded rows of :func:`retrieval.aggregation.vlad_asmk.to_rows`;
``descriptor_bytes`` counts an image's real words (2-byte word id + float32 vector, or d bits for the starred
kernels).

Controls for comparing kernels (docs/aggregation.md): ``gamma`` sets the normaliser of the selective kernels
(ASMK, ASMK*, R-ASMK, R-ASMK*) the same way for all of them; ``word_budget`` caps each database image at B x
the word count of its scale-1 features (single-scale ASMK's memory) for R-ASMK / R-ASMK* and, with several
scales, for ASMK / ASMK* (multi-scale ASMK at R-ASMK's memory).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from msretrieval.data.images import image_list_fingerprint
from msretrieval.models.backbones import Preprocessing
from msretrieval.retrieval.descriptors.methods import MethodContext, RetrievalMethod, register_method, state_fingerprint
from msretrieval.retrieval.search.scores import ScoreSource
from msretrieval.utils.errors import UserError

from . import vlad_asmk as agg
from .codebook import Codebook, fit_or_load_codebook
from .local_features import LocalFeatureExtractor
from .regional import NATIVE, RegionProposer, crop_region, proposer_from_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelSettings:
    words: int = 256             # 256 beat 1,024 on Flowers (about 265 features per image leave most words empty)
    dims: int = 128
    max_features: int = 300      # per image and scale (each extra scale adds up to this many, as a crop does)
    fit_images: int = 300        # training images whose local features fit the PCA and the codebook
    # regional kernels: a detected region's features come from its crop, resized to this shorter side (DELF
    # re-extracts each region: a small object gets as many features as a query); "native": the crop at the
    # image's own scale (DELF crops without resizing); 0 = select the whole image's features inside the box
    # instead (no extra forward pass, but a small object keeps only a few of them)
    region_size: int | str = 224
    kmeans_iterations: int = 20
    seed: int = 0
    scales: tuple[float, ...] = (1.0,)  # image scales the local features are extracted at (fit, queries, database)
    # the database side at other scales (None: ``scales``): queries and the fit stay at ``scales``, so multi-scale
    # database features are a control for R-ASMK, whose crops add enlarged features to the database side only
    database_scales: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("words", "dims", "max_features", "fit_images"):
            if getattr(self, name) < 1:
                raise UserError(f"kernel setting {name} must be at least 1, got {getattr(self, name)}")
        for scales in (self.scales, self.database_scales or (1.0,)):
            if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
                raise UserError(f"kernel scales must be positive numbers, got {scales}")
            if len(set(scales)) != len(scales):
                raise UserError(f"kernel scales must differ from each other, got {scales}")
        if self.region_size != NATIVE and not (isinstance(self.region_size, int) and self.region_size >= 0):
            raise UserError(f"region_size must be a number of pixels >= 0 or 'native', got {self.region_size!r}")


#: database normaliser of the selective kernels (``--kernel-gamma``): "default" = each kernel's own (ASMK /
#: ASMK* (#words)^(-1/2); R-ASMK / R-ASMK* 1, DELF's regional index config), "words" = (#words)^(-1/2) for all,
#: "one" = 1 for all (DELF's ``use_l2_normalization: false``). It applies to queries and database alike.
GAMMAS = ("default", "words", "one")
#: the kernels it applies to: VLAD's normaliser is the L2 norm inside its vector, naive R-ASMK's is inside Phi_R
SELECTIVE = ("asmk", "asmk_star", "r_asmk", "r_asmk_star")


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

    def __call__(self, images: torch.Tensor, scales=None):
        """Per image: (descriptors, positions, words, scales) of its local features (at the extractor's scales,
        or at ``scales``)."""
        if self.codebook is None:
            raise RuntimeError("the local vocabulary is not fitted: call fit() on training images first")
        out = []
        for features in self.extractor(images, scales):
            words, _ = self.codebook.assign(features.descriptors)
            out.append((features.descriptors, features.positions, words, features.scales))
        return out


class MatchKernelMethod(RetrievalMethod):
    """One aggregated match kernel over a shared :class:`LocalVocabulary` (regional ones also over a
    :class:`RegionProposer`)."""

    def __init__(self, name: str, vocabulary: LocalVocabulary, proposer: RegionProposer | None = None,
                 word_budget: float = 0.0, gamma: str = "default"):
        if name not in KERNELS:
            raise ValueError(f"unknown kernel {name!r}; one of {', '.join(KERNELS)}")
        super().__init__(name)
        self.whole, self.regional, self.sigma = KERNELS[name]
        if self.regional is not None and proposer is None:
            raise ValueError(f"{name} aggregates detected regions: it needs a RegionProposer")
        if word_budget < 0:
            raise ValueError(f"word_budget must be >= 0 (0: no cap), got {word_budget}")
        if gamma not in GAMMAS:
            raise UserError(f"kernel gamma must be one of {', '.join(GAMMAS)}, got {gamma!r}")
        # database images are described at these scales (queries and the fit at the extractor's)
        self.database_scales = vocabulary.settings.database_scales or vocabulary.extractor.scales
        scales = self.database_scales
        # the budget caps R-ASMK / R-ASMK*, and ASMK / ASMK* over several scales (multi-scale ASMK at a budget)
        capped = self.regional in ("rasmk", "rasmk_star") or (self.whole != "vlad" and self.regional is None
                                                               and len(scales) > 1)
        self.word_budget = word_budget if capped else 0.0
        if self.word_budget and 1.0 not in scales:
            raise UserError(f"{name}: --word-budget counts words relative to the image's scale-1 features: "
                            f"include 1 in the database's scales (got {', '.join(map(str, scales))})")
        self.gamma = gamma if name in SELECTIVE else "default"
        # (whole image, regional) representations: normalised by (#words)^(-1/2)?
        self.normalize = {"default": (True, False), "words": (True, True), "one": (False, False)}[self.gamma]
        self.vocabulary, self.proposer = vocabulary, proposer
        self.other_scales = self.database_scales != vocabulary.extractor.scales
        self.asymmetric = self.regional is not None or bool(self.word_budget) or self.other_scales
        self.binary = name.endswith("_star")
        # the most words a row can hold: an image has at most C words, and at most as many as its features (every
        # crop of a regional kernel brings its own)
        features = max(vocabulary.extractor.features_per_image(), vocabulary.extractor.features_per_image(scales))
        if self.regional is not None and vocabulary.settings.region_size != 0:
            features *= 1 + proposer.max_regions
        self.max_words = min(vocabulary.settings.words, features)
        self.backbone = vocabulary.extractor.backbone  # a submodule: extraction moves it to the device

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing

    def config(self) -> dict:
        regions = self.proposer.config() if self.proposer is not None else {}
        budget = {"word_budget": self.word_budget} if self.word_budget else {}  # absent: no cap
        gamma = {"gamma": self.gamma} if self.gamma != "default" else {}      # absent: each kernel's own
        database = {"database_scales": list(self.database_scales)} if self.other_scales else {}
        return {"name": self.name, **self.vocabulary.config(), **regions, **budget, **gamma, **database}

    def needs_fit(self) -> bool:
        return True

    def fit(self, train_images, labels=None) -> None:
        self.vocabulary.fit(train_images)

    def fitted_objects(self) -> list:
        codebook = self.vocabulary.codebook
        return [*super().fitted_objects(), self.vocabulary.extractor.pca_state(),
                None if codebook is None else codebook.centroids]

    def _aggregate(self, kernel: str, descriptors, positions, words, boxes=None,
                   max_words: int | None = None) -> agg.Aggregated:
        """``positions=None``: ``descriptors`` is one (descriptors, words) pair per region."""
        codebook = self.vocabulary.codebook
        if kernel == "vlad":
            return agg.vlad(descriptors, codebook, words=words)
        if kernel in ("asmk", "asmk_star"):
            return agg.asmk(descriptors, codebook, words=words, binary=kernel == "asmk_star",
                            normalize=self.normalize[0], max_words=max_words)
        if kernel == "rvlad":
            return agg.rvlad(descriptors, positions, boxes, codebook, words=words)
        if kernel == "naive_rasmk":
            return agg.naive_rasmk(descriptors, positions, boxes, codebook, words=words)
        return agg.rasmk(descriptors, positions, boxes, codebook, words=words, binary=kernel == "rasmk_star",
                         normalize=self.normalize[1], max_words=max_words)

    def _word_limit(self, descriptors: np.ndarray, words: np.ndarray, scales: np.ndarray) -> int | None:
        """The budget's cap for one database image: floor(B x the word count of its scale-1 features, i.e. of its
        single-scale ASMK), at least 1; None without a budget. The arguments are the full image's features."""
        if not self.word_budget:
            return None
        at_scale_1 = scales == 1.0
        single = agg.asmk(descriptors[at_scale_1], self.vocabulary.codebook, words=words[at_scale_1])
        return max(1, math.floor(self.word_budget * len(single)))

    def _rows(self, items: list[agg.Aggregated]) -> torch.Tensor:
        return torch.from_numpy(agg.to_rows(items, self.max_words, self.vocabulary.settings.dims, self.binary))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._rows([self._aggregate(self.whole, descriptors, positions, words)
                           for descriptors, positions, words, _ in self.vocabulary(images)])

    @torch.no_grad()
    def encode_database(self, images: torch.Tensor) -> torch.Tensor:
        if not self.asymmetric:
            return self.encode(images)
        at = self.database_scales if self.other_scales else None  # None: the extractor's scales
        features = self.vocabulary(images, at)
        if self.regional is None:  # a whole-image kernel with a word budget or other database scales
            return self._rows([self._aggregate(self.whole, descriptors, positions, words,
                                               max_words=self._word_limit(descriptors, words, scales))
                               for descriptors, positions, words, scales in features])
        boxes = self.proposer(images, self.preprocessing)
        size = self.vocabulary.settings.region_size
        items = []
        for image, (descriptors, positions, words, scales), image_boxes in zip(images, features, boxes):
            limit = self._word_limit(descriptors, words, scales)
            if size == 0:
                items.append(self._aggregate(self.regional, descriptors, positions, words,
                                             boxes=[tuple(b) for b in image_boxes], max_words=limit))
                continue
            regions = [(descriptors, words)]  # the full image (box 0) as it is, then each detected crop
            for box in image_boxes[1:]:
                crop_descriptors, _, crop_words, _ = self.vocabulary(crop_region(image, box, size)[None], at)[0]
                regions.append((crop_descriptors, crop_words))
            items.append(self._aggregate(self.regional, regions, None, None, max_words=limit))
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
        extractor = LocalFeatureExtractor(backbone, max_features=settings.max_features, scales=settings.scales,
                                          dims=settings.dims, pca_seed=settings.seed, per_scale=True)
        codebooks = None if context.cache_dir is None else f"{context.cache_dir}/codebooks"
        context._shared[key] = LocalVocabulary(extractor, settings, codebooks)
    return context._shared[key]


def kernel_settings(context: MethodContext) -> KernelSettings:
    """The kernel settings chosen on the command line (the context's None fields: :class:`KernelSettings`'s
    defaults)."""
    chosen = {"words": context.kernel_words, "max_features": context.kernel_max_features,
              "fit_images": context.kernel_fit_images,
              "scales": None if context.kernel_scales is None else tuple(float(s) for s in context.kernel_scales),
              "database_scales": None if context.kernel_database_scales is None else
              tuple(float(s) for s in context.kernel_database_scales)}
    return KernelSettings(region_size=context.region_size, **{k: v for k, v in chosen.items() if v is not None})


def _kernel_factory(name: str):
    def factory(context: MethodContext) -> RetrievalMethod:
        regional = KERNELS[name][1] is not None
        return MatchKernelMethod(name, shared_vocabulary(context, kernel_settings(context)),
                                 proposer_from_context(context, name) if regional else None, context.word_budget,
                                 context.kernel_gamma)
    factory.__doc__ = f"{name}: aggregated match kernel over local features ({KERNELS[name][1] or 'whole image'})."
    return factory


for _name in KERNELS:
    register_method(_name)(_kernel_factory(_name))
