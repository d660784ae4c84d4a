#!/usr/bin/env python
"""Benchmark: exact top-k search over 64-bit binary codes versus 512-D float descriptors, with FAISS.

Random data: Q queries against N packed codes (``SearchIndex(metric="hamming")``, FAISS IndexBinaryFlat)
and Q queries against N L2-normalised float32 vectors (``SearchIndex()``, FAISS flat inner product, CPU).
Times are of the search alone (index built beforehand), median of a few runs; CPU time is summed over
threads. Memory is the database payload (N x bytes per item) and the growth of the process's resident set
from before the database was made to after the index was built and the input array freed, i.e. what the
index holds. On a machine busy with other jobs, FAISS's OpenMP threads wait for each other at every
barrier and multi-threaded wall times swing widely; ``--threads 1`` and the CPU times are steadier there.

    python scripts/bench_binary_search.py                       # 1,000 x 1,000,000, 64 bits vs 512-D
    python scripts/bench_binary_search.py --database 20000      # a quick check
    python scripts/bench_binary_search.py --threads 1 --json bench.json
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from msretrieval.utils.cli import benchmark_main, run_cli
from msretrieval.retrieval.search.index import SearchIndex

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
    seconds, cpu_seconds = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        scores, indices = index.search(queries, args.k)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)
    if indices.shape != (args.queries, min(args.k, args.database)) or (indices < 0).any():
        raise RuntimeError(f"{kind} search returned {indices.shape} results with missing neighbours")
    return {"kind": kind, "index": f"{type(index.index).__name__} ({metric})", "bytes_per_item": bytes_per_item,
            "database_bytes": bytes_per_item * args.database, "build_seconds": build_seconds,
            "search_seconds": statistics.median(seconds), "cpu_seconds": statistics.median(cpu_seconds),
            "rss_growth_bytes": after - before if before is not None and after is not None else None}


def run(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    binary = measure("binary", args)
    floats = measure("float", args)
    return {"database": args.database, "queries": args.queries, "bits": args.bits, "dim": args.dim, "k": args.k,
            "threads": faiss.omp_get_max_threads(), "faiss": faiss.__version__, "binary": binary, "float": floats,
            "time_ratio": floats["search_seconds"] / binary["search_seconds"],
            "cpu_time_ratio": floats["cpu_seconds"] / max(binary["cpu_seconds"], 1e-9),
            "memory_ratio": floats["database_bytes"] / binary["database_bytes"]}


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
    args = parser.parse_args(argv)
    if args.bits < 8 or args.bits % 8:
        parser.error(f"--bits must be a positive multiple of 8 (codes are packed into bytes), got {args.bits}")
    for name in ("database", "queries", "dim", "k", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    return benchmark_main(parse_args, run, report, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
