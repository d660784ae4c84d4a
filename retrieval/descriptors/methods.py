"""The method interface of the evaluation harness, and its registry.

A method turns a batch of preprocessed images into descriptors (``encode``; ``encode_database`` for the
database side, which differs only for asymmetric methods such as regional ones), may learn something from the
training images first (``fit``: PCA, codebooks, ITQ...), and says how two descriptor sets are compared
(``scores``: inner product by default; Hamming codes or custom dissimilarities override it); ``search`` finds
each query's top k with those same scores. Everything a method needs to rebuild itself is in ``config()``,
which also keys the descriptor cache.

Methods are registered by name (``@register_method("gem")``), or by a pattern for names that carry their own
arguments (``@register_method_pattern(r"run:.+")``: a trained network's run directory), and built by
:func:`create_method` from a :class:`MethodContext` (the backbone and weights chosen on the command line). The
registry knows only what has registered into it: the packages that define methods (the aggregation kernels,
trained networks, the baselines) sit above this module and register themselves when imported;
:mod:`retrieval.evaluation.catalogue` imports them all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from msretrieval.models.backbones import FEATURES, Backbone, Preprocessing, create_backbone
from msretrieval.models.pooling import create_pooling, l2n
from msretrieval.utils.errors import UserError

from msretrieval.retrieval.search.scores import InnerProductScores, ScoreSource


@dataclass(frozen=True)
class MethodContext:
    """Shared choices for building methods: which backbone, which weights, which device."""

    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    device: str = "cpu"
    #: with share_backbone, methods built from this context use one backbone object (frozen methods only)
    share_backbone: bool = False
    #: landmark detector checkpoint for the regional methods, and how many boxes it may add per image
    detector: str | None = None
    max_regions: int = 4
    #: shorter side of a detected region's crop; "native": the crop at the image's own scale; 0: regional kernels
    #: take the image's features inside the box
    region_size: int | str = 224
    #: r_asmk / r_asmk_star (and asmk / asmk_star over several scales): at most this many times the full image's
    #: scale-1 word count per database image; 0: no cap
    word_budget: float = 0.0
    #: match kernels (retrieval.aggregation.match_kernels.KernelSettings; None: its default): codebook size, local
    #: features per image and scale, the scales, training images for the PCA and codebook, and the selective kernels'
    #: database normaliser ("default", "words", "one")
    kernel_words: int | None = None
    kernel_max_features: int | None = None
    kernel_scales: tuple[float, ...] | None = None
    kernel_database_scales: tuple[float, ...] | None = None  # the database side's scales (None: kernel_scales)
    kernel_fit_images: int | None = None
    #: trained float networks: image scales whose descriptors are summed (cirtorch's multi-scale), e.g. (1, 0.707, 1.414)
    descriptor_scales: tuple[float, ...] = (1.0,)
    kernel_gamma: str = "default"
    region_score_threshold: float | None = None  # None: the detector checkpoint's
    region_nms_threshold: float | None = None
    #: where fitted state that is worth keeping (codebooks) is cached; None: nowhere
    cache_dir: str | None = None
    _shared: dict = field(default_factory=dict, compare=False, repr=False)

    def create_backbone(self) -> Backbone:
        if not self.share_backbone:
            return create_backbone(self.backbone, pretrained=self.pretrained, weights=self.weights)
        if "backbone" not in self._shared:
            self._shared["backbone"] = create_backbone(self.backbone, pretrained=self.pretrained, weights=self.weights)
        return self._shared["backbone"]


def state_fingerprint(*objects) -> str:
    """A hash of fitted state: tensors and arrays by dtype, shape and bytes; dicts, lists, tuples, dataclasses
    and modules (their ``state_dict``) by their parts; numbers, strings and None by value. Anything else is a
    TypeError, so an unhashed kind of state cannot slip through silently."""
    digest = hashlib.sha1()

    def visit(value) -> None:
        if isinstance(value, nn.Module):
            value = value.state_dict()
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            digest.update(f"array {value.dtype.str} {value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)}".encode())
            for key in sorted(value, key=str):
                digest.update(repr(key).encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"sequence {len(value)}".encode())
            for item in value:
                visit(item)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            digest.update(type(value).__name__.encode())
            visit({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
        elif value is None or isinstance(value, (bool, int, float, str, np.generic)):
            digest.update(repr(value).encode())
        else:
            raise TypeError(f"state_fingerprint cannot hash a {type(value).__name__}")

    visit(list(objects))
    return digest.hexdigest()[:16]


class RetrievalMethod(nn.Module):
    """Base class. Subclasses implement :meth:`encode`; the rest has sensible defaults."""

    #: descriptor element type: "float32" or "binary" (packed bits, uint8)
    descriptor_kind = "float32"
    #: database images are described differently from queries (encode_database != encode)
    asymmetric = False

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    @property
    def preprocessing(self) -> Preprocessing:
        """Input normalisation (mean/std) the method's network expects."""
        return Preprocessing()

    def config(self) -> dict:
        """Everything that changes the descriptors (keys the cache; saved in results)."""
        return {"name": self.name}

    @property
    def cache_name(self) -> str:
        """Names the cache files; methods that differ only in how they score share descriptors under one."""
        return self.name

    def needs_fit(self) -> bool:
        """True: :meth:`fit` on the benchmark's training images before encoding. The fit must be a seeded,
        deterministic function of the pre-fit ``config()`` and the training images (the descriptor cache keys on
        those and skips the fit when every descriptor is cached), and ``scores`` / ``search`` /
        ``descriptor_bytes`` must work without it."""
        return False

    def fit(self, train_loader) -> None:
        """Learn from training images (a loader of (images, indices)); default: nothing to learn."""

    def fitted_state(self) -> str | None:
        """A fingerprint of what :meth:`fit` learned (None for a method that is not fitted): the harness stores
        it with every cache entry and never pairs descriptors of two different fits (a fit that is seeded but
        not bit-reproducible, e.g. at another thread count or on another device, gives slightly different
        PCA bases and codebooks). Default: the module's parameters and buffers and :meth:`fitted_objects`."""
        if not self.needs_fit():
            return None
        return state_fingerprint(self.state_dict(), *self.fitted_objects())

    def fitted_objects(self) -> list:
        """Fitted state held outside the module's parameters and buffers. Default: the method's public
        attributes that are tensors, arrays or dataclasses (a fitted mean, an ITQ or PCA model); a method
        that keeps fitted state elsewhere adds it."""
        return [value for name, value in sorted(vars(self).items()) if not name.startswith("_") and (
            isinstance(value, (torch.Tensor, np.ndarray))
            or (dataclasses.is_dataclass(value) and not isinstance(value, type)))]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D) descriptors."""
        raise NotImplementedError

    def encode_database(self, images: torch.Tensor) -> torch.Tensor:
        """Database-side descriptors; the same as :meth:`encode` unless the method is asymmetric."""
        return self.encode(images)

    def scores(self, queries: np.ndarray, database: np.ndarray) -> ScoreSource:
        """How query and database descriptors compare (higher = more similar)."""
        return InnerProductScores(queries, database)

    def search(self, queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices) of the k best database items per query, best first, equal scores in ascending
        database index: the ranking :meth:`scores` gives, whatever the descriptor layout."""
        return self.scores(queries, database).top_k(k)

    def descriptor_bytes(self, descriptors: np.ndarray) -> int:
        """Storage per image."""
        return int(descriptors.shape[1] * descriptors.dtype.itemsize)


