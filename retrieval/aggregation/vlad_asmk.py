"""Aggregated match kernels (VLAD, ASMK, ASMK*) and their regional versions (R-VLAD, naive R-ASMK, R-ASMK,
R-ASMK*), with a scorer of one query against a whole database of variable-length representations.

Framework (Tolias, Avrithis & Jegou, "To aggregate or not to aggregate: selective match kernels for image
search", ICCV 2013; Detect-to-Retrieve, Teichmann et al., CVPR 2019, section 4). An image is a set X of local
descriptors, a codebook of C words quantises them (``q(x)`` = nearest word), X_c = the descriptors of word c.

    V(X_c)  = sum_{x in X_c} (x - q(x))                       aggregated residual of word c
    K(X, Y) = gamma(X) gamma(Y) sum_{c in both} sigma(Phi(X_c)^T Phi(Y_c))
    gamma(X) = (sum_c sigma(Phi(X_c)^T Phi(X_c)))^(-1/2)

* VLAD: sigma(u) = u, Phi = V. The image vector is the concatenation of V over all C words (zeros where a word
  is absent) divided by its L2 norm - which *is* gamma. No intra-normalisation, no power law: DELF's
  ``_ComputeVlad`` (feature_aggregation_extractor.py) sums residuals and applies one global
  ``l2_normalize`` (only when ``use_l2_normalization``, default true).
* ASMK: Phi = V_hat = V / ||V|| per word; sigma(u) = sign(u) |u|^alpha if u > tau else 0, alpha = 3, tau = 0
  (DELF ``_SigmaFn``, feature_aggregation_similarity.py: strict ``x > tau``). Each Phi has unit norm, so
  gamma = (#words)^(-1/2) (DELF: ``final_similarity /= sqrt(num_visual_words_1 * num_visual_words_2)``).
* ASMK*: one bit per dimension, b = [V(X_c) > 0] (DELF: ``np.packbits(descriptors > 0)``, most significant bit
  first; the sign of V and V_hat agree). Similarity of two codes = <b_x, b_y> / d for b in {-1, +1}^d
  = 1 - 2 h / d, h = Hamming distance (DELF ``_BinaryNormalizedInnerProduct``; Tolias' normalised binary
  inner product), then sigma. Self-similarity is 1, so again gamma = (#words)^(-1/2).

Words whose aggregated residual has norm <= 1e-6 are absent (DELF ``_PerCentroidNormalization``: norms above
sqrt(1e-12)); this includes a word whose only descriptor sits on its centroid. An image with no words has
gamma = 0 and scores 0 against everything (DELF returns -1 for that case).

Regional aggregation (database side only; the query stays a plain ASMK/VLAD representation, as in DELF's
published configs: regional on the index, not on the queries). Regions are boxes (x1, y1, x2, y2) in
normalised image coordinates, given in order, the full image first by convention (:data:`FULL_IMAGE`); a
local feature belongs to a region when its position lies in the *closed* box (x1 <= cx <= x2 and
y1 <= cy <= y2: a feature on a shared edge belongs to both boxes). DELF extracts each region's features from
the cropped region; here a region's features are the image's own features that fall inside it (no
extra forward pass) - a deviation. R regions, Y^(r) the features of region r:

* R-VLAD: average pooling of the regional VLAD similarities, sum_r K_VLAD(X, Y^(r)) / R, factorises into
  gamma(X) sum_c V(X_c)^T V_R(Y_c) with V_R(Y_c) = (1/R) sum_r gamma(Y^(r)) V(Y_c^(r)), i.e. the mean of the
  L2-normalised regional VLAD vectors - DELF ``_ComputeRvlad`` with ``use_l2_normalization=false``, the value
  its proto prescribes for regional kernels (``pooling="mean"``, default). ``pooling="l2"`` L2-normalises the
  sum instead (DELF's other branch); it changes the ranking since R varies between database images. An empty
  region contributes a zero vector but still counts in R (as in DELF).
* naive R-ASMK (paper only, not in DELF): the same derivation with sigma = identity and Phi = V_hat:
  Phi_R(Y_c) = (1/R) sum_r gamma(Y^(r)) V_hat(Y_c^(r)) with gamma(Y^(r)) = (#words of region r)^(-1/2); sigma
  is then applied to V_hat(X_c)^T Phi_R(Y_c). Phi_R is not unit-norm: a word seen in one region of R is
  shrunk by 1/R before the cube - the flaw R-ASMK fixes. No further database normaliser (it is inside Phi_R).
* R-ASMK: "per-region VLAD description, then sum pooling and per-visual-word normalisation" (the paper's
  Fig. 1): V_hat_R(Y_c) = S_c / ||S_c||, S_c = sum_r V(Y_c^(r)) / ||V(Y^(r))|| - DELF ``_ComputeRasmk`` =
  ``_PerCentroidNormalization`` of the (unnormalised) R-VLAD, whose regional VLADs are each L2-normalised
  *over the whole vector* (``region_weights="vlad"``, default). ``region_weights="word"`` sums per-word
  normalised residuals instead, S_c = sum_r V_hat(Y_c^(r)) (the variant this project's issue described; it
  weighs every region that sees word c equally, whatever else the region holds).
* R-ASMK*: R-ASMK binarised, b = [S_c > 0].
* Normaliser of regional kernels: DELF's index config for R-ASMK* sets ``use_l2_normalization: false``, which
  for ASMK types disables the sqrt(#words_1 #words_2) division at comparison time, so regional database
  images get gamma(Y) = 1 (``normalize=False``, default); ``normalize=True`` uses gamma = (#words)^(-1/2) as
  plain ASMK does, and ``asmk(..., normalize=False)`` gives plain ASMK gamma = 1 (so the two kernels can be
  compared under one normaliser). The query-side gamma(X) is a constant per query and never changes a ranking.
* Word caps: ``rasmk(word_budget=B)`` keeps at most floor(B x the first region's word count) words, and
  ``asmk`` / ``rasmk`` with ``max_words=n`` at most n: those whose aggregated (summed regional) residual is
  longest, before the per-word normalisation; gamma counts the words kept.

Storage and scoring: :class:`Aggregated` is one image (sorted word ids + one float32 vector or packed bit code
per word + gamma). :class:`AggregatedDatabase` stores all database (word, vector) pairs in word-sorted flat
arrays with per-word offsets (an inverted file) and scores one query against every image at once: the
similarities of all (query word, database entry of that word) pairs are computed with array operations over
all database images, sigma applied, per-image sums taken with one ``np.bincount`` - no Python loop over
database images (float vectors: one matrix-vector product per *query* word over that word's block; binary
codes: all pairs gathered at once, XOR + popcount).
For a harness cache of fixed-width (N, D) arrays, :func:`to_rows` / :func:`from_rows` pad every image to
``max_words`` words (layout in :func:`row_width`); :meth:`AggregatedDatabase.save` / ``load`` keep the compact
flat arrays instead.
"""
from __future__ import annotations

