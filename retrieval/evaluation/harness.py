"""The evaluation harness: one benchmark, several frozen methods, one table.

data (benchmark images) -> method.encode (descriptors, cached) -> method.scores -> benchmark metrics
-> report (printed table + JSON with the schema below, which other tools read):

    {"benchmark": str, "results": [{"method": str, "metrics": {name: float}, "descriptor_bytes": int,
                                    "images_per_second": float, "query_ms": float, ...}]}

**Descriptors** go through the on-disk cache (:mod:`retrieval.evaluation.descriptor_cache`), shard by shard: an
extraction holds one shard (``EvalSettings.shard_rows`` images) in memory, an interrupted one resumes after its
last finished shard on the next identical command, and the metrics read the finished array as a memory map.
Without a cache folder (``cache_dir=None``) a temporary folder, removed afterwards, plays its part.

**Cache keys and fitting.** A key (:meth:`DescriptorCache.key`) is computed *before* any method is fitted and
holds exactly: the cache format version (:data:`retrieval.evaluation.descriptor_cache.CACHE_FORMAT`), the method's
``config()``, the benchmark (name, source, a stat fingerprint of the role's image list and query boxes), the role,
the transform (its description, mean and std) and, for a method that ``needs_fit()``, a stat fingerprint of the
training images and labels it will be fitted on (the benchmark's fit set: ``--fit-on``, else its training split;
:meth:`Benchmark.fit_set`). A ``config()`` holds settings only, never fitted state (no
"fitted on"), so a key does not change when the method, or another method sharing its fitted parts, has been
fitted: keys do not depend on the order of the methods. A fit is a deterministic function of exactly those
parts (the pre-fit config holds every setting and seed, the training set is the fingerprinted one, fitting uses
the extraction's transform), so the key also identifies the fitted state (PCA, codebooks, ITQ, MSBD's pipeline),
and a method whose every descriptor set is cached is not fitted at all. Methods must therefore compute
``scores`` / ``search`` / ``descriptor_bytes`` without their fitted state (all do: code lengths and dimensions are
settings), and a new fitted method must seed its fit. Seeded is not always bit-reproducible (a PCA at another
thread count or on another device differs in its last bits or in the signs of its basis vectors, and so do the
codebook and every word assignment after it), so each entry also records the fingerprint of the fit that made
it (``RetrievalMethod.fitted_state``): a method is fitted unless its entries are all cached and record one fit,
and after a fit, cached entries of another fit are described again. An unfinished entry's shard folder records
that fingerprint too (:mod:`retrieval.search.shards` ``origin``): an interrupted extraction resumed by a run whose fit
came out differently drops the old shards (with a warning) instead of completing them with rows of its own fit.
Rows of two different fits are thus never paired, nor mixed within one entry.

**Several processes** (``accelerate launch``, ``processes=Processes(PartialState(...))``): every process runs
the same calls. The main process computes the keys and looks the cache up, then shares its decision; methods
that need it are fitted in every process (the fits are seeded; the fingerprints are checked to be the main
process's, and the shards are written under that one fingerprint); shard ``s`` is extracted by
process ``s % N`` into the shared cache folder (one machine), each process on its own device; a device-tensor
all-gather of (images, seconds) ends the pass (every shard is then on disk) and gives images/s. The main
process alone writes the cache metadata, computes the metrics and reports them; a shard's batches depend only
on its images, so the descriptors, hence the metrics, are those of a one-process run.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from msretrieval.data.datasets import ImageDataset
from msretrieval.data.image_sets import SYNTAX
from msretrieval.data.images import image_list_fingerprint
from msretrieval.data.transforms import EvalTransform
from msretrieval.retrieval.aggregation.postprocess import postprocess, ranks_by_inner_product
from msretrieval.retrieval.aggregation.whitening import WHITENINGS, learn_whitening
from msretrieval.retrieval.descriptors.extract import Extraction, extract_shards
from msretrieval.retrieval.descriptors.methods import RetrievalMethod
from msretrieval.utils.errors import UserError

from .benchmarks import Benchmark, FitSet
from .descriptor_cache import CacheEntry, DescriptorCache, safe_name
from .processes import Processes

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    image_size: int | None = None  # None: the benchmark's default (224 labelled, 1024 revisitop)
    # None: the benchmark's convention (shorter side labelled, revisitop's longer_max; data/transforms.py)
    resize_mode: str | None = None
    batch_size: int = 16
    num_workers: int = 0  # decoding processes; 0 is fastest on a 2-core CPU (a worker competes with the network)
    device: str = "cpu"
    cache_dir: str | None = "cache/descriptors"
    top_k: int = 0  # >0: also save every query's top-k neighbours, ranked by the method's own scores
    interpolation: str | None = None  # PIL filter for resizing; None: the benchmark's (bilinear; revisitop lanczos)
    channels_last: bool = True  # NHWC convolutions (much faster on CPU)
    map_at_k: int | None = None  # labelled benchmarks: also report mAP@K (AP over the top K)
    #: images per shard: descriptors are written to disk shard by shard (memory holds one shard; an interrupted
    #: extraction resumes after its last finished shard; processes share the extraction out by shards)
    shard_rows: int = 4096
    # alpha-QE / alpha-DBA over this many neighbours (0: off), float inner-product methods only (postprocess.py)
    query_expansion: int = 0
    qe_alpha: float = 3.0
    dba: int = 0
    dba_alpha: float = 3.0
    #: "pca" | "lw": whiten float inner-product descriptors (aggregation/whitening.py), learned on the benchmark's
    #: fit set (--fit-on, else its training split), before QE / DBA; whiten_dims keeps the first N directions
    whiten: str | None = None
    whiten_dims: int | None = None

    def __post_init__(self):
        if self.whiten not in (None, *WHITENINGS):
            raise UserError(f"EvalSettings.whiten must be one of {WHITENINGS} or None, got {self.whiten!r}")
        if self.whiten_dims is not None and self.whiten is None:
            raise UserError("EvalSettings.whiten_dims needs a whitening (whiten = 'pca' or 'lw')")
        for name in ("image_size", "map_at_k", "whiten_dims"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"EvalSettings.{name} must be at least 1 (or None for the default), got {value}")
        if min(self.query_expansion, self.dba, self.qe_alpha, self.dba_alpha) < 0:
            raise UserError(f"EvalSettings: query_expansion, dba and their alphas must be >= 0, got "
                            f"{self.query_expansion}, {self.dba}, {self.qe_alpha}, {self.dba_alpha}")
        if self.batch_size < 1 or self.num_workers < 0 or self.top_k < 0 or self.shard_rows < 1:
            raise UserError(f"EvalSettings: batch_size >= 1, num_workers >= 0, top_k >= 0 and shard_rows >= 1 are "
                             f"needed, got {self.batch_size}, {self.num_workers}, {self.top_k}, {self.shard_rows}")


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
                         mean=tuple(pre.mean), std=tuple(pre.std),
                         interpolation=settings.interpolation or benchmark.interpolation)


def _dataset(benchmark: Benchmark, role: str, transform) -> ImageDataset:
    return benchmark.database_dataset(transform) if role == "database" else benchmark.query_dataset(transform)


def _roles(method: RetrievalMethod, benchmark: Benchmark) -> tuple[str, ...]:
    """The descriptor sets a method needs: leave-one-out benchmarks describe their images once (as the
    database), except that asymmetric methods still describe queries as queries."""
    if benchmark.queries_are_database and not method.asymmetric:
        return ("database",)
    return ("database", "query")


def _fit_set(benchmark: Benchmark, what: str) -> FitSet:
    """The benchmark's fit set (``--fit-on``, else its training split), or one line saying how to give one."""
    fit = benchmark.fit_set()
    if fit is None:
        raise UserError(
            f"{what} is fitted on training images but {benchmark.name} has no training split: give the images "
            f"to fit on with --fit-on SPEC ({', '.join(SYNTAX.values())}; never the benchmark's own images), "
            f"or use a benchmark with a training split (flowers102, flowers102-clutter, csv:PATH:SPLIT on a "
            f"manifest that also has 'train' rows)")
    return fit


