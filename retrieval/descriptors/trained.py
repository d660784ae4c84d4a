"""Trained networks as harness methods: ``run:RUN_DIR`` (best or last checkpoint) or ``model:FILE``.

The checkpoint describes itself (architecture, backbone, head, preprocessing), so evaluation needs none of
the training flags. A hashing network (``model.head.hash_bits``) stores packed codes and is ranked by
Hamming distance. ``itq@BITS:run:RUN_DIR`` binarises a float network's descriptors with ITQ (Gong & Lazebnik)
learned on the benchmark's training images: the unsupervised baseline a learned hash head must beat.
``pca@DIMS:run:RUN_DIR`` keeps the float PCA projection instead (no binarisation): what any linear
DIMS-dimensional code of those descriptors can reach, the bound that separates the cost of the dimension
from the cost of the sign. ``pcasign@BITS:run:RUN_DIR`` keeps the signs of that projection (PCA hashing: ITQ
without its rotation). A suffix ``sSEED`` (``itq@64s3:run:DIR``) changes ITQ's random start.

Every binary code here (a hashing network's, ITQ's, PCA signs) also gives its parts to
:mod:`retrieval.descriptors.code_search` (``code_parts``): the real-valued projection whose signs are the
bits, the bits, and the float descriptor they were made from (asymmetric scoring, two-stage re-ranking).
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from msretrieval.models.backbones import Preprocessing
from msretrieval.models.hashing import learn_itq, learn_pca_signs
from msretrieval.models.pca import PCA
from msretrieval.models.retrieval_net import RetrievalNet, load_model
from msretrieval.utils.errors import UserError
from msretrieval.utils.files import sha256_file

from msretrieval.retrieval.search.binary import HammingScores, pack_bits
from .methods import MethodContext, RetrievalMethod, register_method_pattern
from msretrieval.retrieval.search.scores import ScoreSource

CHECKPOINT_NAMES = ("best.pth", "last.pth")
#: ``itq@64:run:DIR``, ``itq@64s3:model:FILE``, ``pca@64:run:DIR``, ``pcasign@64:run:DIR``
PROJECTED_SPEC = re.compile(r"(?P<kind>itq|pcasign|pca)@(?P<dims>\d+)(?:s(?P<seed>\d+))?:(?P<target>(?:run|model):.+)")


def resolve_checkpoint(spec: str) -> Path:
    """``run:DIR`` -> DIR/best.pth, else DIR/last.pth; ``model:FILE`` -> FILE."""
    kind, _, target = spec.partition(":")
    path = Path(target)
    if kind == "model":
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        return path
    if kind != "run":
        raise UserError(f"not a trained-model spec: {spec!r} (use run:RUN_DIR or model:FILE)")
    for name in CHECKPOINT_NAMES:
        for candidate in (path / name, path / "checkpoints" / name):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no {' or '.join(CHECKPOINT_NAMES)} in run directory {path}")


def file_fingerprint(path: Path) -> str:
    """Content hash of a checkpoint (keys the descriptor cache, so retraining invalidates it)."""
    return sha256_file(path)[:16]


class TrainedModelMethod(RetrievalMethod):
    """A frozen :class:`RetrievalNet` from a checkpoint (packed codes and Hamming ranking if it hashes).

    ``scales`` other than (1,): a float network's descriptor is the L2-normalised sum of its descriptors of the
    image resized by each factor (``F.interpolate``, bilinear, ``align_corners=False``), as cirtorch's
    ``extract_ms`` (which uses 1, 1/sqrt(2) and sqrt(2))."""

    def __init__(self, model: RetrievalNet, name: str, checkpoint: Path | None = None,
                 scales: tuple[float, ...] = (1.0,)):
        super().__init__(name)
        self.model = model.eval()
        self.checkpoint = checkpoint
        self._fingerprint = file_fingerprint(checkpoint) if checkpoint is not None else None
        self.bits = model.hash_bits
        self.descriptor_kind = "float32" if self.bits is None else "binary"
        self.scales = tuple(float(scale) for scale in scales)
        if not self.scales or any(not 0 < scale < math.inf for scale in self.scales):
            raise UserError(f"{name}: descriptor scales must be positive numbers, got {scales}")
        if self.scales != (1.0,) and self.bits is not None:
            raise UserError(f"{name}: multi-scale descriptors need a float network; this one hashes")

    @classmethod
    def from_spec(cls, spec: str, shared: dict | None = None, scales: tuple[float, ...] = (1.0,)
                  ) -> "TrainedModelMethod":
        """``run:DIR`` / ``model:FILE``, or ``itq@BITS[sSEED]:`` / ``pca@DIMS:`` / ``pcasign@BITS:`` before either
        (``scales``: the plain network's descriptor scales; the projections describe at scale 1).

        Methods built with one ``shared`` dict (a harness run's) load each checkpoint once, so they share
        its backbone forward when extracted together and its training descriptors when fitted."""
        shared = {} if shared is None else shared
        projected = PROJECTED_SPEC.fullmatch(spec)
        path = resolve_checkpoint(projected.group("target") if projected else spec)
        key = ("trained model", str(path.resolve()), path.stat().st_mtime_ns)
        if key not in shared:
            shared[key] = load_model(path)
        model = shared[key]
        if projected is None:
            return cls(model, name=spec, checkpoint=path, scales=scales)
        kind, dims, seed = projected.group("kind"), int(projected.group("dims")), projected.group("seed")
        if kind in ("pca", "pcasign") and seed is not None:
            raise UserError(f"{spec}: PCA is deterministic; the sSEED suffix is for itq@")
        if kind == "pca":
            return PCATrainedMethod(model, name=spec, checkpoint=path, dims=dims, shared=shared)
        if kind == "pcasign":
            return PCASignTrainedMethod(model, name=spec, checkpoint=path, bits=dims, shared=shared)
        return ITQTrainedMethod(model, name=spec, checkpoint=path, bits=dims, seed=int(seed or 0), shared=shared)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.preprocessing

    def config(self) -> dict:
        config = {"name": self.name, "model": self.model.config(), "checkpoint": str(self.checkpoint),
                  "fingerprint": self._fingerprint}
        if self.scales != (1.0,):  # single-scale keys stay those of earlier caches
            config["scales"] = list(self.scales)
        return config

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.bits is not None:
            return torch.from_numpy(pack_bits(self.model.codes(images).cpu().numpy()))
        if self.scales == (1.0,):
            return self.model(images)
        total = sum(self.model(images if scale == 1 else F.interpolate(
            images, scale_factor=scale, mode="bilinear", align_corners=False)).float() for scale in self.scales)
        return F.normalize(total, dim=-1)

    def scores(self, queries: np.ndarray, database: np.ndarray) -> ScoreSource:
        if self.bits is None:
            return super().scores(queries, database)
        return HammingScores(queries, database)

    @property
    def float_dim(self) -> int:
        """Width of the float descriptor the codes are made from (the hashing layer's input)."""
        return self.model.head.hash.linear.in_features if self.bits is not None else self.model.out_dim

    @torch.no_grad()
    def code_parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(projection, bits, floats) of a hashing network: the hashing layer's linear output (before the
        sign), its bits (True = +1, as :meth:`encode` packs them) and the L2-normalised float descriptor the
        layer reads, from one forward pass."""
        if self.bits is None:
            raise UserError(f"{self.name}: a float network has no binary code (use itq@BITS: or pcasign@BITS: "
                            f"before its run:/model: spec, or a hashing network)")
        projection, floats = self.model.code_parts(images)
        return projection, projection >= 0, floats


class _FittedProjection(TrainedModelMethod):
    """A float network's descriptors through a projection fitted on the benchmark's training images."""

    def __init__(self, model: RetrievalNet, name: str, checkpoint: Path | None, shared: dict | None = None):
        super().__init__(model, name, checkpoint)
        self._shared = {} if shared is None else shared

    def needs_fit(self) -> bool:
        return True

    def _training_descriptors(self, train_images) -> np.ndarray:
        """The float descriptors of the training images (computed once per model and image set)."""
        from .extract import extract

        paths = hashlib.sha1("\n".join(map(str, train_images.paths)).encode()).hexdigest()
        key = ("training descriptors", id(self.model), paths, train_images.transform.describe())
        if key not in self._shared:
            device = next(self.model.parameters()).device
            self._shared[key] = extract(TrainedModelMethod(self.model, f"{self.name} (float)"), train_images,
                                        batch_size=16, device=str(device),
                                        description=f"{self.name}: training descriptors").descriptors
        return self._shared[key]

    def _check_float(self, dims: int, what: str) -> None:
        if self.model.hash_bits is not None:
            raise UserError(f"{self.name}: {what} needs float descriptors; this network already hashes")
        if dims < 1 or dims > self.model.out_dim:
            raise UserError(f"{self.name}: {what} needs 1 to {self.model.out_dim} dimensions, got {dims}")


class ITQTrainedMethod(_FittedProjection):
    """A float network's descriptors -> ITQ codes of ``bits`` bits (PCA to ``bits`` + learned rotation, 50
    iterations from a random rotation drawn with ``seed``), fitted on the benchmark's training images;
    Hamming ranking."""

    def __init__(self, model: RetrievalNet, name: str, checkpoint: Path | None, bits: int, seed: int = 0,
                 shared: dict | None = None):
        super().__init__(model, name, checkpoint, shared)
        self._check_float(bits, "ITQ")
        if bits % 8:
            raise UserError(f"{name}: ITQ bits must be a multiple of 8 (codes are packed in bytes), got {bits}")
        self.bits, self.seed, self.descriptor_kind, self.itq = bits, seed, "binary", None

    def config(self) -> dict:
        return {**super().config(), "itq_bits": self.bits, "itq_seed": self.seed}

    def fit(self, train_images, labels=None) -> None:
        # pca_lowrank draws from the global generator: fork it so the codes depend on the seed alone
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.itq = learn_itq(self._training_descriptors(train_images), self.bits, seed=self.seed)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(pack_bits(self.code_parts(images)[1].numpy()))

    @torch.no_grad()
    def code_parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(projection, bits, floats): the fitted projection of the network's descriptors, its positive
        entries (the code) and the descriptors themselves."""
        if self.itq is None:
            raise RuntimeError(f"{self.name} is not fitted: call fit() on training images first")
        floats = self.model(images).float().cpu()
        projection = self.itq.project(floats.numpy())
        return projection, projection > 0, floats

    @property
    def float_dim(self) -> int:
        return self.model.out_dim


class PCASignTrainedMethod(ITQTrainedMethod):
    """A float network's descriptors -> the signs of their top ``bits`` principal components (PCA hashing),
    fitted on the benchmark's training images; Hamming ranking."""

    def __init__(self, model: RetrievalNet, name: str, checkpoint: Path | None, bits: int,
                 shared: dict | None = None):
        super().__init__(model, name, checkpoint, bits, shared=shared)

    def config(self) -> dict:
        return {**_FittedProjection.config(self), "pcasign_bits": self.bits}  # no ITQ seed: no random start

    def fit(self, train_images, labels=None) -> None:
        with torch.random.fork_rng():  # randomised SVD for few components of wide data
            torch.manual_seed(0)
            self.itq = learn_pca_signs(self._training_descriptors(train_images), self.bits)


class PCATrainedMethod(_FittedProjection):
    """A float network's descriptors -> PCA to ``dims`` (fitted on the training images) -> L2; inner product."""

    def __init__(self, model: RetrievalNet, name: str, checkpoint: Path | None, dims: int,
                 shared: dict | None = None):
        super().__init__(model, name, checkpoint, shared)
        self._check_float(dims, "PCA")
        self.dims, self.pca = dims, None

    def config(self) -> dict:
        return {**super().config(), "pca_dims": self.dims}

    def fit(self, train_images, labels=None) -> None:
        with torch.random.fork_rng():  # randomised SVD for few components of wide data
            torch.manual_seed(0)
            self.pca = PCA.fit(torch.from_numpy(self._training_descriptors(train_images)), self.dims, self.name)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.pca is None:
            raise RuntimeError(f"{self.name} is not fitted: call fit() on training images first")
        return self.pca(self.model(images).float().cpu())


@register_method_pattern(r"(?:run|model):.+", "run:RUN_DIR")
@register_method_pattern(PROJECTED_SPEC.pattern, "itq@BITS:run:RUN_DIR")  # also pca@DIMS:, pcasign@BITS:
def _trained(spec: str, context: MethodContext) -> TrainedModelMethod:
    """Trained networks describe themselves: the context's backbone choice does not apply."""
    return TrainedModelMethod.from_spec(spec, shared=context._shared, scales=context.descriptor_scales)