import math
from functools import cached_property
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from msretrieval.retrieval.search.scores import ScoreSource
import torch

from .codebook import Codebook

#: a word is present when its aggregated residual norm exceeds this (DELF: squared-norm tolerance 1e-12)
NORM_EPS = 1e-6
#: the full image as a region (normalised x1, y1, x2, y2)
FULL_IMAGE = (0.0, 0.0, 1.0, 1.0)
#: (query word, database entry) pairs of binary codes scored at once (bounds the gathered copies)
_SCORE_CHUNK = 1 << 16


@dataclass(frozen=True)
class Selectivity:
    """sigma(u) = sign(u) |u|^alpha where u > tau, else 0 (alpha = 1, tau = -inf: the identity, VLAD)."""

    alpha: float = 3.0
    tau: float = 0.0

    def __call__(self, u):
        u = np.asarray(u)
        if self.alpha == 1.0 and self.tau == -math.inf:
            return u
        powered = u * u * u if self.alpha == 3 else np.sign(u) * np.abs(u) ** self.alpha
        return np.where(u > self.tau, powered, np.zeros_like(powered))


ASMK_SELECTIVITY = Selectivity(3.0, 0.0)
IDENTITY = Selectivity(1.0, -math.inf)


def selectivity(u, alpha: float = 3.0, tau: float = 0.0):
    """sigma(u) = sign(u) |u|^alpha if u > tau else 0 (elementwise)."""
    return Selectivity(alpha, tau)(u)


@dataclass
class Aggregated:
    """One image's aggregated representation: a vector per present visual word."""

    words: np.ndarray    # (m,) int64, strictly increasing
    vectors: np.ndarray  # (m, d) float32, or (m, ceil(d / 8)) uint8 packed bits (binary kernels)
    dims: int            # d: descriptor dimensions = bits per code
    gamma: float = 1.0   # this image's factor in K = gamma(X) gamma(Y) sum_c sigma(...)

    @property
    def binary(self) -> bool:
        return self.vectors.dtype == np.uint8

    def __len__(self) -> int:
        return len(self.words)

    def descriptor_bytes(self, num_words: int) -> int:
        """Storage of this image: #words x (word id + vector); word ids take 2 bytes up to 65,536 words
        (uint16), else 4; vectors 4 d bytes (float32) or ceil(d / 8) (packed bits)."""
        return len(self) * (word_id_bytes(num_words) + vector_bytes(self.dims, self.binary))


