#!/usr/bin/env python
"""Benchmark: approximate search (FAISS IVF-PQ) against exact flat search, recall@k and speed-up.

Synthetic clustered database: N L2-normalised float32 vectors around ``--clusters`` random centres (real
descriptors are clustered too; on uniform random vectors an inverted file has nothing to exploit), and
queries drawn from the same distribution (not copies of database items). Both indexes are
``retrieval.search.index.SearchIndex`` (inner product): ``"Flat"`` and the ``--factory`` string with ``--nprobe``
cells visited per query. Recall@k = the fraction of each query's exact top k that the approximate index
also returns in its top k. Times are of the search alone, median of ``--repeats`` runs; build = train + add.

    python scripts/bench_ivf_pq.py                                        # 200,000 x 512, IVF1024,PQ64
    python scripts/bench_ivf_pq.py --database 20000 --dim 128 --factory IVF128,PQ16 --nprobe 8
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from msretrieval.utils.cli import benchmark_main, run_cli
from msretrieval.retrieval.search.index import SearchIndex

#: index rows kept per item besides the code: IVF lists store a 64-bit id next to each code
ID_BYTES = 8


def clustered_vectors(rng: np.random.Generator, centres: np.ndarray, count: int, spread: float) -> np.ndarray:
    """``count`` unit vectors, each a random centre plus Gaussian noise of ``spread`` per dimension."""
    picked = centres[rng.integers(0, len(centres), count)]
    vectors = picked + spread * rng.standard_normal(picked.shape, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def timed_searches(index: SearchIndex, queries: np.ndarray, k: int, repeats: int) -> tuple[np.ndarray, float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, indices = index.search(queries, k)
        seconds.append(time.perf_counter() - start)
    return indices, statistics.median(seconds)


def recall_at_k(exact: np.ndarray, approximate: np.ndarray) -> float:
    found = [len(np.intersect1d(e, a[a >= 0])) for e, a in zip(exact, approximate)]
    return float(np.mean(found)) / exact.shape[1]


def run(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    spread = args.spread / np.sqrt(args.dim)  # noise norm ~ spread x centre norm
    database = clustered_vectors(rng, centres, args.database, spread)
    queries = clustered_vectors(rng, centres, args.queries, spread)
    start = time.perf_counter()
    flat = SearchIndex(database, use_gpu=False)
    flat_build = time.perf_counter() - start
    start = time.perf_counter()
    approximate = SearchIndex(database, use_gpu=False, factory=args.factory, nprobe=args.nprobe,
                              train_size=args.train_size)
    approximate_build = time.perf_counter() - start
    exact, flat_seconds = timed_searches(flat, queries, args.k, args.repeats)
    found, approximate_seconds = timed_searches(approximate, queries, args.k, args.repeats)
    code_bytes = faiss.downcast_index(approximate.index).code_size
    return {"database": args.database, "queries": args.queries, "dim": args.dim, "clusters": args.clusters,
            "k": args.k, "factory": args.factory, "nprobe": args.nprobe, "threads": faiss.omp_get_max_threads(),
            "faiss": faiss.__version__, "flat_build_seconds": flat_build,
            "approximate_build_seconds": approximate_build, "flat_seconds": flat_seconds,
            "approximate_seconds": approximate_seconds, "speedup": flat_seconds / approximate_seconds,
            "recall": recall_at_k(exact, found), "flat_bytes_per_item": 4 * args.dim,
            "approximate_bytes_per_item": code_bytes + ID_BYTES}


def report(result: dict) -> str:
    return "\n".join([
        f"{result['queries']:,} queries, {result['database']:,} x {result['dim']} clustered float32 "
        f"({result['clusters']} centres), k = {result['k']}; FAISS {result['faiss']}, {result['threads']} thread(s)",
        f"{'index':<24} {'build s':>8} {'search s':>9} {'B/item':>7}",
        f"{'Flat (exact)':<24} {result['flat_build_seconds']:>8.2f} {result['flat_seconds']:>9.3f} "
        f"{result['flat_bytes_per_item']:>7}",
        f"{result['factory'] + ', nprobe ' + str(result['nprobe']):<24} {result['approximate_build_seconds']:>8.2f} "
        f"{result['approximate_seconds']:>9.3f} {result['approximate_bytes_per_item']:>7}",
        f"recall@{result['k']} against exact search {result['recall']:.3f}; search {result['speedup']:.1f}x faster"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000, help="centres of the synthetic data")
    parser.add_argument("--spread", type=float, default=0.5, help="noise norm relative to the centres'")
    parser.add_argument("--factory", default="IVF1024,PQ64", help="FAISS factory string of the approximate index")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=65536, help="rows the IVF/PQ k-means train on")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="FAISS (OpenMP) threads; default: all cores")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return benchmark_main(parse_args, run, report, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
