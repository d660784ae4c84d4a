"""Visual-word codebooks: FAISS k-means on training local descriptors, cached on disk, nearest-word assignment.

A codebook is fitted once per (descriptor source, size, k-means settings) and stored as
``<cache_dir>/codebook-<key>.npy`` (the (C, d) float32 centroids) next to ``codebook-<key>.json`` (the config
it was made with). ``key`` is a hash of that config (:func:`codebook_config`: the format version
:data:`CODEBOOK_FORMAT`, words, k-means iterations, seed, sample, points per centroid, and ``source``), so a
second run with the same config loads the file and any change makes a new one. The cache trusts ``source``: it
must identify the descriptors; the descriptors themselves are not hashed, so a cached codebook loads without
extracting any of them. The match kernels' source (:class:`retrieval.aggregation.match_kernels.LocalVocabulary`) is the
local-feature settings (backbone and weights, tap, features, scales, PCA dims and seed), the chosen training
images (stat fingerprint) and transform, and a fingerprint of the whole fitted PCA (mean and basis).

Assignment is exact nearest-centroid search in squared L2 (``faiss.IndexFlatL2``); ``k`` > 1 gives the ``k``
nearest words per descriptor, nearest first (multiple assignment).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import faiss
import numpy as np

from msretrieval.utils.errors import UserError

log = logging.getLogger(__name__)

#: The codebook format, part of every codebook's config (hence key). Bump it whenever the codebook a config
#: produces changes without the config changing: the k-means or sampling code, or the local descriptors it is
#: fitted on (a change to local feature extraction changes the kernels' descriptors too: bump
#: ``retrieval.evaluation.descriptor_cache.CACHE_FORMAT`` as well).
CODEBOOK_FORMAT = 1

Descriptors = Union[np.ndarray, Callable[[], np.ndarray]]


@dataclass
class Codebook:
    centroids: np.ndarray                      # (C, d) float32
    config: dict = field(default_factory=dict)  # how it was made (saved next to the centroids)

    def __post_init__(self):
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        if self.centroids.ndim != 2:
            raise ValueError(f"centroids must be (C, d), got shape {self.centroids.shape}")
        self._index = None

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    @property
    def dims(self) -> int:
        return self.centroids.shape[1]

    def _flat_index(self) -> faiss.IndexFlatL2:
        if self._index is None:
            self._index = faiss.IndexFlatL2(self.dims)
            self._index.add(self.centroids)
        return self._index

    def assign(self, descriptors: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) descriptors -> (words (n, k) int64, squared distances (n, k)), nearest word first."""
        x = np.ascontiguousarray(descriptors, dtype=np.float32).reshape(-1, self.dims)
        if not 1 <= k <= self.size:
            raise ValueError(f"k must be in 1..{self.size}, got {k}")
        if len(x) == 0:
            return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float32)
        distances, words = self._flat_index().search(x, k)
        return words.astype(np.int64, copy=False), distances

    @classmethod
    def fit(cls, descriptors: np.ndarray, words: int, niter: int = 20, seed: int = 0,
            max_points_per_centroid: int = 256, config: dict | None = None) -> "Codebook":
        """FAISS k-means (initial centroids: random training points drawn with ``seed``; FAISS subsamples to
        ``max_points_per_centroid`` x ``words`` points)."""
        x = np.ascontiguousarray(descriptors, dtype=np.float32)
        if x.ndim != 2 or len(x) < words:
            raise UserError(f"a {words}-word codebook needs at least {words} descriptors, got shape {x.shape}")
        kmeans = faiss.Kmeans(x.shape[1], words, niter=niter, seed=seed, verbose=False,
                              max_points_per_centroid=max_points_per_centroid)
        kmeans.train(x)
        return cls(kmeans.centroids.copy(), dict(config or {}))

    def save(self, stem: str | Path) -> None:
        """Write ``stem.npy`` and ``stem.json`` (each via a temporary file, then renamed)."""
        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        tmp = stem.with_name(f"{stem.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, self.centroids)
        os.replace(tmp, stem.with_suffix(".npy"))
        tmp_json = stem.with_name(f"{stem.name}.{os.getpid()}.tmp.json")
        tmp_json.write_text(json.dumps(self.config, indent=2, sort_keys=True, default=str))
        os.replace(tmp_json, stem.with_suffix(".json"))

    @classmethod
    def load(cls, stem: str | Path) -> "Codebook":
        stem = Path(stem)
        config = json.loads(stem.with_suffix(".json").read_text())
        return cls(np.load(stem.with_suffix(".npy")), config)


def codebook_key(config: dict) -> str:
    """16 hex digits identifying a codebook config (order of dict keys does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def codebook_config(words: int, source: dict, niter: int = 20, seed: int = 0, sample: int | None = None,
                    max_points_per_centroid: int = 256) -> dict:
    return {"kind": "faiss.Kmeans", "format": CODEBOOK_FORMAT, "words": int(words), "niter": int(niter),
            "seed": int(seed), "sample": sample, "max_points_per_centroid": int(max_points_per_centroid),
            "source": source}


def fit_or_load_codebook(descriptors: Descriptors, words: int, cache_dir: str | Path | None, source: dict,
                         niter: int = 20, seed: int = 0, sample: int | None = None,
                         max_points_per_centroid: int = 256) -> Codebook:
    """The codebook of this config from ``cache_dir`` if present, else fitted (and saved there).

    ``descriptors``: the training local descriptors (N, d), or a zero-argument function returning them (only
    called when the codebook must be fitted). ``sample``: fit on a seeded random subset of that many rows.
    ``cache_dir=None`` always fits and saves nothing.
    """
    config = codebook_config(words, source, niter, seed, sample, max_points_per_centroid)
    stem = Path(cache_dir) / f"codebook-{codebook_key(config)}" if cache_dir is not None else None
    if stem is not None and stem.with_suffix(".npy").is_file() and stem.with_suffix(".json").is_file():
        try:
            codebook = Codebook.load(stem)
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable codebook %s (%s)", stem, error)
        else:
            if codebook.size == words and codebook.config == json.loads(json.dumps(config, default=str)):
                log.info("codebook of %d words from cache %s", words, stem.with_suffix(".npy"))
                return codebook
            log.warning("ignoring codebook %s: its config does not match", stem)
    x = descriptors() if callable(descriptors) else descriptors
    x = np.ascontiguousarray(x, dtype=np.float32)
    if sample is not None and sample < len(x):
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), sample, replace=False))]
    start = time.perf_counter()
    codebook = Codebook.fit(x, words, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                            config=config)
    log.info("codebook: %d words from %d x %d descriptors in %.1f s", words, *x.shape, time.perf_counter() - start)
    if stem is not None:
        codebook.save(stem)
    return codebook
