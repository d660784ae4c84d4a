"""Benchmarks: which images are queries and database, how they are resized, and which metrics apply.

- ``flowers102`` (and ``csv:PATH[:SPLIT]`` for any manifest): a labelled, class-disjoint test split; every
  image is a query against all the others (leave-one-out); Recall@K, mAP@R and mAP (optionally mAP@K), all
  tie-aware. Shorter side -> N.
- ``revisitop:NAME`` (roxford5k, rparis6k or a user's set in that layout): Easy / Medium / Hard mAP with junk
  and mP@k. Images are resized as cnnimageretrieval-pytorch does for the published numbers (resize mode
  ``longer_max``, :mod:`data.transforms`): a database image is shrunk (never enlarged) to a longer side of at
  most N = 1024 by PIL's ``thumbnail``; a query is cropped to its ``bbx`` and the crop is shrunk to at most
  ``N * max(crop) / max(full image)`` - the crop keeps the scale of its full image, so a 300 x 200 crop of a
  1024 x 768 photo stays 300 x 200. Lanczos resampling, as the reference (``Image.ANTIALIAS``). No training
  split: fitted methods and whitening need ``--fit-on`` (another set; ``docs/evaluation.md``).
- ``flowers102-clutter``: clean Flowers-102 photos of the test classes (5 per class) as queries against
  cluttered composites, each holding exactly one soft-pasted test-class flower photo and 0-2 train-class
  distractors on a collage of train-class foliage (:mod:`data.clutter`; built into
  ``DATA_ROOT/flowers102-clutter`` from ``DATA_ROOT/flowers102`` on first use). A query's positives are the
  composites that contain its class; mAP, mAP@R (R = number of positives), R@1/2/4/8, tie-aware, as the
  labelled sets. Images are used at their own size (resize mode ``none``: the objects' scale is part of the
  benchmark); ``train_set()`` is the train composites, and ``database_boxes`` the ground-truth object boxes
  of the database (for oracle experiments). Its ``reference_rows`` (printed after the methods) are *chance*
  and the *object-count prior* (a composite scores its number of pasted objects): scores that use no pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from msretrieval.data.clutter import DEFAULT_DIRNAME as CLUTTER_NAME
from msretrieval.data.clutter import ImageBoxes, build_clutter_set, default_clutter_dir, load_clutter_set
from msretrieval.data.datasets import ImageDataset
from msretrieval.data.image_sets import load_image_set
from msretrieval.data.images import image_list_fingerprint
from msretrieval.data.manifest import LabelledImageSet, ManifestError, flowers102, read_csv_manifest
from msretrieval.data.overlap import refuse_shared_images
from msretrieval.data.revisitop import PROTOCOLS, RevisitopSet, load_revisitop
from msretrieval.data.samplers import spread_over_classes
from msretrieval.retrieval.search.scores import DenseScores, ScoreSource
from msretrieval.utils.errors import UserError

from .metrics import labelled_metrics, positive_list_metrics, revisitop_metrics


@dataclass
class Benchmark:
    """Base: subclasses give the image lists and the metrics."""

    name: str
    resize_mode: str = "shorter"
    default_size: int = 224
    #: resampling filter unless the settings choose one (bilinear reproduces the published labelled-set numbers)
    interpolation: str = "bilinear"
    #: queries are the database images themselves (extract once, leave-one-out)
    queries_are_database: bool = False
    query_boxes: list | None = field(default=None, repr=False)
    #: where the image lists come from (resolved manifest path or data folder): part of the descriptor cache
    #: key, so the same name under another data root is another benchmark
    source: str = ""
    #: the spec of :meth:`train_set` (recorded with the results of the methods fitted on it)
    train_spec: str = ""
    #: ``--fit-on``: the set methods and whitening fit on instead of :meth:`train_set` (:meth:`use_fit_set`)
    fit_on: FitSet | None = field(default=None, repr=False)

    def database_paths(self) -> list[Path]:
        raise NotImplementedError

    def query_paths(self) -> list[Path]:
        return self.database_paths()

    def test_paths(self) -> list[Path]:
        """Every image the benchmark evaluates on (database, then queries that are not database images)."""
        database = self.database_paths()
        if self.queries_are_database:
            return database
        seen = set(database)
        return database + [path for path in self.query_paths() if path not in seen]

    def database_dataset(self, transform) -> ImageDataset:
        return ImageDataset(self.database_paths(), transform)

    def query_dataset(self, transform) -> ImageDataset:
        return ImageDataset(self.query_paths(), transform, boxes=self.query_boxes)

    def evaluate(self, scores: ScoreSource, map_at_k: int | None = None) -> dict[str, float]:
        """The benchmark's metrics; ``map_at_k`` adds AP over the top K where the benchmark defines it."""
        raise NotImplementedError

    def train_set(self) -> LabelledImageSet | None:
        """The benchmark's own training split, if it has one (never the test images)."""
        return None

    def use_fit_set(self, spec: str, images: LabelledImageSet) -> None:
        """Fit methods and whitening on ``images`` (named by ``spec``) instead of :meth:`train_set`. A set that
        shares an image with the benchmark's database or queries, by path or by content, is refused
        (:mod:`data.overlap`)."""
        refuse_shared_images(images.paths, self.test_paths(), what=f"the fit set {spec}",
                             against=f"benchmark {self.name}'s database and queries",
                             advice="Fit on images the benchmark does not evaluate (another set)")
        self.fit_on = FitSet(spec, images)

    def fit_set(self) -> FitSet | None:
        """The images fitted methods and whitening fit on: the ``--fit-on`` set if one was given, else the
        benchmark's training split; None if there is neither."""
        if self.fit_on is not None:
            return self.fit_on
        own = self.train_set()
        return None if own is None else FitSet(self.train_spec or f"{self.name}:train", own)

    def reference_rows(self, map_at_k: int | None = None) -> list[dict]:
        """Rows the report prints after the methods: scores that look at no pixel, ``{"method", "metrics",
        "config"}`` each (none here; the clutter benchmark has two)."""
        return []