def word_id_bytes(num_words: int) -> int:
    return 2 if num_words <= 1 << 16 else 4


def vector_bytes(dims: int, binary: bool) -> int:
    return (dims + 7) // 8 if binary else 4 * dims


def dense_vlad_bytes(num_words: int, dims: int) -> int:
    """Storage of a dense float32 VLAD vector (C x d)."""
    return 4 * num_words * dims


def descriptor_bytes(image: Aggregated, num_words: int) -> int:
    """Bytes per database image of a sparse representation (see :meth:`Aggregated.descriptor_bytes`)."""
    return image.descriptor_bytes(num_words)


# ---------------------------------------------------------------------------------------------------------
# residuals


def _word_matrix(descriptors: np.ndarray, codebook: Codebook, words, assignments: int) -> np.ndarray:
    if words is None:
        return codebook.assign(descriptors, assignments)[0]
    words = np.asarray(words, dtype=np.int64)
    return words.reshape(len(descriptors), -1) if words.size else words.reshape(len(descriptors), 1)


def _sum_by_word(words: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``vectors`` summed per word id -> (sorted unique words, sums)."""
    if len(words) == 0:
        return np.empty(0, dtype=np.int64), np.zeros((0, vectors.shape[1]), dtype=vectors.dtype)
    order = np.argsort(words, kind="stable")
    sorted_words = words[order]
    unique, starts = np.unique(sorted_words, return_index=True)
    return unique.astype(np.int64), np.add.reduceat(vectors[order], starts, axis=0)


def residual_sums(descriptors: np.ndarray, words: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """V(X_c) for every word c with at least one descriptor: (sorted words (m,), sums (m, d) float64).

    ``words`` is (n,) or (n, k): with k > 1 (multiple assignment) a descriptor adds its residual to each of
    its k words, unweighted (DELF ``num_assignments``).
    """
    centroids = np.asarray(centroids, dtype=np.float64)
    x = np.asarray(descriptors, dtype=np.float64).reshape(len(descriptors), centroids.shape[1])
    words = np.asarray(words, dtype=np.int64)
    words = words.reshape(len(x), -1) if words.size else words.reshape(len(x), 1)
    k = words.shape[1]
    flat = words.reshape(-1)
    residuals = np.repeat(x, k, axis=0) - centroids[flat]
    return _sum_by_word(flat, residuals)


def _present(words: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop words whose vector norm is <= NORM_EPS; returns (words, vectors, norms)."""
    norms = np.linalg.norm(vectors, axis=1)
    keep = norms > NORM_EPS
    return words[keep], vectors[keep], norms[keep]


def _finish(words, vectors, dims: int, binary: bool, gamma: float) -> Aggregated:
    if binary:
        packed = np.packbits(vectors > 0, axis=1) if len(vectors) else np.zeros((0, (dims + 7) // 8), np.uint8)
        return Aggregated(words.astype(np.int64), packed, dims, float(gamma))
    return Aggregated(words.astype(np.int64), np.ascontiguousarray(vectors, dtype=np.float32), dims, float(gamma))


def _count_gamma(count: int) -> float:
    return count ** -0.5 if count else 0.0


def _gamma(count: int, normalize: bool) -> float:
    """The database normaliser of a selective kernel: (#words)^(-1/2), or 1 (an empty image: 0 either way)."""
    return _count_gamma(count) if normalize else (1.0 if count else 0.0)


def _keep_longest(words: np.ndarray, vectors: np.ndarray, norms: np.ndarray, limit: int | None):
    """The ``limit`` words of longest vector norm (all when ``limit`` is None or not exceeded), in word order."""
    if limit is None or len(words) <= limit:
        return words, vectors, norms
    if limit < 1:
        raise ValueError(f"a word limit must be at least 1, got {limit}")
    keep = np.sort(np.argsort(-norms, kind="stable")[:limit])  # word order stays ascending
    return words[keep], vectors[keep], norms[keep]


# ---------------------------------------------------------------------------------------------------------
# whole-image kernels


def vlad(descriptors: np.ndarray, codebook: Codebook, words=None, assignments: int = 1) -> Aggregated:
    """VLAD as a sparse representation: V(X_c) of the present words, divided by the L2 norm of the whole
    (C x d) vector; gamma = 1 (already in the vectors). Score with :data:`IDENTITY`."""
    w, v = residual_sums(descriptors, _word_matrix(descriptors, codebook, words, assignments), codebook.centroids)
    w, v, _ = _present(w, v)
    total = math.sqrt(float((v ** 2).sum()))
    return _finish(w, v / max(total, NORM_EPS), codebook.dims, False, 1.0)


def to_dense(image: Aggregated, num_words: int) -> np.ndarray:
    """(C x d,) float32 vector of a float representation (zeros for absent words): VLAD's usual form."""
    if image.binary:
        raise ValueError("binary representations have no dense float form")
    dense = np.zeros((num_words, image.dims), dtype=np.float32)
    dense[image.words] = image.vectors
    return dense.reshape(-1)


def asmk(descriptors: np.ndarray, codebook: Codebook, words=None, assignments: int = 1,
         binary: bool = False, normalize: bool = True, max_words: int | None = None) -> Aggregated:
    """ASMK (``binary=False``: V_hat per word) or ASMK* (``binary=True``: packed signs of V);
    gamma = (#words)^(-1/2), or 1 with ``normalize=False`` (DELF's ``use_l2_normalization: false``).

    ``max_words`` caps the memory: at most that many words are kept, those whose aggregated residual V(X_c) is
    longest (the rule of :func:`rasmk`'s ``word_budget``); gamma counts the words kept."""
    w, v = residual_sums(descriptors, _word_matrix(descriptors, codebook, words, assignments), codebook.centroids)
    w, v, norms = _keep_longest(*_present(w, v), max_words)
    return _finish(w, v / norms[:, None], codebook.dims, binary, _gamma(len(w), normalize))


def asmk_star(descriptors: np.ndarray, codebook: Codebook, words=None, assignments: int = 1) -> Aggregated:
    return asmk(descriptors, codebook, words, assignments, binary=True)


# ---------------------------------------------------------------------------------------------------------
# regions


def in_box(positions: np.ndarray, box) -> np.ndarray:
    """(n,) bool: positions (cx, cy) inside the closed box (x1, y1, x2, y2) - edges included."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {tuple(box)} is not (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2")
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    return (p[:, 0] >= x1) & (p[:, 0] <= x2) & (p[:, 1] >= y1) & (p[:, 1] <= y2)


def with_full_image(boxes) -> list[tuple[float, float, float, float]]:
    """``boxes`` (e.g. a detector's) with :data:`FULL_IMAGE` prepended."""
    return [FULL_IMAGE, *[tuple(float(v) for v in b) for b in boxes]]


def _regional_residuals(descriptors, positions, boxes, codebook, words, assignments):
    """Per region: (words, V, norms) of its present words.

    ``boxes`` select each region's features from one feature set by position; or pass ``positions=None`` and
    ``descriptors`` = one (descriptors, words or None) pair per region (DELF: features extracted from each
    region's crop), ``boxes`` then unused."""
    if positions is None:
        if len(descriptors) == 0:
            raise ValueError("regional aggregation needs at least one region (the full image first)")
        out = []
        for region_descriptors, region_words in descriptors:
            x = np.asarray(region_descriptors, dtype=np.float32).reshape(len(region_descriptors), codebook.dims)
            out.append(_present(*residual_sums(x, _word_matrix(x, codebook, region_words, assignments),
                                               codebook.centroids)))
        return out
    if len(boxes) == 0:
        raise ValueError("regional aggregation needs at least one region (the full image first)")
    x = np.asarray(descriptors, dtype=np.float32).reshape(len(descriptors), codebook.dims)
    word_matrix = _word_matrix(x, codebook, words, assignments)
    out = []
    for box in boxes:
        mask = in_box(positions, box)
        out.append(_present(*residual_sums(x[mask], word_matrix[mask], codebook.centroids)))
    return out


def rvlad(descriptors, positions, boxes, codebook: Codebook, words=None, assignments: int = 1,
          pooling: str = "mean") -> Aggregated:
    """R-VLAD: mean (``pooling="mean"``, DELF's regional setting) or L2-normalised sum (``"l2"``) of the
    regions' L2-normalised VLAD vectors. Score with :data:`IDENTITY`."""
    if pooling not in ("mean", "l2"):
        raise ValueError(f"pooling must be 'mean' or 'l2', got {pooling!r}")
    regions = _regional_residuals(descriptors, positions, boxes, codebook, words, assignments)
    parts_w, parts_v = [], []
    for w, v, _ in regions:
        total = math.sqrt(float((v ** 2).sum()))
        if total > NORM_EPS:
            parts_w.append(w)
            parts_v.append(v / total)
    w, s = _sum_by_word(np.concatenate(parts_w or [np.empty(0, np.int64)]),
                        np.concatenate(parts_v or [np.zeros((0, codebook.dims))]))
    if pooling == "mean":
        s = s / len(regions)
    else:
        s = s / max(math.sqrt(float((s ** 2).sum())), NORM_EPS)
    w, s, _ = _present(w, s)
    return _finish(w, s, codebook.dims, False, 1.0)


def naive_rasmk(descriptors, positions, boxes, codebook: Codebook, words=None, assignments: int = 1) -> Aggregated:
    """Naive R-ASMK: Phi_R(Y_c) = (1/R) sum_r (#words_r)^(-1/2) V_hat(Y_c^(r)); gamma = 1."""
    regions = _regional_residuals(descriptors, positions, boxes, codebook, words, assignments)
    parts_w, parts_v = [], []
    for w, v, norms in regions:
        if len(w):
            parts_w.append(w)
            parts_v.append(v / norms[:, None] * _count_gamma(len(w)))
    w, s = _sum_by_word(np.concatenate(parts_w or [np.empty(0, np.int64)]),
                        np.concatenate(parts_v or [np.zeros((0, codebook.dims))]))
    w, s, _ = _present(w, s / len(regions))
    return _finish(w, s, codebook.dims, False, 1.0)


def rasmk(descriptors, positions, boxes, codebook: Codebook, words=None, assignments: int = 1,
          binary: bool = False, region_weights: str = "vlad", normalize: bool = False,
          word_budget: float = 0.0, max_words: int | None = None) -> Aggregated:
    """R-ASMK (``binary=False``) / R-ASMK* (``binary=True``): per word, the normalised sum over regions of
    the residuals, each region's residuals divided by the norm of its whole VLAD vector
    (``region_weights="vlad"``, DELF) or per word (``"word"``). gamma = 1 (DELF) or (#words)^(-1/2) with
    ``normalize=True``.

    ``word_budget`` > 0 caps the memory: at most ``floor(word_budget x`` the first region's word count``)``
    words are kept (the first region is the full image, so 1.2 = at most 1.2x the image's ASMK memory), those
    whose summed regional residual is longest - the words several regions agree on, or that a small region
    weighs heavily. ``max_words`` gives the cap as a count instead (the caller's reference word count)."""
    if region_weights not in ("vlad", "word"):
        raise ValueError(f"region_weights must be 'vlad' or 'word', got {region_weights!r}")
    if word_budget < 0:
        raise ValueError(f"word_budget must be >= 0 (0: no cap), got {word_budget}")
    if word_budget and max_words is not None:
        raise ValueError("give the word cap as word_budget or as max_words, not both")
    regions = _regional_residuals(descriptors, positions, boxes, codebook, words, assignments)
    parts_w, parts_v = [], []
    for w, v, norms in regions:
        if not len(w):
            continue
        parts_w.append(w)
        parts_v.append(v / math.sqrt(float((v ** 2).sum())) if region_weights == "vlad" else v / norms[:, None])
    w, s = _sum_by_word(np.concatenate(parts_w or [np.empty(0, np.int64)]),
                        np.concatenate(parts_v or [np.zeros((0, codebook.dims))]))
    if word_budget > 0:
        max_words = max(1, math.floor(word_budget * len(regions[0][0])))
    w, s, norms = _keep_longest(*_present(w, s), max_words)
    return _finish(w, s / norms[:, None], codebook.dims, binary, _gamma(len(w), normalize))


# ---------------------------------------------------------------------------------------------------------
# similarity


def _code_similarity(a: np.ndarray, b: np.ndarray, dims: int) -> np.ndarray:
    """Row-wise normalised inner products of packed {-1, +1} codes: 1 - 2 h / d."""
    xor = np.bitwise_xor(a, b)
    if xor.shape[1] % 8 == 0:
        xor = np.ascontiguousarray(xor).view(np.uint64)
    hamming = np.bitwise_count(xor).sum(axis=1, dtype=np.int64)
    return 1.0 - 2.0 * hamming / dims


def pair_similarity(query: Aggregated, image: Aggregated, sigma: Selectivity = ASMK_SELECTIVITY) -> float:
    """K(X, Y) of two representations by a plain merge of their sorted word lists (the reference the
    vectorised scorer is tested against)."""
    _check_compatible(query, image.dims, image.binary)
    total, i, j = 0.0, 0, 0
    while i < len(query) and j < len(image):
        if query.words[i] == image.words[j]:
            if query.binary:
                u = float(_code_similarity(query.vectors[i:i + 1], image.vectors[j:j + 1], query.dims)[0])
            else:
                u = float(np.dot(query.vectors[i].astype(np.float64), image.vectors[j].astype(np.float64)))
            total += float(sigma(u))
            i, j = i + 1, j + 1
        elif query.words[i] < image.words[j]:
            i += 1
        else:
            j += 1
    return query.gamma * image.gamma * total


def _check_compatible(query: Aggregated, dims: int, binary: bool) -> None:
    if query.dims != dims or query.binary != binary:
        raise ValueError(f"query ({query.dims}-d, binary={query.binary}) and database ({dims}-d, "
                         f"binary={binary}) representations do not match")


@dataclass
class AggregatedDatabase:
    """All database images' (word, vector) pairs in word-sorted flat arrays (an inverted file).

    Entries of word c are ``offsets[c]:offsets[c + 1]``, in ascending image order.
    """

    offsets: np.ndarray  # (C + 1,) int64
    images: np.ndarray   # (M,) int32: the image of each entry
    vectors: np.ndarray  # (M, d) float32 or (M, ceil(d / 8)) uint8
    gamma: np.ndarray    # (N,) float32
    counts: np.ndarray   # (N,) int32: words per image
    dims: int

    @property
    def num_words(self) -> int:
        return len(self.offsets) - 1

    @property
    def binary(self) -> bool:
        return self.vectors.dtype == np.uint8

    def __len__(self) -> int:
        return len(self.counts)

    @classmethod
    def build(cls, items: Sequence[Aggregated], num_words: int, dims: int | None = None,
              binary: bool | None = None) -> "AggregatedDatabase":
        if not items and (dims is None or binary is None):
            raise ValueError("an empty database needs dims and binary")
        dims = items[0].dims if dims is None else dims
        binary = items[0].binary if binary is None else binary
        for item in items:
            _check_compatible(item, dims, binary)
        counts = np.array([len(a) for a in items], dtype=np.int32)
        width = vector_bytes(dims, True) if binary else dims
        dtype = np.uint8 if binary else np.float32
        words = np.concatenate([a.words for a in items]) if items else np.empty(0, np.int64)
        if len(words) and (words.min() < 0 or words.max() >= num_words):
            raise ValueError(f"word ids outside 0..{num_words - 1}")
        vectors = np.concatenate([a.vectors for a in items]) if items else np.empty((0, width), dtype)
        images = np.repeat(np.arange(len(items), dtype=np.int32), counts)
        order = np.argsort(words, kind="stable")  # by word; images stay ascending within a word
        offsets = np.zeros(num_words + 1, dtype=np.int64)
        np.cumsum(np.bincount(words, minlength=num_words), out=offsets[1:])
        gamma = np.array([a.gamma for a in items], dtype=np.float32)
        return cls(offsets, images[order], np.ascontiguousarray(vectors[order], dtype=dtype), gamma, counts, dims)

    def scores(self, query: Aggregated, sigma: Selectivity = ASMK_SELECTIVITY) -> np.ndarray:
        """(N,) float32: K(query, image) for every database image.

        The similarities of every (query word, database entry of that word) pair are computed with array
        operations over all database images at once, sigma applied, and the per-image sums taken by one
        ``np.bincount``. Float vectors: one matrix-vector product per query word over that word's contiguous
        block of entries (reads the blocks in place; 4x faster here than gathering copies). Binary codes: all
        pairs gathered at once (the copies are small), XOR + popcount.
        """
        _check_compatible(query, self.dims, self.binary)
        if len(query) == 0 or len(self) == 0:
            return np.zeros(len(self), dtype=np.float32)
        starts = self.offsets[query.words]
        stops = self.offsets[query.words + 1]
        if self.binary:
            lengths = stops - starts
            query_rows = np.repeat(np.arange(len(query)), lengths)
            entries = np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
            images = self.images[entries]
            u = np.concatenate([_code_similarity(self.vectors[entries[b:b + _SCORE_CHUNK]],
                                                 query.vectors[query_rows[b:b + _SCORE_CHUNK]], self.dims)
                                for b in range(0, len(entries), _SCORE_CHUNK)] or [np.zeros(0)])
        else:
            blocks = [(j, a, b) for j, (a, b) in enumerate(zip(starts.tolist(), stops.tolist())) if b > a]
            if not blocks:
                return np.zeros(len(self), dtype=np.float32)
            u = np.concatenate([self.vectors[a:b] @ query.vectors[j] for j, a, b in blocks])
            images = np.concatenate([self.images[a:b] for _, a, b in blocks])
        out = np.bincount(images, weights=sigma(u), minlength=len(self))
        return (out * query.gamma * self.gamma).astype(np.float32)

    def score_block(self, queries: Sequence[Aggregated], sigma: Selectivity = ASMK_SELECTIVITY) -> np.ndarray:
        """(Q, N) float32: :meth:`scores` of several queries at once, the same values up to float rounding.

        Per word, one matrix product of the queries' vectors of that word against the database's block of it
        (BLAS reads each block once per query block instead of once per query, which made the per-query loop
        memory-bound: about 60 ms a query on a 4,696-image database), sigma, and the results added into the
        images' columns. A query or image holds a word at most once (every kernel sums per word); images whose
        representation repeats a word fall back to the per-query path.
        """
        for query in queries:
            _check_compatible(query, self.dims, self.binary)
        if not self.one_entry_per_word or any(len(np.unique(q.words)) != len(q) for q in queries):
            return np.stack([self.scores(q, sigma) for q in queries]) if queries else \
                np.zeros((0, len(self)), dtype=np.float32)
        out = np.zeros((len(queries), len(self)), dtype=np.float64)
        if not queries or len(self) == 0:
            return out.astype(np.float32)
        words = np.concatenate([q.words for q in queries])
        rows = np.repeat(np.arange(len(queries)), [len(q) for q in queries])
        vectors = np.concatenate([q.vectors for q in queries])
        order = np.argsort(words, kind="stable")
        words, rows, vectors = words[order], rows[order], vectors[order]
        bounds = np.flatnonzero(np.diff(words)) + 1
        for group in np.split(np.arange(len(words)), bounds):
            if not len(group):
                continue
            word = words[group[0]]
            a, b = int(self.offsets[word]), int(self.offsets[word + 1])
            if b == a:
                continue
            if self.binary:
                n_q, n_c = len(group), b - a
                u = _code_similarity(np.repeat(vectors[group], n_c, axis=0), np.tile(self.vectors[a:b], (n_q, 1)),
                                     self.dims).reshape(n_q, n_c)
            else:
                u = vectors[group] @ self.vectors[a:b].T
            out[np.ix_(rows[group], self.images[a:b])] += sigma(u)
        gammas = np.array([q.gamma for q in queries], dtype=np.float64)
        return (out * gammas[:, None] * self.gamma[None, :]).astype(np.float32)

    @cached_property
    def one_entry_per_word(self) -> bool:
        """Every image holds each word at most once (images strictly ascending within each word's block)."""
        steps = np.diff(self.images.astype(np.int64))
        block_start = np.zeros(len(steps), dtype=bool)  # entry i + 1 starts a word's block
        starts = self.offsets[1:-1]
        block_start[starts[(starts > 0) & (starts < len(self.images))] - 1] = True
        return bool(np.all((steps > 0) | block_start))

    def image(self, index: int) -> Aggregated:
        """Image ``index``'s representation, rebuilt from the flat arrays (slow: for checks and export)."""
        entries = np.flatnonzero(self.images == index)
        words = np.searchsorted(self.offsets, entries, side="right") - 1
        return Aggregated(words.astype(np.int64), self.vectors[entries], self.dims, float(self.gamma[index]))

    def descriptor_bytes(self) -> np.ndarray:
        """(N,) bytes per image (see :meth:`Aggregated.descriptor_bytes`)."""
        return self.counts.astype(np.int64) * (word_id_bytes(self.num_words) + vector_bytes(self.dims, self.binary))

    def save(self, path: str | Path) -> None:
        """The flat arrays as one ``.npz`` (compact: no padding)."""
        np.savez(path, offsets=self.offsets, images=self.images, vectors=self.vectors, gamma=self.gamma,
                 counts=self.counts, dims=np.array(self.dims))

    @classmethod
    def load(cls, path: str | Path) -> "AggregatedDatabase":
        with np.load(path) as data:
            return cls(data["offsets"], data["images"], data["vectors"], data["gamma"], data["counts"],
                       int(data["dims"]))


class AggregatedScores(ScoreSource):
    """Scores of query representations against an :class:`AggregatedDatabase`, a query row at a time."""

    def __init__(self, queries: Sequence[Aggregated], database: AggregatedDatabase,
                 sigma: Selectivity = ASMK_SELECTIVITY):
        self.queries, self.database, self.sigma = list(queries), database, sigma
        self.num_queries, self.num_database = len(self.queries), len(database)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(self.database.score_block(self.queries[start:stop], self.sigma))


# ---------------------------------------------------------------------------------------------------------
# fixed-width rows (for caches of (N, D) arrays)


def row_width(max_words: int, dims: int, binary: bool) -> int:
    """Width of a padded row.

    float32 rows: [count, gamma, word ids (max_words; -1 = padding), vectors (max_words x d; zero padding)]
    -> 2 + max_words (1 + d). Word ids are exact in float32 below 2^24.
    uint8 rows: [count (uint32 LE), gamma (float32 LE), word ids (max_words int32 LE; -1 = padding),
    codes (max_words x ceil(d / 8))] -> 8 + max_words (4 + ceil(d / 8)).
    """
    return 8 + max_words * (4 + (dims + 7) // 8) if binary else 2 + max_words * (1 + dims)


def to_rows(items: Sequence[Aggregated], max_words: int, dims: int | None = None,
            binary: bool | None = None) -> np.ndarray:
    """(N, row_width) array of padded rows: float32 for float representations, uint8 for binary ones."""
    dims = items[0].dims if dims is None else dims
    binary = items[0].binary if binary is None else binary
    width = row_width(max_words, dims, binary)
    if binary:
        code_bytes = (dims + 7) // 8
        rows = np.zeros((len(items), width), dtype=np.uint8)
        header = rows[:, :8].view(np.uint32)  # (N, 2): count, gamma bits
        ids = rows[:, 8:8 + 4 * max_words].view(np.int32)
        codes = rows[:, 8 + 4 * max_words:].reshape(len(items), max_words, code_bytes)
    else:
        rows = np.zeros((len(items), width), dtype=np.float32)
        ids = rows[:, 2:2 + max_words]
        codes = rows[:, 2 + max_words:].reshape(len(items), max_words, dims)
    ids[:] = -1
    for i, item in enumerate(items):
        _check_compatible(item, dims, binary)
        n = len(item)
        if n > max_words:
            raise ValueError(f"image {i} has {n} words, more than the {max_words} a row holds")
        if not binary and n and item.words.max() >= 1 << 24:
            raise ValueError("word ids from 2^24 on are not exact in float32 rows")
        if binary:
            header[i, 0] = n
            header[i, 1] = np.array([item.gamma], dtype=np.float32).view(np.uint32)[0]
        else:
            rows[i, 0], rows[i, 1] = n, item.gamma
        ids[i, :n] = item.words
        codes[i, :n] = item.vectors
    return rows


def from_rows(rows: np.ndarray, dims: int) -> list[Aggregated]:
    """Inverse of :func:`to_rows` (the row dtype tells float32 from binary)."""
    rows = np.ascontiguousarray(rows)
    binary = rows.dtype == np.uint8
    if binary:
        code_bytes = (dims + 7) // 8
        max_words, rest = divmod(rows.shape[1] - 8, 4 + code_bytes)
        header = rows[:, :8].view(np.uint32)
        counts, gammas = header[:, 0].astype(np.int64), header[:, 1].copy().view(np.float32)
        ids = rows[:, 8:8 + 4 * max_words].view(np.int32)
        codes = rows[:, 8 + 4 * max_words:].reshape(len(rows), max_words, code_bytes)
    else:
        max_words, rest = divmod(rows.shape[1] - 2, 1 + dims)
        counts, gammas = rows[:, 0].astype(np.int64), rows[:, 1]
        ids = rows[:, 2:2 + max_words]
        codes = rows[:, 2 + max_words:].reshape(len(rows), max_words, dims)
    if rest:
        raise ValueError(f"row width {rows.shape[1]} does not fit {dims}-d {'binary' if binary else 'float'} rows")
    return [Aggregated(ids[i, :counts[i]].astype(np.int64), codes[i, :counts[i]].copy(), dims, float(gammas[i]))
            for i in range(len(rows))]


def rows_descriptor_bytes(rows: np.ndarray, dims: int, num_words: int) -> np.ndarray:
    """(N,) real bytes per image of padded rows (their word counts, not the padding)."""
    binary = rows.dtype == np.uint8
    counts = (np.ascontiguousarray(rows[:, :4]).view(np.uint32)[:, 0] if binary else rows[:, 0]).astype(np.int64)
    return counts * (word_id_bytes(num_words) + vector_bytes(dims, binary))
