#!/usr/bin/env python
"""Search a large on-disk database: exact (shard by shard) against the size-chosen index (IVF-PQ), with memory.

Writes a synthetic database of N x D float32 rows, L2-normalised, into shards on disk (``retrieval.search.shards``;
kept, and reused by later runs: only missing shards are written), then searches it with Q queries:

- exact: each shard searched with a flat index of its own, per-shard top-k merged (``retrieval.search.sharded_search``);
- approximate: ``SearchIndex(factory="auto")`` (IVF-PQ above ``--flat-limit`` rows), trained on a fixed random
  sample and filled shard by shard;

and reports train / add / search times, recall@k of the approximate search against the exact one (the share
of the exact top k it finds), the speed-up, and the process's peak resident memory (VmHWM, = ru_maxrss)
against the descriptors' size on disk. Neither search loads the database as one array, so the peak should
stay well under twice the size on disk (the check printed last).

The data: a Gaussian mixture around 1,000 random unit centres, each row = centre + a random combination of
16 shared directions (so neighbours are structured, not just noise) + small isotropic noise; queries are
database rows with noise added. Each shard comes from its own seeded generator, so a resumed write gives the
same database.

    python scripts/search_large.py                                   # 1,000,000 x 512, 1,000 queries
    python scripts/search_large.py --count 50000 --dim 64 --out large.json
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402

from msretrieval.retrieval.search.index import DEFAULT_FLAT_LIMIT, SearchIndex
from msretrieval.retrieval.search.sharded_search import exact_search
from msretrieval.retrieval.search.shards import ShardedArray, ShardWriter
from msretrieval.utils.cli import positive_int, run_cli

log = logging.getLogger("search_large")

CENTRES, DIRECTIONS = 1000, 16
#: norms of the parts of a row: the within-cluster variation (shared directions) and isotropic noise
SPREAD, NOISE, QUERY_NOISE = 0.6, 0.2, 0.3


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def write_database(folder: Path, count: int, dim: int, shard_rows: int, seed: int) -> ShardedArray:
    """The synthetic database in ``folder``; shards already there are kept."""
    writer = ShardWriter(folder, count, shard_rows)
    pending = writer.pending()
    if pending:
        log.info("writing %d of %d shards of %d x %d rows to %s", len(pending), len(writer.ranges), count, dim,
                 folder)
    shared = np.random.default_rng(seed)
    centres = _unit_rows(shared.standard_normal((CENTRES, dim)))
    directions = _unit_rows(shared.standard_normal((DIRECTIONS, dim)))
    for index in pending:
        rng = np.random.default_rng([seed, 0, index])
        size = len(writer.ranges[index])
        rows = centres[rng.integers(0, CENTRES, size)]
        rows += (SPREAD / np.sqrt(DIRECTIONS)) * rng.standard_normal((size, DIRECTIONS), dtype=np.float32) @ directions
        rows += (NOISE / np.sqrt(dim)) * rng.standard_normal((size, dim), dtype=np.float32)
        writer.write(index, _unit_rows(rows))
    return ShardedArray(folder)


def make_queries(database: ShardedArray, count: int, seed: int) -> np.ndarray:
    """Database rows (a fixed random choice) with noise: each query has a true near neighbour."""
    rng = np.random.default_rng([seed, 1])  # streams: [seed, 0, shard] rows, [seed, 1] queries
    rows = database.take(np.sort(rng.choice(len(database), count, replace=False)))
    return _unit_rows(rows + (QUERY_NOISE / np.sqrt(rows.shape[1])) * rng.standard_normal(rows.shape))


def peak_resident_bytes() -> int:
    """The process's peak resident set so far: VmHWM from /proc (Linux), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top k that the approximate top k contains."""
    return float(np.mean([len(np.intersect1d(a[a >= 0], e)) / len(e) for a, e in zip(found, exact)]))


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    """The results (for JSON) and the arrays behind them (queries, exact and approximate top k)."""
    folder = Path(args.data or f"cache/search_large/n{args.count}-d{args.dim}-s{args.seed}")
    started = time.perf_counter()
    database = write_database(folder, args.count, args.dim, args.shard_rows, args.seed)
    write_seconds = time.perf_counter() - started
    queries = make_queries(database, args.queries, args.seed)
    peak = {"write": peak_resident_bytes()}

    started = time.perf_counter()
    exact_scores, exact_indices = exact_search(queries, database, args.k)
    exact_seconds = time.perf_counter() - started
    peak["exact"] = peak_resident_bytes()

    index = SearchIndex(database, factory="auto", flat_limit=args.flat_limit, nprobe=args.nprobe)
    peak["build"] = peak_resident_bytes()
    started = time.perf_counter()
    scores, indices = index.search(queries, args.k)
    search_seconds = time.perf_counter() - started
    peak["search"] = peak_resident_bytes()

    result = {
        "count": args.count, "dim": args.dim, "queries": args.queries, "k": args.k, "shards": len(database.ranges),
        "data": str(folder), "disk_bytes": database.nbytes, "write_seconds": write_seconds,
        "exact": {"method": "flat index per shard, per-shard top k merged", "search_seconds": exact_seconds},
        "approximate": {**index.parameters, "train_seconds": index.seconds["train"],
                        "add_seconds": index.seconds["add"], "search_seconds": search_seconds},
        f"recall_at_{args.k}": recall_at_k(indices, exact_indices),
        "speedup": exact_seconds / max(search_seconds, 1e-9),
        "peak_rss_bytes": peak["search"], "peak_rss_after": peak,
    }
    result["peak_rss_over_disk"] = result["peak_rss_bytes"] / result["disk_bytes"]
    result["memory_ok"] = result["peak_rss_over_disk"] < 2.0
    arrays = {"queries": queries, "exact_scores": exact_scores, "exact_indices": exact_indices,
              "scores": scores, "indices": indices}
    return result, arrays