@dataclass(frozen=True)
class FitSet:
    """Labelled images that methods (PCA, codebooks, ITQ, MSBD...) and whitening are fitted on."""

    spec: str
    images: LabelledImageSet

    @property
    def fingerprint(self) -> str:
        """Stat fingerprint of the paths and labels (:func:`image_list_fingerprint`), taken anew at each call
        (an image replaced between two evaluations changes it): part of the descriptor cache key of every
        fitted method."""
        return image_list_fingerprint(self.images.paths, labels=self.images.labels)

    def record(self) -> dict:
        """What a result's ``config`` says about the fit set."""
        return {"spec": self.spec, "name": self.images.name, "images": len(self.images),
                "classes": self.images.num_classes, "fingerprint": self.fingerprint}


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
    """Revisited Oxford / Paris layout (:mod:`data.revisitop`): images resized by the published rule (see the
    module docstring: crop, then the full image's scale, shrink only, Lanczos); no training split."""

    dataset: RevisitopSet | None = None

    def __post_init__(self):
        self.resize_mode, self.default_size, self.interpolation = "longer_max", 1024, "lanczos"
        self.query_boxes = self.dataset.query_boxes

    def database_paths(self) -> list[Path]:
        return self.dataset.database_paths

    def query_paths(self) -> list[Path]:
        return self.dataset.query_paths

    def evaluate(self, scores: ScoreSource, map_at_k: int | None = None) -> dict[str, float]:
        if map_at_k is not None:
            raise UserError("mAP@K is a labelled-set metric; revisitop benchmarks report mAP and mP@k")
        return revisitop_metrics(scores, {p: self.dataset.protocol(p) for p in PROTOCOLS})