def _training_set(method: RetrievalMethod, benchmark: Benchmark):
    return _fit_set(benchmark, f"method {method.name}").images


def _cache_keys(methods: list[RetrievalMethod], benchmark: Benchmark, settings: EvalSettings
                ) -> list[dict[str, str]]:
    """Per method, {role: cache key}, computed before any fit (see the module docstring)."""
    images = {"database": image_list_fingerprint(benchmark.database_paths())}
    if any("query" in _roles(m, benchmark) for m in methods):
        images["query"] = image_list_fingerprint(benchmark.query_paths(), benchmark.query_boxes)
    training = None
    if any(m.needs_fit() for m in methods):
        training = _fit_set(benchmark, "a method").fingerprint  # the --fit-on set's, when one is given
    keys = []
    for method in methods:
        transform = _transform(method, benchmark, settings)
        fit = training if method.needs_fit() else None
        keys.append({role: f"{role}-" + DescriptorCache.key(
            method.config(), benchmark.name, benchmark.source, role, images[role], transform.describe(),
            list(transform.mean), list(transform.std), fit) for role in _roles(method, benchmark)})
    return keys


def _one_fit(extractions: list[Extraction]) -> bool:
    """Every extraction records the same fit (entries written before fits were recorded do not count)."""
    states = {extraction.fitted_state for extraction in extractions}
    return len(states) == 1 and None not in states


