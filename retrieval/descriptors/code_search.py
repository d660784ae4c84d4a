"""Binary codes searched two better ways, as harness methods: ``asym:CODES`` and ``rerank@R:[asym:|asym-fast:]CODES``.

``CODES`` is any binary code of :mod:`retrieval.descriptors.trained`: a hashing network (``run:DIR`` /
``model:FILE``), ``itq@BITS:run:DIR`` or ``pcasign@BITS:run:DIR``. Each gives its parts (``code_parts``): the
real-valued projection whose signs are the bits, the bits, and the float descriptor they came from.

- ``asym:CODES``: asymmetric scoring (Gordo et al., "Asymmetric distances for binary embeddings"). The
  database stores the packed codes; a query keeps its projection and scores <projection, code in {-1, +1}>
  (:class:`~retrieval.search.binary.AsymmetricScores`). Query rows are float32, database rows packed uint8.
- ``rerank@R:CODES``: two-stage search (:mod:`retrieval.search.two_stage`): a shortlist of R items by Hamming
  distance, re-ranked by the inner product of the float descriptors; ``rerank@R:asym:CODES`` shortlists by the
  asymmetric scores instead, and ``rerank@R:asym-fast:CODES`` by FAISS's fast scan of them
  (:mod:`retrieval.search.fast_scan`: the serving path for large databases, its order up to 8-bit tables).
  Items outside a query's shortlist rank after it in stage 1's order, so the metrics over the whole database
  are defined. A database row holds the packed code then the float descriptor's bytes
  (uint8: one cache entry holds both); query rows are the same (Hamming), or float32 projection then float
  descriptor (asymmetric). ``descriptor_bytes`` is the code's bytes, what a two-stage index holds in memory;
  the float bytes, which stay on disk, are in ``config()["float_bytes_on_disk"]``. The evaluation reads the
  floats of the cache entry into memory to score; the memory bound is :class:`TwoStageIndex`'s, for serving.

Both describe queries and database differently: leave-one-out benchmarks describe their images twice.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from msretrieval.models.backbones import Preprocessing
from msretrieval.utils.errors import UserError

from msretrieval.retrieval.search.binary import AsymmetricScores, pack_bits
from msretrieval.retrieval.search.scores import ScoreSource
from msretrieval.retrieval.search.two_stage import RerankScores, TwoStageIndex
from .methods import MethodContext, RetrievalMethod, register_method_pattern
from .trained import TrainedModelMethod

#: ``asym:run:DIR``, ``asym:itq@64:run:DIR``
ASYMMETRIC_SPEC = re.compile(r"asym:(?P<codes>(?!asym:|asym-fast:|rerank@).+)")
#: ``rerank@1000:itq@64:run:DIR``, ``rerank@100:asym:run:DIR``, ``rerank@100:asym-fast:run:DIR``
RERANK_SPEC = re.compile(r"rerank@(?P<shortlist>\d+):(?P<asymmetric>asym:|asym-fast:)?"
                         r"(?P<codes>(?!asym:|asym-fast:|rerank@).+)")


class _CodeSearch(RetrievalMethod):
    """A binary-code method (``codes``, a module child: it moves and fits with this one) searched another way."""

    descriptor_kind = "binary"

    def __init__(self, name: str, codes: TrainedModelMethod):
        super().__init__(name)
        if codes.descriptor_kind != "binary" or not hasattr(codes, "code_parts"):
            raise UserError(f"{name}: {codes.name} has no binary code (give a hashing network, itq@BITS: or "
                            f"pcasign@BITS: before a run:/model: spec)")
        self.codes = codes
        self.code_bytes = codes.bits // 8

    @property
    def preprocessing(self) -> Preprocessing:
        return self.codes.preprocessing

    def needs_fit(self) -> bool:
        return self.codes.needs_fit()

    def fit(self, train_images, labels=None) -> None:
        self.codes.fit(train_images, labels)

    def fitted_state(self) -> str | None:
        return self.codes.fitted_state()

    def descriptor_bytes(self, descriptors: np.ndarray) -> int:
        """The packed code: what the database keeps in memory."""
        return self.code_bytes


class AsymmetricCodeMethod(_CodeSearch):
    """Queries as float projections, the database as packed codes; asymmetric scores."""

    asymmetric = True

    def config(self) -> dict:
        return {"name": self.name, "codes": self.codes.config(), "asymmetric": True}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.codes.code_parts(images)[0].cpu()

    @torch.no_grad()
    def encode_database(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(pack_bits(self.codes.code_parts(images)[1].cpu().numpy()))

    def scores(self, queries: np.ndarray, database: np.ndarray) -> ScoreSource:
        return AsymmetricScores(queries, database)


class RerankedCodeMethod(_CodeSearch):
    """A shortlist of ``shortlist`` items by the codes (Hamming, or asymmetric), re-ranked by float descriptors."""

    def __init__(self, name: str, codes: TrainedModelMethod, shortlist: int, asymmetric: bool = False,
                 fast_scan: bool = False):
        super().__init__(name, codes)
        if shortlist < 1:
            raise UserError(f"{name}: the shortlist needs at least 1 item, got {shortlist}")
        self.shortlist, self.asymmetric, self.fast_scan = shortlist, asymmetric or fast_scan, fast_scan

    def config(self) -> dict:
        return {"name": self.name, "codes": self.codes.config(), "shortlist": self.shortlist,
                "asymmetric": self.asymmetric, "fast_scan": self.fast_scan,
                "float_bytes_on_disk": 4 * self.codes.float_dim}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if not self.asymmetric:
            return self.encode_database(images)
        projection, _, floats = self.codes.code_parts(images)
        return torch.cat([projection.float().cpu(), floats.float().cpu()], dim=1)

    @torch.no_grad()
    def encode_database(self, images: torch.Tensor) -> torch.Tensor:
        _, bits, floats = self.codes.code_parts(images)
        return torch.from_numpy(np.concatenate([pack_bits(bits.cpu().numpy()),
                                                floats.float().cpu().numpy().view(np.uint8)], axis=1))

    def _split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes or projections, float descriptors) of descriptor rows."""
        if rows.dtype == np.uint8:
            return (np.ascontiguousarray(rows[:, :self.code_bytes]),
                    np.ascontiguousarray(rows[:, self.code_bytes:]).view(np.float32))
        bits = 8 * self.code_bytes
        return np.asarray(rows[:, :bits], dtype=np.float32), np.asarray(rows[:, bits:], dtype=np.float32)

    def scores(self, queries: np.ndarray, database: np.ndarray) -> ScoreSource:
        codes, floats = self._split(database)
        first, query_floats = self._split(queries)
        return RerankScores(TwoStageIndex(codes, floats, self.shortlist, self.asymmetric, self.fast_scan), first,
                            query_floats)


def _codes(spec: str, context: MethodContext) -> TrainedModelMethod:
    return TrainedModelMethod.from_spec(spec, shared=context._shared)


@register_method_pattern(ASYMMETRIC_SPEC.pattern, "asym:CODES")
def _asymmetric(spec: str, context: MethodContext) -> RetrievalMethod:
    """CODES: a hashing network's run:DIR / model:FILE, itq@BITS:run:DIR or pcasign@BITS:run:DIR."""
    return AsymmetricCodeMethod(spec, _codes(ASYMMETRIC_SPEC.fullmatch(spec).group("codes"), context))


@register_method_pattern(RERANK_SPEC.pattern, "rerank@R:[asym:|asym-fast:]CODES")
def _reranked(spec: str, context: MethodContext) -> RetrievalMethod:
    match = RERANK_SPEC.fullmatch(spec)
    return RerankedCodeMethod(spec, _codes(match.group("codes"), context), int(match.group("shortlist")),
                              asymmetric=match.group("asymmetric") is not None,
                              fast_scan=match.group("asymmetric") == "asym-fast:")