@dataclass
class ClutterBenchmark(Benchmark):
    """Clean query photos against cluttered composites (:mod:`data.clutter`); see the module docstring.

    ``database.labels[i]`` are the classes pasted into database image ``i`` and ``database_boxes[i]`` their
    (n, 4) normalised ``[x1, y1, x2, y2]`` boxes (paste order; multiply by the image side for pixels).
    """

    queries: LabelledImageSet | None = None
    database: ImageBoxes | None = None
    training: ImageBoxes | None = None

    def __post_init__(self):
        self.queries_are_database = False
        self.resize_mode, self.default_size = "none", 448

    @classmethod
    def from_folder(cls, root: str | Path, name: str | None = None) -> "ClutterBenchmark":
        clutter = load_clutter_set(root)
        canvas = clutter.params.get("params", {}).get("canvas", 448)
        bench = cls(name=name or Path(root).name, queries=clutter.queries, database=clutter.test,
                    training=clutter.train if len(clutter.train) else None)
        bench.default_size = int(canvas)
        return bench

    @property
    def database_boxes(self) -> list[np.ndarray]:
        return list(self.database.boxes)

    @property
    def database_classes(self) -> list[np.ndarray]:
        return list(self.database.labels)

    def database_paths(self) -> list[Path]:
        return list(self.database.paths)

    def query_paths(self) -> list[Path]:
        return list(self.queries.paths)

    def positives(self) -> list[np.ndarray]:
        """Per query, the (sorted) database indices of the composites that contain its class."""
        members: dict[int, list[int]] = {}
        for i, classes in enumerate(self.database.labels):
            for c in np.unique(classes):
                members.setdefault(int(c), []).append(i)
        return [np.asarray(members.get(int(c), []), dtype=np.int64) for c in self.queries.labels]

    def evaluate(self, scores: ScoreSource, map_at_k: int | None = None) -> dict[str, float]:
        if scores.shape != (len(self.queries), len(self.database)):
            raise ValueError(f"scores of shape {scores.shape}, benchmark {self.name} has "
                             f"{len(self.queries)} queries x {len(self.database)} database images")
        return positive_list_metrics(scores, self.positives(), map_at_k=map_at_k)

    def object_counts(self) -> np.ndarray:
        """Per database composite, how many objects were pasted into it (its rows in boxes.csv)."""
        return np.asarray([len(labels) for labels in self.database.labels], dtype=np.int64)

    def reference_rows(self, map_at_k: int | None = None) -> list[dict]:
        """``chance``: every composite scores the same, so the tie-aware metrics give their expectation over
        random orders; ``object-count prior``: a composite scores its number of pasted objects (no pixels).
        A benchmark that rewards finding the object keeps the prior at chance."""
        shape = (len(self.queries), len(self.database))
        counts = torch.from_numpy(self.object_counts()).double()
        rows = [("chance", torch.zeros(shape, dtype=torch.float64), "every database image scores 0"),
                ("object-count prior", counts[None, :].expand(shape),
                 "a database image scores its number of pasted objects")]
        return [{"method": name, "metrics": self.evaluate(DenseScores(scores), map_at_k=map_at_k),
                 "config": {"reference": note}} for name, scores, note in rows]

    def train_set(self) -> LabelledImageSet | None:
        """The train composites, each labelled by the class of its first pasted object (``extra["class_ids"]``
        lists all of them)."""
        if self.training is None:
            return None
        keep = [i for i, labels in enumerate(self.training.labels) if len(labels)]
        return LabelledImageSet(
            name=f"{self.name}-train", paths=tuple(self.training.paths[i] for i in keep),
            labels=np.asarray([self.training.labels[i][0] for i in keep], dtype=np.int64),
            extra={"class_ids": tuple(" ".join(map(str, self.training.labels[i])) for i in keep)})

    def limit(self, count: int) -> None:
        """Keep the first ``count`` database composites and ``count`` queries dealt round-robin over their
        classes (smoke tests only)."""
        self.database = self.database.subset(range(min(count, len(self.database))))
        self.queries = self.queries.subset(spread_over_classes(self.queries.labels, count))
        self.name = f"{self.name}[:{count}]"


