"""Benchmarks: which images are queries and database, how they are resized, and which metrics apply.

- ``flowers102`` (and ``csv:PATH[:SPLIT]`` for any manifest): a labelled, class-disjoint test split; every
  image is a query against all the others (leave-one-out); Recall@K, mAP@R and mAP (optionally mAP@K), all
  tie-aware. Shorter side -> N.
- ``revisitop:NAME`` (roxford5k, rparis6k or a user's set in that layout): queries cropped to their box;
  Easy / Medium / Hard mAP with junk and mP@k. Longer side -> N, the convention of those benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.datasets import ImageDataset
from data.manifest import LabelledImageSet, flowers102, read_csv_manifest
from data.revisitop import PROTOCOLS, RevisitopSet, load_revisitop

from .metrics import labelled_metrics, revisitop_metrics
from .scores import ScoreSource


@dataclass
class Benchmark:
    """Base: subclasses give the image lists and the metrics."""

    name: str
    resize_mode: str = "shorter"
    default_size: int = 224
    #: queries are the database images themselves (extract once, leave-one-out)
    queries_are_database: bool = False
    query_boxes: list | None = field(default=None, repr=False)

    def database_paths(self) -> list[Path]:
        raise NotImplementedError

    def query_paths(self) -> list[Path]:
        return self.database_paths()

    def database_dataset(self, transform) -> ImageDataset:
        return ImageDataset(self.database_paths(), transform)

    def query_dataset(self, transform) -> ImageDataset:
        return ImageDataset(self.query_paths(), transform, boxes=self.query_boxes)

    def evaluate(self, scores: ScoreSource, map_at_k: int | None = None) -> dict[str, float]:
        """The benchmark's metrics; ``map_at_k`` adds AP over the top K where the benchmark defines it."""
        raise NotImplementedError

    def train_set(self) -> LabelledImageSet | None:
        """Images a method may ``fit`` on (never the test images)."""
        return None


@dataclass
class LabelledBenchmark(Benchmark):
    images: LabelledImageSet | None = None
    training: LabelledImageSet | None = None

    def __post_init__(self):
        self.queries_are_database = True

    def database_paths(self) -> list[Path]:
        return list(self.images.paths)

    def evaluate(self, scores: ScoreSource, map_at_k: int | None = None) -> dict[str, float]:
        return labelled_metrics(scores, self.images.labels, self.images.labels, exclude_self=True, map_at_k=map_at_k)

    def train_set(self) -> LabelledImageSet | None:
        return self.training


@dataclass
class RevisitopBenchmark(Benchmark):
    dataset: RevisitopSet | None = None

    def __post_init__(self):
        self.resize_mode, self.default_size = "longer", 1024
        self.query_boxes = self.dataset.query_boxes

    def database_paths(self) -> list[Path]:
        return self.dataset.database_paths

    def query_paths(self) -> list[Path]:
        return self.dataset.query_paths

    def evaluate(self, scores: ScoreSource, map_at_k: int | None = None) -> dict[str, float]:
        if map_at_k is not None:
            raise ValueError("mAP@K is a labelled-set metric; revisitop benchmarks report mAP and mP@k")
        return revisitop_metrics(scores, {p: self.dataset.protocol(p) for p in PROTOCOLS})


def create_benchmark(spec: str, data_root: str | Path, limit: int | None = None) -> Benchmark:
    """``flowers102`` | ``csv:PATH[:SPLIT]`` | ``revisitop:NAME``.

    ``limit`` keeps N images of a labelled set, taken round-robin over its classes (smoke tests only: never
    for reported numbers).
    """
    data_root = Path(data_root)
    if spec == "flowers102":
        images, training = flowers102(data_root, "test"), flowers102(data_root, "train")
        bench = LabelledBenchmark(name="flowers102", images=images, training=training)
    elif spec.startswith("csv:"):
        path, _, split = spec[4:].partition(":")
        images = read_csv_manifest(path, split=split or None)
        bench = LabelledBenchmark(name=f"csv:{Path(path).parent.name}{':' + split if split else ''}", images=images)
    elif spec.startswith("revisitop:"):
        name = spec.split(":", 1)[1]
        bench = RevisitopBenchmark(name=name, dataset=load_revisitop(data_root, name))
    else:
        raise ValueError(f"unknown benchmark {spec!r}; use flowers102, csv:PATH[:SPLIT] or revisitop:NAME")
    if limit is not None and isinstance(bench, LabelledBenchmark):
        bench.images = bench.images.subset(_spread_over_classes(bench.images.labels, limit))
        bench.name = f"{bench.name}[:{limit}]"
    return bench



def _spread_over_classes(labels: np.ndarray, limit: int) -> np.ndarray:
    """The first ``limit`` indices when images are dealt one per class in turn (deterministic)."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_class = np.arange(len(labels)) - starts
    dealt = order[np.lexsort((sorted_labels, rank_in_class))]
    return np.sort(dealt[:limit])
