"""The evaluation harness: one benchmark, several frozen methods, one table.

data (benchmark images) -> method.encode (descriptors, cached) -> method.scores -> benchmark metrics
-> report (printed table + JSON with the schema below, which other tools read):

    {"benchmark": str, "results": [{"method": str, "metrics": {name: float}, "descriptor_bytes": int,
                                    "images_per_second": float, "query_ms": float, ...}]}
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
from utils.errors import UserError

from .benchmarks import Benchmark
from .extract import DescriptorCache, Extraction, extract_together, safe_name
from .methods import RetrievalMethod
from .postprocess import postprocess

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    image_size: int | None = None  # None: the benchmark's default (224 labelled, 1024 revisitop)
    resize_mode: str | None = None  # None: the benchmark's convention (shorter side labelled, longer revisitop)
    batch_size: int = 16
    num_workers: int = 0  # decoding processes; 0 is fastest on a 2-core CPU (a worker competes with the network)
    device: str = "cpu"
    cache_dir: str | None = "cache/descriptors"
    top_k: int = 0  # >0: also save every query's top-k neighbours, ranked by the method's own scores
    interpolation: str = "bilinear"  # PIL filter for resizing (bilinear reproduces the published numbers)
    channels_last: bool = True  # NHWC convolutions (much faster on CPU)
    map_at_k: int | None = None  # labelled benchmarks: also report mAP@K (AP over the top K)
    # alpha-QE / alpha-DBA over this many neighbours (0: off), float inner-product methods only (postprocess.py)
    query_expansion: int = 0
    qe_alpha: float = 3.0
    dba: int = 0
    dba_alpha: float = 3.0

    def __post_init__(self):
        for name in ("image_size", "map_at_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"EvalSettings.{name} must be at least 1 (or None for the default), got {value}")
        if min(self.query_expansion, self.dba, self.qe_alpha, self.dba_alpha) < 0:
            raise UserError(f"EvalSettings: query_expansion, dba and their alphas must be >= 0, got "
                            f"{self.query_expansion}, {self.dba}, {self.qe_alpha}, {self.dba_alpha}")
        if self.batch_size < 1 or self.num_workers < 0 or self.top_k < 0:
            raise UserError(f"EvalSettings: batch_size >= 1, num_workers >= 0 and top_k >= 0 are needed, got "
                             f"{self.batch_size}, {self.num_workers}, {self.top_k}")


@dataclass
class MethodResult:
    method: str
    metrics: dict[str, float]
    descriptor_bytes: int
    images_per_second: float
    seconds: float
    config: dict = field(default_factory=dict)
    #: milliseconds to answer one query: encode it + search the database (top 10)
    query_ms: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _transform(method: RetrievalMethod, benchmark: Benchmark, settings: EvalSettings) -> EvalTransform:
    pre = method.preprocessing
    return EvalTransform(size=benchmark.default_size if settings.image_size is None else settings.image_size,
                         mode=settings.resize_mode or benchmark.resize_mode,
                         mean=tuple(pre.mean), std=tuple(pre.std), interpolation=settings.interpolation)


def _cache_key(cache: DescriptorCache, method: RetrievalMethod, benchmark: Benchmark, role: str, count: int,
               transform: EvalTransform) -> str:
    key = cache.key(method.config(), benchmark.name, role, count, transform.describe(), list(transform.mean),
                    list(transform.std))
    return f"{role}-{key}"


def _descriptors(methods: list[RetrievalMethod], role: str, benchmark: Benchmark, settings: EvalSettings,
                 cache: DescriptorCache) -> list[Extraction]:
    """Descriptors of one role (database / query) for every method: cached ones loaded, the others extracted
    together, one pass over the images per distinct transform."""
    results: list[Extraction | None] = [None] * len(methods)
    pending: dict[EvalTransform, list[int]] = {}
    for i, method in enumerate(methods):
        transform = _transform(method, benchmark, settings)
        dataset = benchmark.database_dataset(transform) if role == "database" else benchmark.query_dataset(transform)
        results[i] = cache.load(benchmark.name, method.cache_name,
                                _cache_key(cache, method, benchmark, role, len(dataset), transform), len(dataset))
        if results[i] is None:
            pending.setdefault(transform, []).append(i)
    for transform, members in pending.items():
        dataset = benchmark.database_dataset(transform) if role == "database" else benchmark.query_dataset(transform)
        group = [methods[i] for i in members]
        names = ", ".join(m.name for m in group)
        extracted = extract_together(group, dataset, settings.batch_size, settings.num_workers, settings.device,
                                     description=f"{names} {role}", channels_last=settings.channels_last,
                                     role=role)
        for i, extraction in zip(members, extracted):
            results[i] = extraction
            cache.save(benchmark.name, methods[i].cache_name,
                       _cache_key(cache, methods[i], benchmark, role, len(dataset), transform), extraction,
                       methods[i].config())
    return results


def evaluate_methods(methods: list[RetrievalMethod], benchmark: Benchmark, settings: EvalSettings | None = None,
                     together: bool = False) -> list[MethodResult]:
    """Evaluate methods on one benchmark. ``together`` extracts them in one pass over the images (sharing
    decoding and, for methods built on one backbone object, the forward pass); images/s is then the whole
    pass's. Otherwise each method is timed on its own."""
    settings = settings or EvalSettings()
    if not together:
        return [evaluate_methods([m], benchmark, settings, together=True)[0] for m in methods]
    cache = DescriptorCache(settings.cache_dir)
    start = time.perf_counter()
    for method in methods:
        if method.needs_fit():
            train = benchmark.train_set()
            if train is None:
                raise UserError(
                    f"method {method.name} is fitted on training images but {benchmark.name} has none: use a "
                    f"benchmark with a training split (flowers102, flowers102-clutter, or csv:PATH:SPLIT on a "
                    f"manifest whose split column also has 'train' rows, which are then used for fitting)")
            log.info("fitting %s on %d training images", method.name, len(train))
            method.fit(ImageDataset(train.paths, _transform(method, benchmark, settings)), train.labels)
    database = _descriptors(methods, "database", benchmark, settings, cache)
    if benchmark.queries_are_database:  # leave-one-out: asymmetric methods still describe queries as queries
        asymmetric = [m for m in methods if m.asymmetric]
        as_queries = dict(zip(map(id, asymmetric), _descriptors(asymmetric, "query", benchmark, settings, cache)))
        queries = [as_queries.get(id(m), db) for m, db in zip(methods, database)]
    else:
        queries = _descriptors(methods, "query", benchmark, settings, cache)
    results = []
    for method, db, q in zip(methods, database, queries):
        # query expansion / DBA (when asked): the ranking, metrics and saved top-k are of the expanded vectors
        q_rows, db_rows, applied = postprocess(settings, method, q.descriptors, db.descriptors,
                                               leave_one_out=benchmark.queries_are_database)
        metrics = benchmark.evaluate(method.scores(q_rows, db_rows), map_at_k=settings.map_at_k)
        if settings.top_k > 0:
            _save_top_k(method, q_rows, db_rows, settings, benchmark)
        results.append(MethodResult(
            method=method.name, metrics=metrics, descriptor_bytes=method.descriptor_bytes(db.descriptors),
            images_per_second=db.images_per_second, seconds=time.perf_counter() - start,
            config={**method.config(), **applied},
            query_ms=_query_milliseconds(method, q, db)))
    return results