def create_benchmark(spec: str, data_root: str | Path, limit: int | None = None, fit_on: str | None = None
                     ) -> Benchmark:
    """``flowers102`` | ``flowers102-clutter`` | ``csv:PATH[:SPLIT]`` | ``revisitop:NAME``.

    ``flowers102-clutter`` is built (seed 0, default parameters, about 100 CPU-seconds) into
    ``DATA_ROOT/flowers102-clutter`` from ``DATA_ROOT/flowers102`` the first time it is used.
    ``limit`` keeps N images of a labelled set, taken round-robin over its classes (for the clutter set: the
    first N composites and N queries round-robin over classes); smoke tests only, never for reported numbers.
    ``fit_on``: the set fitted methods and whitening fit on instead of the benchmark's training split
    (:func:`data.image_sets.load_image_set`; refused if it shares images with the benchmark, checked before
    ``limit``).
    """
    data_root = Path(data_root)
    if spec == "flowers102":
        images, training = flowers102(data_root, "test"), flowers102(data_root, "train")
        bench = LabelledBenchmark(name="flowers102", images=images, training=training, train_spec="flowers102:train")
        bench.source = str((data_root / "flowers102" / "labels.csv").resolve())
    elif spec == CLUTTER_NAME:
        root = build_clutter_set(data_root / "flowers102", default_clutter_dir(data_root))
        bench = ClutterBenchmark.from_folder(root, name=CLUTTER_NAME)
        bench.source, bench.train_spec = str(Path(root).resolve()), f"{CLUTTER_NAME}:train"
    elif spec.startswith("csv:"):
        path, _, split = spec[4:].partition(":")
        images = read_csv_manifest(path, split=split or None)
        bench = LabelledBenchmark(name=f"csv:{Path(path).parent.name}{':' + split if split else ''}", images=images,
                                  training=_training_rows(path, split), train_spec=f"csv:{path}:train",
                                  source=f"{Path(path).resolve()}{':' + split if split else ''}")
    elif spec.startswith("revisitop:"):
        name = spec.split(":", 1)[1]
        bench = RevisitopBenchmark(name=name, dataset=load_revisitop(data_root, name),
                                   source=str((data_root / name).resolve()))
    else:
        raise UserError(f"unknown benchmark {spec!r}; use flowers102, {CLUTTER_NAME}, csv:PATH[:SPLIT] or "
                         "revisitop:NAME")
    if fit_on is not None:
        bench.use_fit_set(fit_on, load_image_set(fit_on, data_root))
    if limit is not None and isinstance(bench, ClutterBenchmark):
        bench.limit(limit)
    if limit is not None and isinstance(bench, LabelledBenchmark):
        bench.images = bench.images.subset(spread_over_classes(bench.images.labels, limit))
        bench.name = f"{bench.name}[:{limit}]"
    return bench


def benchmark_test_images(spec: str, data_root: str | Path) -> list[Path]:
    """Every image benchmark ``spec`` evaluates on (:meth:`Benchmark.test_paths`), without building anything:
    for a ``flowers102-clutter`` set not built yet, the Flowers-102 test photos its queries are drawn from
    (its composites do not exist yet, so nothing can share them)."""
    if spec == CLUTTER_NAME:
        try:
            return ClutterBenchmark.from_folder(default_clutter_dir(data_root)).test_paths()
        except UserError:  # not built (or not readable): it will be (re)built from these photos
            return list(flowers102(data_root, "test").paths)
    return create_benchmark(spec, data_root).test_paths()


def _training_rows(path: str, split: str) -> LabelledImageSet | None:
    """The manifest's ``train`` rows, for methods that fit on training images, when the evaluated split is
    another one (``csv:PATH:test``); None otherwise."""
    if not split or split == "train":
        return None
    try:
        return read_csv_manifest(path, split="train")
    except ManifestError:  # no split column, or no train rows
        return None
