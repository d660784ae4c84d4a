#!/usr/bin/env python
"""Benchmark: exact top-k search over 64-bit binary codes versus 512-D float descriptors, with FAISS.

Random data: Q queries against N packed codes (``SearchIndex(metric="hamming")``, FAISS IndexBinaryFlat)
and Q queries against N L2-normalised float32 vectors (``SearchIndex()``, FAISS flat inner product, CPU).
Times are of the search alone (index built beforehand), median of a few runs; CPU time is summed over
threads. Memory is the database payload (N x bytes per item) and the growth of the process's resident set
from before the database was made to after the index was built and the input array freed, i.e. what the
index holds. On a machine busy with other jobs, FAISS's OpenMP threads wait for each other at every
barrier and multi-threaded wall times swing widely; ``--threads 1`` and the CPU times are steadier there.

**Two-stage search** (``retrieval.search.two_stage``; ``--shortlists 100,1000``, ``--shortlists ""`` skips it):
random codes have no float descriptors they came from, so this part has its own data, where the codes derive
from the floats. Float descriptors are a mixture of clusters: ``database / cluster-size`` centres drawn from
N(0, diag(s^2)) with a power-law spectrum s_d = d^(-decay / 2) (d = 1..D: a few dimensions dominate, as in
real descriptors), each item a random centre plus ``noise`` x N(0, diag(s^2)), L2-normalised; queries are
drawn the same way (from the same centres). The database is written to a temporary ``.npy`` (``--tmp-dir``;
D x 4 bytes an item on disk) and the codes are ITQ (``--codes itq``) or PCA signs (``--codes pcasign``) of
the floats, fitted on the first ``--fit-sample`` items. Rows, every one searched for the top k:

- flat float: exact inner product over the floats in memory (FAISS flat), the reference top k;
- Hamming flat: exact Hamming search of the codes alone;
- two-stage R (``--shortlists``): a Hamming shortlist of R from the codes in memory, re-ranked by the floats
  read from the file (positional reads of the shortlisted rows; nothing of the file is mapped);
- two-stage R asym (``--asym-shortlists``): the shortlist of R by asymmetric scores (the queries' ITQ / PCA
  projections against the codes), taken by FAISS's fast scan (``retrieval.search.fast_scan``; ``--exact-asymmetric``:
  the exact scan of every code, much slower), re-ranked the same way.

Recall@k is the fraction of the exact float top k found in a row's top k. RSS+ is the resident-set growth
from before the row's index was built to after its search: it counts the index's own memory (for two-stage,
FAISS's copy of the codes, beside the codes array itself, which "DB MB" counts); the rows two-stage reads are
copied out of the kernel's page cache (shared and reclaimable, not the process's). The file was just written, so
its pages are normally in the page cache: times are of a warm cache, not of a cold disk.

    python scripts/bench_binary_search.py                       # 1,000 x 1,000,000, 64 bits vs 512-D
    python scripts/bench_binary_search.py --database 20000      # a quick check
    python scripts/bench_binary_search.py --threads 1 --json bench.json
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from msretrieval.models.hashing import SignCodes, learn_itq, learn_pca_signs
from msretrieval.utils.cli import benchmark_main, run_cli
from msretrieval.retrieval.search.binary import pack_bits
from msretrieval.retrieval.search.index import SearchIndex
from msretrieval.retrieval.search.two_stage import TwoStageIndex

#: rows of random float vectors made at a time (bounds the generator's temporaries)
FLOAT_CHUNK = 65536


def resident_bytes() -> int | None:
    """Current RSS from /proc (Linux); None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * resource.getpagesize()