def _describe(methods: list[RetrievalMethod], benchmark: Benchmark, settings: EvalSettings,
              cache: DescriptorCache, processes: Processes) -> list[tuple[Extraction, Extraction]] | None:
    """(database, query) descriptors of every method: complete cache entries are used as they are (and the
    method is then not fitted); the others are fitted, then extracted together, one pass over the images per
    distinct transform, the shards shared out over the processes. Returned on the main process (memory
    maps of the cache entries); None on the others."""
    for method in methods:
        if method.needs_fit():
            _training_set(method, benchmark)  # on every process, before the main one computes the keys
    # the main process decides (stat of every image, cache look-ups); the others follow its decision
    keys = processes.share(_cache_keys(methods, benchmark, settings) if processes.is_main else None)
    counts = {"database": len(benchmark.database_paths()), "query": len(benchmark.query_paths())}
    found: dict[tuple[int, str], Extraction] = {}
    if processes.is_main:
        for i, method in enumerate(methods):
            for role, key in keys[i].items():
                extraction = cache.entry(benchmark.name, method.cache_name, key).load(counts[role])
                if extraction is not None:
                    log.info("%s descriptors of %s on %s from the cache", role, method.name, benchmark.name)
                    found[i, role] = extraction
    missing = processes.share(sorted({(i, role) for i in range(len(methods)) for role in keys[i]} - set(found))
                              if processes.is_main else None)
    # a fitted method is fitted unless all its entries are cached and come from one fit
    to_fit = processes.share(sorted(
        {i for i, _ in missing} | {i for i, method in enumerate(methods) if method.needs_fit() and not _one_fit(
            [found[i, role] for role in keys[i] if (i, role) in found])}) if processes.is_main else None)
    for i in to_fit:
        method = methods[i]
        if method.needs_fit():
            train = _training_set(method, benchmark)
            log.info("fitting %s on %d training images", method.name, len(train))
            # a fit computes statistics of inference outputs (PCA, codebook, ITQ): networks in eval mode, or
            # every BatchNorm layer would use batch statistics and overwrite its running ones
            method.eval()
            method.fit(ImageDataset(train.paths, _transform(method, benchmark, settings)), train.labels)
    fits = {i: methods[i].fitted_state() for i in to_fit}
    if processes.is_main:  # cached descriptors of another fit than this run's are described again
        for (i, role), extraction in list(found.items()):
            if i in fits and extraction.fitted_state != fits[i]:
                made_by = extraction.fitted_state or "not recorded: an older cache entry"
                log.warning("cached %s descriptors of %s were made by another fit (%s; this run's is %s): "
                            "describing them again", role, methods[i].name, made_by, fits[i])
                del found[i, role]
                missing.append((i, role))
    missing = processes.share(sorted(missing) if processes.is_main else None)
    main_fits = processes.share(fits if processes.is_main else None)
    if fits != main_fits:
        raise RuntimeError(f"process {processes.rank}: fitting gave other states than on the main process "
                           f"({fits} vs {main_fits}); their descriptors would not be comparable")
    for role in ("database", "query"):
        pending: dict[EvalTransform, list[int]] = {}
        for i, missing_role in missing:
            if missing_role == role:
                pending.setdefault(_transform(methods[i], benchmark, settings), []).append(i)
        for transform, members in pending.items():
            # methods with one cache entry (regional_search_max / _avg: the same descriptors) extract it once
            owners = {(methods[i].cache_name, keys[i][role]): i for i in reversed(members)}
            extracting = sorted(owners.values())
            entries = [cache.entry(benchmark.name, methods[i].cache_name, keys[i][role]) for i in extracting]
            rate = _extract_into(entries, [methods[i] for i in extracting], [fits[i] for i in extracting],
                                 _dataset(benchmark, role, transform), role, settings, processes)
            if processes.is_main:
                for i, entry in zip(extracting, entries):
                    entry.finish({"config": methods[i].config(), "images_per_second": rate, "role": role,
                                  "benchmark": benchmark.name, "source": benchmark.source,
                                  "fitted_state": fits[i]})  # every method extracted was in to_fit
                for i in members:
                    entry = cache.entry(benchmark.name, methods[i].cache_name, keys[i][role])
                    found[i, role] = entry.load(counts[role])
    if not processes.is_main:
        return None
    return [(found[i, "database"], found.get((i, "query"), found[i, "database"])) for i in range(len(methods))]


