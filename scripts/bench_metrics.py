#!/usr/bin/env python
"""Benchmark: query x database similarity matrix -> revisitop Easy/Medium/Hard mAP and mP@k.

Compares :func:`retrieval.evaluation.metrics.revisitop_metrics` (blockwise, rows ranked without an argsort) with
the steps of the official revisitop evaluation (:mod:`retrieval.evaluation.reference_metrics`: the similarity in
its (database x queries) layout, one argsort along the database axis with NumPy's default kind, then per query and
protocol membership tests of positives and junk along the ranking and the trapezoid AP with that code's
arithmetic), on synthetic ground truth shaped like Revisited Oxford. Each measurement runs in a fresh subprocess so
its peak memory (max RSS above the similarity matrix it was given) is its own.

    python scripts/bench_metrics.py                      # 70x5000, 1000x100000, 70x1000000
    python scripts/bench_metrics.py --shapes 70x5000     # one shape
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np  # noqa: E402

from msretrieval.data.revisitop import PROTOCOLS
from msretrieval.retrieval.evaluation import reference_metrics
from msretrieval.retrieval.evaluation.metrics import revisitop_metrics
from msretrieval.retrieval.search.scores import DenseScores
from msretrieval.utils.cli import run_cli

KS = (1, 5, 10)


def synthetic_problem(num_queries: int, num_database: int, seed: int = 0):
    """Scores where each query's easy/hard positives score higher on average, plus junk (ROxford-like sizes)."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((num_queries, num_database), dtype=np.float32)
    truth = []
    for q in range(num_queries):
        picked = rng.choice(num_database, size=min(num_database, 200), replace=False)
        easy, hard, junk = picked[:40], picked[40:100], picked[100:200]
        scores[q, easy] += 2.5
        scores[q, hard] += 1.0
        scores[q, junk] += 1.5
        truth.append({"easy": easy, "hard": hard, "junk": junk})
    return scores, truth


def protocol_lists(truth, protocol: str):
    if protocol == "easy":
        return [t["easy"] for t in truth], [np.concatenate([t["junk"], t["hard"]]) for t in truth]
    if protocol == "medium":
        return [np.concatenate([t["easy"], t["hard"]]) for t in truth], [t["junk"] for t in truth]
    return [t["hard"] for t in truth], [np.concatenate([t["junk"], t["easy"]]) for t in truth]


def run_fast(scores, truth) -> dict[str, float]:
    return revisitop_metrics(DenseScores(scores), {p: protocol_lists(truth, p) for p in PROTOCOLS}, KS)


def run_reference(similarity, truth, stable: bool) -> dict[str, float]:
    """The revisitop evaluation of a (database x queries) similarity: one ranking shared by the three protocols."""
    metrics = {}
    ranks = reference_metrics.ranks_by_column(similarity, stable=stable)
    for protocol in PROTOCOLS:
        mean_ap, mean_precisions, _ = reference_metrics.revisitop_protocol(ranks, *protocol_lists(truth, protocol), KS)
        metrics[f"mAP_{protocol}"] = float(mean_ap)
        for k, value in zip(KS, mean_precisions):
            metrics[f"mP@{k}_{protocol}"] = float(value)
    return metrics


def child(shape: str, impl: str) -> None:
    num_queries, num_database = map(int, shape.split("x"))
    scores, truth = synthetic_problem(num_queries, num_database)
    matrix_mb = scores.nbytes / 2**20
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if impl != "fast":  # the revisitop code's layout: database x queries (X^T Q), made before the clock starts
        similarity = np.ascontiguousarray(scores.T)  # (two matrices for a moment: less than the ranking's peak)
        del scores
    start = time.perf_counter()
    if impl == "fast":
        metrics = run_fast(scores, truth)
    else:
        metrics = run_reference(similarity, truth, stable=impl == "stable")
    seconds = time.perf_counter() - start
    extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024
    print(json.dumps({"seconds": seconds, "extra_peak_mb": extra_mb, "metrics": metrics, "matrix_mb": matrix_mb}))


def measure(shape: str, impl: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", shape, impl], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(shapes: list[str]) -> list[dict]:
    """One row per shape: seconds and peak memory of the reference (default and stable argsort) and of
    ``revisitop_metrics``, their ratios, and the largest metric difference against the stable reference."""
    rows = []
    for shape in shapes:
        ref, stable, fast = measure(shape, "quicksort"), measure(shape, "stable"), measure(shape, "fast")
        rows.append({"shape": shape, "matrix_mb": fast["matrix_mb"], "reference_seconds": ref["seconds"],
                     "stable_seconds": stable["seconds"], "fast_seconds": fast["seconds"],
                     "speedup_vs_reference": ref["seconds"] / fast["seconds"],
                     "speedup_vs_stable": stable["seconds"] / fast["seconds"],
                     "reference_extra_peak_mb": ref["extra_peak_mb"], "fast_extra_peak_mb": fast["extra_peak_mb"],
                     "max_abs_diff": max(abs(stable["metrics"][k] - fast["metrics"][k]) for k in stable["metrics"])})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["70x5000", "1000x100000", "70x1000000"])
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    header = (f"{'shape':>12} {'matrix MB':>9} {'ref s':>7} {'stable s':>8} {'fast s':>7} {'vs ref':>7} "
              f"{'vs stable':>9} {'ref +MB':>7} {'fast +MB':>8} {'max |diff|':>10}")
    print(header)
    for shape in args.shapes:  # one shape at a time, so each row shows as soon as it is measured
        r = run([shape])[0]
        print(f"{shape:>12} {r['matrix_mb']:9.0f} {r['reference_seconds']:7.2f} {r['stable_seconds']:8.2f} "
              f"{r['fast_seconds']:7.2f} {r['speedup_vs_reference']:6.1f}x {r['speedup_vs_stable']:8.1f}x "
              f"{r['reference_extra_peak_mb']:7.0f} {r['fast_extra_peak_mb']:8.0f} {r['max_abs_diff']:10.1e}",
              flush=True)
    print("ref = the revisitop evaluation: one argsort of the database x queries similarity along the database axis\n"
          "with NumPy's default kind, then per query and protocol membership tests and the trapezoid AP with its\n"
          "arithmetic; stable = the same with a stable argsort. |diff| is against the stable reference (identical\n"
          "tie order). +MB = peak memory above the similarity matrix. ")
    print("ties: ranked by descending score, equal scores by ascending database index (stable-sort order)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
