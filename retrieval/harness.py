"""The evaluation harness: one benchmark, several frozen methods, one table.

data (benchmark images) -> method.encode (descriptors, cached) -> method.scores -> benchmark metrics
-> report (printed table + JSON with the schema below, which other tools read):

    {"benchmark": str, "results": [{"method": str, "metrics": {name: float}, "descriptor_bytes": int,
                                    "images_per_second": float, ...}]}
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data.datasets import ImageDataset
from data.transforms import EvalTransform

from .benchmarks import Benchmark
from .extract import DescriptorCache, Extraction, safe_name, extract
from .index import SearchIndex
from .methods import RetrievalMethod

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    image_size: int | None = None  # None: the benchmark's default (224 labelled, 1024 revisitop)
    resize_mode: str | None = None  # None: the benchmark's convention (shorter side labelled, longer revisitop)
    batch_size: int = 4
    num_workers: int = 1
    device: str = "cpu"
    cache_dir: str | None = "cache/descriptors"
    top_k: int = 0  # >0: also search the top-k neighbours of every query with FAISS and save them
    interpolation: str = "bilinear"  # PIL filter for resizing (bilinear reproduces the published numbers)


@dataclass
class MethodResult:
    method: str
    metrics: dict[str, float]
    descriptor_bytes: int
    images_per_second: float
    seconds: float
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _transform(method: RetrievalMethod, benchmark: Benchmark, settings: EvalSettings) -> EvalTransform:
    pre = method.preprocessing
    return EvalTransform(size=settings.image_size or benchmark.default_size,
                         mode=settings.resize_mode or benchmark.resize_mode,
                         mean=tuple(pre.mean), std=tuple(pre.std), interpolation=settings.interpolation)


def _descriptors(method: RetrievalMethod, dataset: ImageDataset, role: str, benchmark: Benchmark,
                 transform: EvalTransform, settings: EvalSettings, cache: DescriptorCache) -> Extraction:
    key = cache.key(method.config(), benchmark.name, role, len(dataset), transform.describe(),
                    list(transform.mean), list(transform.std))
    cached = cache.load(benchmark.name, method.name, f"{role}-{key}", len(dataset))
    if cached is not None:
        return cached
    result = extract(method, dataset, settings.batch_size, settings.num_workers, settings.device,
                     description=f"{method.name} {role}")
    cache.save(benchmark.name, method.name, f"{role}-{key}", result, method.config())
    return result


def evaluate_method(method: RetrievalMethod, benchmark: Benchmark, settings: EvalSettings | None = None
                    ) -> MethodResult:
    settings = settings or EvalSettings()
    cache = DescriptorCache(settings.cache_dir)
    transform = _transform(method, benchmark, settings)
    start = time.perf_counter()
    if method.needs_fit():
        train = benchmark.train_set()
        if train is None:
            raise ValueError(f"method {method.name} needs training images but {benchmark.name} has none")
        log.info("fitting %s on %d training images", method.name, len(train))
        method.fit(ImageDataset(train.paths, transform), train.labels)
    database = _descriptors(method, benchmark.database_dataset(transform), "database", benchmark, transform,
                            settings, cache)
    if benchmark.queries_are_database:
        queries = database
    else:
        queries = _descriptors(method, benchmark.query_dataset(transform), "query", benchmark, transform,
                               settings, cache)
    metrics = benchmark.evaluate(method.scores(queries.descriptors, database.descriptors))
    if settings.top_k > 0:
        _save_top_k(method, queries.descriptors, database.descriptors, settings, benchmark)
    return MethodResult(
        method=method.name, metrics=metrics, descriptor_bytes=method.descriptor_bytes(database.descriptors),
        images_per_second=database.images_per_second, seconds=time.perf_counter() - start,
        config=method.config())


def _save_top_k(method, queries, database, settings: EvalSettings, benchmark: Benchmark) -> None:
    metric = "hamming" if method.descriptor_kind == "binary" else "inner_product"
    scores, indices = SearchIndex(database, metric).search(queries, settings.top_k + benchmark.queries_are_database)
    if benchmark.queries_are_database:  # drop each query's own entry
        keep = indices != np.arange(len(indices))[:, None]
        indices = np.stack([row[k][:settings.top_k] for row, k in zip(indices, keep)])
        scores = np.stack([row[k][:settings.top_k] for row, k in zip(scores, keep)])
    folder = Path(settings.cache_dir or ".") / "topk"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{safe_name(benchmark.name)}-{safe_name(method.name)}.npz"
    np.savez(path, indices=indices, scores=scores)
    log.info("top-%d neighbours of %s saved to %s", settings.top_k, method.name, path)


def report(benchmark: Benchmark, results: list[MethodResult]) -> dict:
    return {"benchmark": benchmark.name, "results": [r.to_json() for r in results]}


def write_report(report_dict: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_dict, indent=2, default=str))


def format_table(report_dict: dict, columns: list[str] | None = None) -> str:
    """A plain-text table: one row per method, metrics as columns, then bytes and images/s."""
    results = report_dict["results"]
    if columns is None:
        columns = []
        for result in results:
            columns += [name for name in result["metrics"] if name not in columns]
    header = ["method", *columns, "bytes", "img/s"]
    rows = [[r["method"], *[_fmt(r["metrics"].get(c)) for c in columns], str(r["descriptor_bytes"]),
             f"{r['images_per_second']:.1f}"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    title = f"benchmark: {report_dict['benchmark']}"
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"