def _query_milliseconds(method: RetrievalMethod, queries: Extraction, database: Extraction,
                        sample: int = 256) -> float:
    """Time to answer one query: encoding it (the query pass's rate) + a top-10 search of the database
    with the method's own scores, timed on up to ``sample`` queries."""
    sample_queries = queries.descriptors[:sample]
    start = time.perf_counter()
    method.search(sample_queries, database.descriptors, min(10, len(database.descriptors)))
    search_seconds = (time.perf_counter() - start) / max(len(sample_queries), 1)
    return 1000.0 * (1.0 / max(queries.images_per_second, 1e-9) + search_seconds)


def evaluate_method(method: RetrievalMethod, benchmark: Benchmark, settings: EvalSettings | None = None
                    ) -> MethodResult:
    return evaluate_methods([method], benchmark, settings)[0]


def _save_top_k(method: RetrievalMethod, queries: np.ndarray, database: np.ndarray, settings: EvalSettings,
                benchmark: Benchmark) -> None:
    # the method searches: only it knows how its descriptor rows compare (MSBD's hold codes + probabilities)
    scores, indices = method.search(queries, database, settings.top_k + benchmark.queries_are_database)
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
    header = ["method", *columns, "bytes", "img/s", "query ms"]
    rows = [[r["method"], *[_fmt(r["metrics"].get(c)) for c in columns], str(r["descriptor_bytes"]),
             f"{r['images_per_second']:.1f}",
             "-" if r.get("query_ms") is None else f"{r['query_ms']:.1f}"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    title = f"benchmark: {report_dict['benchmark']}"
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"
