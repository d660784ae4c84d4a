"""MSBD methods registered in the evaluation harness.

- ``msbd_float``: the float descriptor (inner product of unit vectors = the paper's L2 ranking);
- ``msbd``: sparse binary codes (Algorithm 1) + class probabilities, ranked by the dissimilarity (Eq. 7);
- ``msbd_h``: the same codes, plain Hamming ranking (ablation MSBD-h);
- ``msbd_s``: binary learning without sparsity, dissimilarity ranking (ablation MSBD-s);
- ``itq``: classical ITQ on msbd_float, Hamming ranking.

Code length: ``NAME@BITS`` for BITS in 16, 32, 64, 128, 256, 512 (``msbd@64``); the bare name means 256 bits.
Descriptors: Hamming methods store packed codes (uint8, L/8 bytes, searchable with FAISS); the
dissimilarity methods also need the class probabilities, so their descriptor is one float32 row
[code bytes as 0..255 values, probabilities], split again by :meth:`scores`; its reported size is the real
storage, L/8 bytes of code + 4 bytes per class probability.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from msretrieval.models.backbones import Preprocessing
from msretrieval.retrieval.search.binary import HammingScores, pack_bits
from msretrieval.retrieval.descriptors.methods import MethodContext, RetrievalMethod, register_method
from msretrieval.retrieval.search.scores import ScoreSource
from msretrieval.utils.errors import UserError

from .dissimilarity import DissimilarityScores
from .pipeline import MSBDPipeline
from .settings import MSBDSettings

BIT_CHOICES = (16, 32, 64, 128, 256, 512)
DEFAULT_BITS = 256
#: variant -> (binary learner, ranked by the dissimilarity?)
VARIANTS = {"msbd": ("msbd", True), "msbd_h": ("msbd", False), "msbd_s": ("msbd_s", True), "itq": ("itq", False)}


def shared_pipeline(context: MethodContext, settings: MSBDSettings | None = None) -> MSBDPipeline:
    """One pipeline per context and settings, so all MSBD methods of a run fit and extract once."""
    settings = settings or MSBDSettings.from_env()
    key = ("msbd-pipeline", repr(settings))
    if key not in context._shared:
        backbone = context.create_backbone()
        if settings.finetune_steps > 0 and context.share_backbone:
            # fine-tuning changes the FEN's weights: on a copy, so that the other methods of a --together run
            # keep the pretrained backbone their cache keys describe
            backbone = copy.deepcopy(backbone)
        context._shared[key] = MSBDPipeline(backbone, settings)
    return context._shared[key]


class MSBDMethod(RetrievalMethod):
    """Base: every MSBD method fits the shared pipeline on the training split."""

    def __init__(self, name: str, pipeline: MSBDPipeline):
        super().__init__(name)
        self.pipeline = pipeline

    @property
    def preprocessing(self) -> Preprocessing:
        return self.pipeline.preprocessing

    def config(self) -> dict:
        return {"name": self.name, **self.pipeline.config()}

    def needs_fit(self) -> bool:
        return True

    def fit(self, train_images, labels=None) -> None:
        self.pipeline.fit(train_images, labels)

    def fitted_objects(self) -> list:  # the fine-tuned FEN is in the module's state_dict
        pipeline = self.pipeline
        return [*super().fitted_objects(), pipeline.patch_pca,
                None if pipeline.codebook is None else pipeline.codebook.centroids, pipeline.branch_pca,
                pipeline.classifier]


class MSBDFloat(MSBDMethod):
    """Unit-norm float descriptors; the default inner-product scores rank as the paper's L2 distance."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.pipeline.describe(images)[0]).float()


class MSBDBinary(MSBDMethod):
    def __init__(self, name: str, pipeline: MSBDPipeline, variant: str, bits: int):
        super().__init__(name, pipeline)
        if variant not in VARIANTS:
            raise ValueError(f"unknown MSBD variant {variant!r}; available: {', '.join(VARIANTS)}")
        if bits not in BIT_CHOICES:
            raise ValueError(f"code length must be one of {BIT_CHOICES}, got {bits}")
        self.variant, self.bits = variant, bits
        self.learner, self.dissimilarity = VARIANTS[variant]
        self.descriptor_kind = "float32" if self.dissimilarity else "binary"
        self.model = None

    @property
    def code_bytes(self) -> int:
        return self.bits // 8

    def config(self) -> dict:
        return {**super().config(), "variant": self.variant, "bits": self.bits}

    def fit(self, train_images, labels=None) -> None:
        super().fit(train_images, labels)
        if self.dissimilarity and self.pipeline.classifier is None:
            raise UserError(f"{self.name} ranks with class probabilities: fit it on labelled training images")
        self.model = self.pipeline.binary_model(self.learner, self.bits)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError(f"{self.name} is not fitted: call fit() on training images first")
        floats, probs = self.pipeline.describe(images)
        codes = pack_bits(self.model.encode(floats))
        if not self.dissimilarity:
            return torch.from_numpy(codes)
        return torch.from_numpy(np.concatenate([codes.astype(np.float32), probs.astype(np.float32)], axis=1))

    def split(self, descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A dissimilarity descriptor row -> (packed code bytes, class probabilities)."""
        return descriptors[:, :self.code_bytes].astype(np.uint8), descriptors[:, self.code_bytes:]

    def scores(self, queries: np.ndarray, database: np.ndarray) -> ScoreSource:
        if not self.dissimilarity:
            return HammingScores(queries, database)
        return DissimilarityScores(*self.split(queries), *self.split(database))

    def descriptor_bytes(self, descriptors: np.ndarray) -> int:
        if not self.dissimilarity:
            return self.code_bytes
        return self.code_bytes + 4 * (descriptors.shape[1] - self.code_bytes)  # float32 probabilities


@register_method("msbd_float")
def _msbd_float(context: MethodContext) -> RetrievalMethod:
    return MSBDFloat("msbd_float", shared_pipeline(context))


def _binary_factory(name: str, variant: str, bits: int):
    def build(context: MethodContext) -> RetrievalMethod:
        return MSBDBinary(name, shared_pipeline(context), variant, bits)
    return build


for _variant in VARIANTS:
    register_method(_variant)(_binary_factory(_variant, _variant, DEFAULT_BITS))
    for _bits in BIT_CHOICES:
        register_method(f"{_variant}@{_bits}")(_binary_factory(f"{_variant}@{_bits}", _variant, _bits))