def table(result: dict) -> str:
    approx, k = result["approximate"], result["k"]
    mb = 2 ** 20
    lines = [f"{result['count']:,} x {result['dim']} float32 in {result['shards']} shards "
             f"({result['disk_bytes'] / mb:,.0f} MB on disk), {result['queries']:,} queries, k = {k}",
             f"{'search':<28} {'train s':>8} {'add s':>8} {'search s':>9} {'ms/query':>9} {f'recall@{k}':>9}",
             f"{'exact (shard by shard)':<28} {'-':>8} {'-':>8} {result['exact']['search_seconds']:>9.2f} "
             f"{1000 * result['exact']['search_seconds'] / result['queries']:>9.3f} {1.0:>9.3f}",
             f"{approx['factory'] + ' nprobe=' + str(approx.get('nprobe', '-')):<28} {approx['train_seconds']:>8.1f} "
             f"{approx['add_seconds']:>8.1f} {approx['search_seconds']:>9.2f} "
             f"{1000 * approx['search_seconds'] / result['queries']:>9.3f} {result[f'recall_at_{k}']:>9.3f}",
             f"speed-up {result['speedup']:.1f}x; train sample {approx.get('train_size', '-')} rows",
             f"peak RSS {result['peak_rss_bytes'] / mb:,.0f} MB = {result['peak_rss_over_disk']:.2f} x size on disk "
             f"({'<' if result['memory_ok'] else 'NOT <'} 2x); after write / exact / build / search: "
             + " / ".join(f"{v / mb:,.0f}" for v in result["peak_rss_after"].values()) + " MB"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=positive_int, default=1_000_000, help="database rows (default 1,000,000)")
    parser.add_argument("--dim", type=positive_int, default=512, help="dimensions (default 512)")
    parser.add_argument("--queries", type=positive_int, default=1000, help="queries (default 1,000)")
    parser.add_argument("--k", type=positive_int, default=10)
    parser.add_argument("--shard-rows", type=positive_int, default=50_000, help="rows per shard file")
    parser.add_argument("--flat-limit", type=positive_int, default=DEFAULT_FLAT_LIMIT,
                        help=f"exact index up to this many rows (default {DEFAULT_FLAT_LIMIT:,})")
    parser.add_argument("--nprobe", type=positive_int, default=None, help="override the chosen nprobe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None,
                        help="database folder (default cache/search_large/nCOUNT-dDIM-sSEED; reused if complete)")
    parser.add_argument("--out", default=None, help="write the results JSON here (and the top-k lists beside "
                                                     "it, same name with .npz)")
    args = parser.parse_args(argv)
    if args.queries > args.count:
        parser.error(f"--queries ({args.queries}) cannot exceed --count ({args.count})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result, arrays = run(args)
    print(table(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        np.savez(out.with_suffix(".npz"), **arrays)
        log.info("results written to %s and %s", out, out.with_suffix(".npz"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