def _extract_into(entries: list[CacheEntry], methods: list[RetrievalMethod], fits: list[str | None],
                  dataset: ImageDataset, role: str, settings: EvalSettings, processes: Processes) -> float:
    """Extract the shards the entries lack, shard s by process s % N, all processes writing into the shared
    folders; ``fits`` are the methods' fitted states (the same on every process). Returns the images/s of this
    run over all processes (images extracted / the slowest process's time; NaN when every shard was already
    there)."""
    start = time.perf_counter()
    if processes.is_main:  # the main process starts over a folder of another layout or fit, before anyone writes
        [entry.writer(len(dataset), settings.shard_rows, fit) for entry, fit in zip(entries, fits)]
    processes.wait()
    writers = [entry.writer(len(dataset), settings.shard_rows, fit) for entry, fit in zip(entries, fits)]
    mine = range(processes.rank, len(writers[0].ranges), processes.count)
    names = ", ".join(m.name for m in methods)
    extracted = extract_shards(methods, dataset, writers, mine, settings.batch_size, settings.num_workers,
                               settings.device, description=f"{names} {role}", channels_last=settings.channels_last,
                               role=role)
    # the gather is also the barrier after which every shard is on disk
    totals = processes.gather([extracted, time.perf_counter() - start])
    images, seconds = totals[:, 0].sum(), totals[:, 1].max()
    if processes.is_main and not all(writer.complete() for writer in writers):
        raise RuntimeError(f"{names} {role}: shards are missing after every process finished extracting")
    return float(images / max(seconds, 1e-9)) if images else float("nan")


def evaluate_methods(methods: list[RetrievalMethod], benchmark: Benchmark, settings: EvalSettings | None = None,
                     together: bool = False, processes: Processes | None = None) -> list[MethodResult]:
    """Evaluate methods on one benchmark. ``together`` extracts them in one pass over the images (sharing
    decoding and, for methods built on one backbone object, the forward pass); images/s is then the whole
    pass's. Otherwise each method is timed on its own.

    With ``processes`` (several under ``accelerate launch``) every process must call this; the extraction is
    shared out and only the main process computes the metrics: it returns the results, the others an empty
    list (they have nothing left to do, and do not wait for the main process).
    """
    settings = settings or EvalSettings()
    processes = processes or Processes()
    groups = [methods] if together else [[method] for method in methods]
    with _cache(settings, processes) as cache:
        described = []
        for group in groups:
            start = time.perf_counter()
            pairs = _describe(group, benchmark, settings, cache, processes)
            if pairs is not None:
                seconds = time.perf_counter() - start
                described += [(method, db, q, seconds) for method, (db, q) in zip(group, pairs)]
        results = []
        for method, db, q, seconds in described:  # main process only
            start = time.perf_counter()
            # whitening, then query expansion / DBA (when asked): the ranking, metrics and saved top-k are of the
            # final vectors
            q_rows, db_rows, whitened = _whiten(method, q.descriptors, db.descriptors, benchmark, settings, cache)
            q_rows, db_rows, applied = postprocess(settings, method, q_rows, db_rows,
                                                   leave_one_out=benchmark.queries_are_database)
            if method.needs_fit():
                applied = {**applied, "fit_set": benchmark.fit_set().record()}
            metrics = benchmark.evaluate(method.scores(q_rows, db_rows), map_at_k=settings.map_at_k)
            if settings.top_k > 0:
                _save_top_k(method, q_rows, db_rows, settings, benchmark)
            results.append(MethodResult(
                method=method.name, metrics=metrics, descriptor_bytes=method.descriptor_bytes(db.descriptors),
                images_per_second=db.images_per_second, seconds=seconds + time.perf_counter() - start,
                config={**method.config(), **whitened, **applied}, query_ms=_query_milliseconds(method, q, db)))
    return results