def random_codes(rng: np.random.Generator, count: int, bits: int) -> np.ndarray:
    return rng.integers(0, 256, (count, bits // 8), dtype=np.uint8)


def random_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, FLOAT_CHUNK):
        block = rng.standard_normal((min(FLOAT_CHUNK, count - start), dim), dtype=np.float32)
        vectors[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return vectors


def measure(kind: str, args: argparse.Namespace) -> dict:
    """Build one index over random data, then time ``args.repeats`` searches of the same queries."""
    rng = np.random.default_rng(args.seed)
    make = (lambda count: random_codes(rng, count, args.bits)) if kind == "binary" else \
        (lambda count: random_vectors(rng, count, args.dim))
    metric, bytes_per_item = ("hamming", args.bits // 8) if kind == "binary" else ("inner_product", args.dim * 4)
    queries = make(args.queries)
    before = resident_bytes()
    database = make(args.database)
    start = time.perf_counter()
    index = SearchIndex(database, metric, use_gpu=False)
    build_seconds = time.perf_counter() - start
    del database  # the index holds its own copy; what remains of the growth is the index
    after = resident_bytes()
    seconds, cpu_seconds, (_, indices) = timed(lambda: index.search(queries, args.k), args.repeats)
    if indices.shape != (args.queries, min(args.k, args.database)) or (indices < 0).any():
        raise RuntimeError(f"{kind} search returned {indices.shape} results with missing neighbours")
    return {"kind": kind, "index": f"{type(index.index).__name__} ({metric})", "bytes_per_item": bytes_per_item,
            "database_bytes": bytes_per_item * args.database, "build_seconds": build_seconds,
            "search_seconds": seconds, "cpu_seconds": cpu_seconds,
            "rss_growth_bytes": after - before if before is not None and after is not None else None}


class ClusteredVectors:
    """The two-stage part's data model (see the module docstring): L2-normalised cluster centre + noise."""

    def __init__(self, rng: np.random.Generator, clusters: int, dim: int, decay: float, noise: float):
        self.rng, self.noise = rng, noise
        self.scale = (np.arange(1, dim + 1, dtype=np.float64) ** (-decay / 2)).astype(np.float32)
        self.centres = rng.standard_normal((clusters, dim), dtype=np.float32) * self.scale

    def draw(self, count: int) -> np.ndarray:
        centres = self.centres[self.rng.integers(0, len(self.centres), count)]
        vectors = centres + self.noise * self.rng.standard_normal(centres.shape, dtype=np.float32) * self.scale
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top k found in its ``found`` top k."""
    return float(np.mean([len(np.intersect1d(f, e)) / len(e) for f, e in zip(found, exact)]))


def timed(search, repeats: int) -> tuple[float, float, tuple]:
    """(median wall seconds, median CPU seconds, the last result) of ``repeats`` calls of ``search``."""
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = search()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)
    return statistics.median(seconds), statistics.median(cpu_seconds), result


def measure_two_stage(args: argparse.Namespace, folder: Path) -> dict:
    """Flat float, Hamming flat and two-stage rows on clustered data whose codes derive from its floats."""
    rng = np.random.default_rng(args.seed)
    model = ClusteredVectors(rng, max(1, args.database // args.cluster_size), args.dim, args.decay, args.noise)
    path = folder / "floats.npy"
    floats = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.database, args.dim))
    for start in range(0, args.database, FLOAT_CHUNK):
        floats[start:start + FLOAT_CHUNK] = model.draw(min(FLOAT_CHUNK, args.database - start))
    floats.flush()
    queries = model.draw(args.queries)
    sample = np.asarray(floats[:min(args.fit_sample, args.database)])
    signs: SignCodes = learn_itq(sample, args.bits) if args.codes == "itq" else learn_pca_signs(sample, args.bits)
    del sample
    codes = np.concatenate([pack_bits(signs.encode(floats[start:start + FLOAT_CHUNK]))
                            for start in range(0, args.database, FLOAT_CHUNK)])
    query_codes, query_projections = pack_bits(signs.encode(queries)), signs.project(queries).numpy()
    code_bytes, float_bytes = args.bits // 8, 4 * args.dim
    rows = []

    def row(name: str, build, search, bytes_per_item: int, exact: np.ndarray | None) -> np.ndarray:
        before = resident_bytes()
        start = time.perf_counter()
        index = build()
        build_seconds = time.perf_counter() - start
        seconds, cpu_seconds, (_, indices) = timed(lambda: search(index), args.repeats)
        after = resident_bytes()
        rows.append({"name": name, "bytes_per_item": bytes_per_item, "database_bytes": bytes_per_item * args.database,
                     "build_seconds": build_seconds, "search_seconds": seconds, "cpu_seconds": cpu_seconds,
                     "rss_growth_bytes": after - before if before is not None and after is not None else None,
                     "recall": 1.0 if exact is None else recall(indices, exact)})
        return indices

    floats.flush()
    del floats  # the flat index copies the file's rows; the mapping goes once it is built
    exact = row("flat float (exact)", lambda: SearchIndex(np.load(path, mmap_mode="r"), use_gpu=False),
                lambda index: index.search(queries, args.k), float_bytes, None)
    row("Hamming flat", lambda: SearchIndex(codes, "hamming", use_gpu=False),
        lambda index: index.search(query_codes, args.k), code_bytes, exact)
    for shortlist in args.shortlists:
        row(f"two-stage R={shortlist}", lambda: TwoStageIndex(codes, path, shortlist),
            lambda index: index.search(query_codes, queries, args.k), code_bytes, exact)
    fast_scan = not args.exact_asymmetric
    for shortlist in args.asym_shortlists:
        row(f"two-stage R={shortlist} asym" + (" fast-scan" if fast_scan else " exact"),
            lambda: TwoStageIndex(codes, path, shortlist, asymmetric=True, fast_scan=fast_scan),
            lambda index: index.search(query_projections, queries, args.k), code_bytes, exact)
    flat = rows[0]
    for measured in rows:
        measured["speedup"] = flat["search_seconds"] / measured["search_seconds"]
    return {"data": {"clusters": len(model.centres), "cluster_size": args.cluster_size, "decay": args.decay,
                     "noise": args.noise, "codes": args.codes, "fit_sample": args.fit_sample,
                     "asymmetric_fast_scan": fast_scan, "float_file_bytes": path.stat().st_size}, "rows": rows}


def run(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    binary = measure("binary", args)
    floats = measure("float", args)
    result = {"database": args.database, "queries": args.queries, "bits": args.bits, "dim": args.dim, "k": args.k,
              "threads": faiss.omp_get_max_threads(), "faiss": faiss.__version__, "binary": binary, "float": floats,
              "time_ratio": floats["search_seconds"] / binary["search_seconds"],
              "cpu_time_ratio": floats["cpu_seconds"] / max(binary["cpu_seconds"], 1e-9),
              "memory_ratio": floats["database_bytes"] / binary["database_bytes"]}
    if args.shortlists or args.asym_shortlists:
        with tempfile.TemporaryDirectory(prefix="bench-two-stage-", dir=args.tmp_dir) as folder:
            result["two_stage"] = measure_two_stage(args, Path(folder))
    return result


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def report(result: dict) -> str:
    lines = [f"{result['queries']:,} queries, {result['database']:,} items, k = {result['k']}; FAISS "
             f"{result['faiss']}, {result['threads']} thread(s); search times = median of the runs",
             f"{'database':<15} {'index':<30} {'B/item':>7} {'DB MB':>9} {'RSS+ MB':>9} {'build s':>8} "
             f"{'search s':>9} {'CPU s':>8} {'ms/query':>9}"]
    for kind, label in (("binary", f"{result['bits']}-bit codes"), ("float", f"{result['dim']}-D float32")):
        m = result[kind]
        lines.append(f"{label:<15} {m['index']:<30} {m['bytes_per_item']:>7} {_mb(m['database_bytes']):>9} "
                     f"{_mb(m['rss_growth_bytes']):>9} {m['build_seconds']:>8.3f} {m['search_seconds']:>9.3f} "
                     f"{m['cpu_seconds']:>8.3f} {1000 * m['search_seconds'] / result['queries']:>9.3f}")
    lines.append(f"float / binary: search time {result['time_ratio']:.1f}x (CPU time {result['cpu_time_ratio']:.1f}x), "
                 f"database memory {result['memory_ratio']:.0f}x")
    lines.append("RSS+ = resident-set growth from before the database was made to after the index was built and its\n"
                 "input freed: what the index holds (page-granular, noisy for small databases)")
    if "two_stage" in result:
        data = result["two_stage"]["data"]
        lines += ["", f"two-stage search: {result['bits']}-bit {data['codes']} codes in memory, "
                      f"{result['dim']}-D floats on disk ({_mb(data['float_file_bytes'])} MB file); {data['clusters']:,} clusters of about "
                      f"{data['cluster_size']} items, spectrum decay {data['decay']}, noise {data['noise']}",
                  f"{'row':<30} {'B/item':>7} {'DB MB':>9} {'RSS+ MB':>9} {'build s':>8} {'search s':>9} "
                  f"{'CPU s':>8} {'ms/query':>9} {'speed-up':>8} {'recall@' + str(result['k']):>9}"]
        for m in result["two_stage"]["rows"]:
            lines.append(f"{m['name']:<30} {m['bytes_per_item']:>7} {_mb(m['database_bytes']):>9} "
                         f"{_mb(m['rss_growth_bytes']):>9} {m['build_seconds']:>8.3f} {m['search_seconds']:>9.3f} "
                         f"{m['cpu_seconds']:>8.3f} {1000 * m['search_seconds'] / result['queries']:>9.3f} "
                         f"{m['speedup']:>7.1f}x {m['recall']:>9.3f}")
        lines.append("recall = fraction of the exact float top k found; speed-up = flat float time / the row's; "
                     "asym = the\nshortlist by asymmetric scores (fast-scan: FAISS's fast scan; exact: every code)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", type=int, default=1_000_000, help="database items (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--bits", type=int, default=64, help="binary code length (a multiple of 8)")
    parser.add_argument("--dim", type=int, default=512, help="float descriptor dimension")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="FAISS (OpenMP) threads; default: all cores")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches per index (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    two_stage = parser.add_argument_group("two-stage search (clustered data; see above)")
    two_stage.add_argument("--shortlists", default="100,1000",
                           help="comma-separated Hamming shortlist sizes R, one row each (default 100,1000)")
    two_stage.add_argument("--asym-shortlists", default="100",
                           help="comma-separated asymmetric shortlist sizes R, one row each (default 100; '' for "
                                "none; with --shortlists '' too, the part is skipped)")
    two_stage.add_argument("--exact-asymmetric", action="store_true",
                           help="asymmetric rows scan every code exactly instead of by FAISS's fast scan")
    two_stage.add_argument("--codes", choices=("itq", "pcasign"), default="itq", help="how the codes are learned")
    two_stage.add_argument("--fit-sample", type=int, default=20000, help="items the codes are learned from")
    two_stage.add_argument("--cluster-size", type=int, default=100, help="items per cluster, on average")
    two_stage.add_argument("--decay", type=float, default=1.0,
                           help="power-law decay of the spectrum: variance of dimension d ~ d^-decay")
    two_stage.add_argument("--noise", type=float, default=0.5, help="item noise relative to the centres' spread")
    two_stage.add_argument("--tmp-dir", default=None, help="where the float file goes (default: the system's)")
    args = parser.parse_args(argv)
    for name in ("shortlists", "asym_shortlists"):
        try:
            setattr(args, name, [int(value) for value in getattr(args, name).split(",") if value.strip()])
        except ValueError:
            parser.error(f"--{name.replace('_', '-')} must be comma-separated integers, got {getattr(args, name)!r}")
    if args.bits < 8 or args.bits % 8:
        parser.error(f"--bits must be a positive multiple of 8 (codes are packed into bytes), got {args.bits}")
    for name in ("database", "queries", "dim", "k", "repeats", "fit_sample", "cluster_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if any(shortlist < 1 for shortlist in args.shortlists + args.asym_shortlists):
        parser.error(f"shortlists must be positive, got {args.shortlists + args.asym_shortlists}")
    if (args.shortlists or args.asym_shortlists) and (args.bits > args.dim or args.bits > args.fit_sample):
        parser.error(f"two-stage codes of {args.bits} bits need --dim and --fit-sample of at least {args.bits}")
    return args


def main(argv=None) -> int:
    return benchmark_main(parse_args, run, report, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