class PooledFeatures(RetrievalMethod):
    """Global pooling (GeM, average, max) of one backbone tap, L2-normalised."""

    def __init__(self, name: str, backbone: Backbone, pooling: str, tap: str = FEATURES, **pooling_kwargs):
        super().__init__(name)
        self.backbone = backbone
        self.tap = tap
        self.pooling_name = pooling
        self.pooling_kwargs = pooling_kwargs
        self.pool = create_pooling(pooling, **pooling_kwargs)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing

    def config(self) -> dict:
        return {"name": self.name, "backbone": self.backbone.describe(), "tap": self.tap,
                "pooling": self.pooling_name, **self.pooling_kwargs}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone.forward_taps(images, [self.tap])[self.tap]
        return l2n(self.pool(fmap))


MethodFactory = Callable[[MethodContext], RetrievalMethod]
PatternFactory = Callable[[str, MethodContext], RetrievalMethod]
_REGISTRY: dict[str, MethodFactory] = {}
_PATTERNS: dict[str, tuple[re.Pattern, PatternFactory, str]] = {}


def register_method(name: str):
    """Decorator: register a factory ``f(context) -> RetrievalMethod`` under ``name``."""
    def wrap(factory: MethodFactory) -> MethodFactory:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory
    return wrap


def register_method_pattern(pattern: str, syntax: str):
    """Decorator: register a factory ``f(name, context) -> RetrievalMethod`` for every name that fully matches
    the regular expression ``pattern``; ``syntax`` shows users the form (``run:RUN_DIR``)."""
    def wrap(factory: PatternFactory) -> PatternFactory:
        if pattern in _PATTERNS:
            raise ValueError(f"method pattern {pattern!r} is registered twice")
        _PATTERNS[pattern] = (re.compile(pattern), factory, syntax)
        return factory
    return wrap


def available_methods() -> list[str]:
    """The registered names (not the patterns' forms)."""
    return sorted(_REGISTRY)


def create_method(name: str, context: MethodContext | None = None) -> RetrievalMethod:
    context = context or MethodContext()
    if name in _REGISTRY:
        return _REGISTRY[name](context)
    for pattern, factory, _ in _PATTERNS.values():
        if pattern.fullmatch(name):
            return factory(name, context)
    forms = sorted(syntax for _, _, syntax in _PATTERNS.values())
    raise UserError(f"unknown method {name!r}; available: {', '.join(available_methods() + forms)}")


@register_method("gem")
def _gem(context: MethodContext) -> RetrievalMethod:
    """GeM with a fixed p = 3 on the last feature map."""
    return PooledFeatures("gem", context.create_backbone(), "gem", p=3.0, learn_p=False)


@register_method("gap")
def _gap(context: MethodContext) -> RetrievalMethod:
    """Global average pooling (SPoC) of the last feature map."""
    return PooledFeatures("gap", context.create_backbone(), "spoc")


@register_method("mac")
def _mac(context: MethodContext) -> RetrievalMethod:
    """Global max pooling (MAC) of the last feature map."""
    return PooledFeatures("mac", context.create_backbone(), "mac")