def _whiten(method: RetrievalMethod, queries: np.ndarray, database: np.ndarray, benchmark: Benchmark,
            settings: EvalSettings, cache: DescriptorCache) -> tuple[np.ndarray, np.ndarray, dict]:
    """(queries, database, what was applied, for the results' config) whitened as ``settings.whiten`` asks:
    learned on the method's descriptors of the fit set, which go through the descriptor cache (role "fit")."""
    if settings.whiten is None:
        return queries, database, {}
    if not ranks_by_inner_product(method, queries, database):
        raise UserError(f"whitening applies to float descriptors ranked by inner product; method {method.name} "
                        f"is not one (evaluate it in a run without --whiten)")
    if method.needs_fit():  # its cached descriptors may come from a fit this run never made: no fit-set pass
        raise UserError(f"whitening applies to methods that are not fitted themselves; {method.name} is (a PCA, "
                        f"codebook or MSBD pipeline): evaluate it in a run without --whiten")
    fit = _fit_set(benchmark, "whitening")
    training = _fit_descriptors(method, benchmark, settings, cache, fit)
    whitening = learn_whitening(settings.whiten, training, fit.images.labels, settings.whiten_dims)
    log.info("%s: %s whitening to %d dimensions, learned on %d images of %s", method.name, settings.whiten,
             whitening.dims, len(fit.images), fit.spec)
    record = {"kind": settings.whiten, "dims": whitening.dims, "fit_set": fit.record()}
    return whitening.apply(queries), whitening.apply(database), {"whitening": record}


def _fit_descriptors(method: RetrievalMethod, benchmark: Benchmark, settings: EvalSettings, cache: DescriptorCache,
                     fit: FitSet) -> np.ndarray:
    """The (unfitted) method's descriptors of the fit set's images, resized as the benchmark's; extracted by
    this process alone (the metrics' process) into a cache entry keyed as the benchmark's own (role "fit", the
    fit set's fingerprint as its images)."""
    transform = _transform(method, benchmark, settings)
    dataset = ImageDataset(fit.images.paths, transform)
    key = "fit-" + DescriptorCache.key(method.config(), benchmark.name, benchmark.source, "fit", fit.fingerprint,
                                       transform.describe(), list(transform.mean), list(transform.std), None)
    entry = cache.entry(benchmark.name, method.cache_name, key)
    found = entry.load(len(dataset))
    if found is None:
        rate = _extract_into([entry], [method], [None], dataset, "database", settings, Processes())
        entry.finish({"config": method.config(), "images_per_second": rate, "role": "fit", "fit_set": fit.record(),
                      "benchmark": benchmark.name, "source": benchmark.source, "fitted_state": None})
        found = entry.load(len(dataset))
    return np.asarray(found.descriptors)


@contextmanager
def _cache(settings: EvalSettings, processes: Processes):
    """The descriptor cache; without a cache folder, a temporary one (made by the main process, shared with
    the others; one machine) that is removed afterwards."""
    if settings.cache_dir:
        yield DescriptorCache(settings.cache_dir)
        return
    folder = processes.share(tempfile.mkdtemp(prefix="descriptors-") if processes.is_main else None)
    try:
        yield DescriptorCache(folder)
    finally:
        if processes.is_main:
            shutil.rmtree(folder, ignore_errors=True)


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


def report(benchmark: Benchmark, results: list[MethodResult], map_at_k: int | None = None) -> dict:
    """The JSON report; a benchmark's reference rows (scores that use no pixel, e.g. the clutter set's chance
    and object-count prior) go under ``"reference"``, beside the methods' ``"results"``."""
    summary = {"benchmark": benchmark.name, "results": [r.to_json() for r in results]}
    reference = benchmark.reference_rows(map_at_k=map_at_k)
    if reference:
        summary["reference"] = reference
    return summary


def write_report(report_dict: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_dict, indent=2, default=str))


def format_table(report_dict: dict, columns: list[str] | None = None) -> str:
    """A plain-text table: one row per method, metrics as columns, then bytes and images/s; the report's
    reference rows (no descriptors: ``-`` in the last three columns) follow the methods."""
    results = report_dict["results"] + report_dict.get("reference", [])
    if columns is None:
        columns = []
        for result in results:
            columns += [name for name in result["metrics"] if name not in columns]
    header = ["method", *columns, "bytes", "img/s", "query ms"]
    rows = [[r["method"], *[_fmt(r["metrics"].get(c)) for c in columns], str(r.get("descriptor_bytes", "-")),
             "-" if r.get("images_per_second") is None else f"{r['images_per_second']:.1f}",
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
