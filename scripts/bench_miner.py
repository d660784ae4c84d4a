#!/usr/bin/env python
"""Benchmark: Algorithm-1 miner vs PML's TripletMarginMiner(margin=0.1, "semihard") on a mining batch.

Random L2-normalised embeddings (default 4,096-D), classes of 4 images (2,048 images = 512 classes). Each
measurement runs in a fresh subprocess so its peak memory (max RSS above the embeddings it was given, via
resource.getrusage after resetting the kernel's peak mark to the current RSS) is its own; time is the median
of a few runs after one warm-up run. A measurement must stay within a memory budget (the child's address
space is capped at its size before mining plus the budget, so an over-budget allocation fails instead of
swapping) and a time budget (first run). Every size is measured; the largest at which PML's miner fits is
reported.

    python scripts/bench_miner.py                         # B = 2048 1024 512 256, 8 GB, 60 s
    python scripts/bench_miner.py --sizes 1024 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch  # noqa: E402
from pytorch_metric_learning.miners import TripletMarginMiner  # noqa: E402

from msretrieval.miners import Algorithm1Miner
from msretrieval.utils.cli import run_cli

log = logging.getLogger("bench_miner")

PER_CLASS = 4
IMPLS = {
    "alg1": "Algorithm1Miner, one query per class",
    "alg1_every": "Algorithm1Miner, every sample a query",
    "pml": "PML TripletMarginMiner(0.1, semihard)",
}


def mining_batch(batch_size: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.nn.functional.normalize(torch.randn(batch_size, dim, generator=generator), dim=1)
    labels = torch.arange(batch_size // PER_CLASS).repeat_interleave(PER_CLASS)
    return embeddings, labels[torch.randperm(batch_size, generator=generator)]


def create_miner(impl: str):
    if impl == "pml":
        return TripletMarginMiner(margin=0.1, type_of_triplets="semihard")
    return Algorithm1Miner(seed=0, one_per_class=impl == "alg1")


def cap_address_space(budget_mb: float) -> None:
    """Let this process grow by at most ``budget_mb`` of address space (virtual >= resident, so conservative)."""
    status = Path("/proc/self/status").read_text()
    current_kb = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1])
    limit = int((current_kb / 1024 + budget_mb) * 2**20)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def reset_peak_rss() -> None:
    """Lower the kernel's peak-RSS mark (which getrusage reports) to the current RSS, so transients from
    imports and data generation do not hide the miner's own peak (Linux >= 4.0; a no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(impl: str, batch_size: int, dim: int, repeats: int, budget_mb: float, budget_s: float) -> None:
    embeddings, labels = mining_batch(batch_size, dim)
    miner = create_miner(impl)
    cap_address_space(budget_mb)
    reset_peak_rss()
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"status": "ok"}
    times, cpu_times = [], []
    try:
        for run in range(repeats + 1):
            start, start_cpu = time.perf_counter(), time.process_time()
            anchors, _, _ = miner(embeddings, labels)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            if run == 0 and seconds > budget_s:
                result["status"] = f"over {budget_s:.0f} s"
                times.append(seconds)
                cpu_times.append(cpu_seconds)
                break
            if run > 0:
                times.append(seconds)
                cpu_times.append(cpu_seconds)
        result["triplets"] = len(anchors)
    except (MemoryError, RuntimeError) as error:
        result["status"] = "over memory budget"
        result["error"] = str(error).splitlines()[0][:120]
    result["seconds"] = statistics.median(times) if times else None
    result["cpu_seconds"] = statistics.median(cpu_times) if cpu_times else None
    result["extra_peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024
    if result["status"] == "ok" and result["extra_peak_mb"] > budget_mb:
        result["status"] = "over memory budget"
    print(json.dumps(result))


def measure(impl: str, batch_size: int, args) -> dict:
    command = [sys.executable, __file__, "--child", impl, str(batch_size), "--dim", str(args.dim), "--repeats",
               str(args.repeats), "--budget-mb", str(args.budget_mb), "--budget-s", str(args.budget_s)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True,
                             timeout=args.budget_s * (args.repeats + 1) + 120)
    except subprocess.TimeoutExpired:
        return {"status": "killed (timeout)", "seconds": None, "extra_peak_mb": None}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fits(result: dict) -> bool:
    return result["status"] == "ok"


def row(batch_size: int, impl: str, result: dict, alg1: dict | None) -> str:
    seconds = f"{result['seconds']:.3f}" if result.get("seconds") is not None else "-"
    cpu_seconds = f"{result['cpu_seconds']:.3f}" if result.get("cpu_seconds") is not None else "-"
    peak = f"{result['extra_peak_mb']:.0f}" if result.get("extra_peak_mb") is not None else "-"
    triplets = str(result.get("triplets", "-"))
    time_ratio = mem_ratio = ""
    if alg1 is not None and fits(result) and fits(alg1):
        time_ratio = f"{result['seconds'] / alg1['seconds']:.1f}x"
        mem_ratio = f"{result['extra_peak_mb'] / max(alg1['extra_peak_mb'], 1.0):.1f}x"
    return (f"{batch_size:>5} {IMPLS[impl]:<40} {triplets:>9} {seconds:>9} {cpu_seconds:>8} {peak:>8} "
            f"{time_ratio:>9} {mem_ratio:>9}  {result['status']}")


def run(args: argparse.Namespace) -> dict:
    """Every miner at every size (largest first): one measurement dict per (size, miner), and the largest size
    at which PML's miner fits the budgets."""
    sizes = sorted(args.sizes, reverse=True)
    measurements, largest_pml = [], None
    for batch_size in sizes:
        for impl in IMPLS:
            result = measure(impl, batch_size, args)
            log.info("B = %d, %s: %s, %s s", batch_size, impl, result["status"], result.get("seconds"))
            measurements.append({"batch_size": batch_size, "impl": impl, **result})
            if impl == "pml" and largest_pml is None and fits(result):
                largest_pml = batch_size
    return {"sizes": sizes, "dim": args.dim, "repeats": args.repeats, "budget_mb": args.budget_mb,
            "budget_s": args.budget_s, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "measurements": measurements, "largest_pml": largest_pml}


def by_size(result: dict) -> dict[int, dict[str, dict]]:
    """The measurements as {batch size: {miner: measurement}}."""
    table: dict[int, dict[str, dict]] = {}
    for m in result["measurements"]:
        table.setdefault(m["batch_size"], {})[m["impl"]] = m
    return table


def report(result: dict) -> str:
    lines = [f"mining batch: B x {result['dim']} L2-normalised, {PER_CLASS} images per class; median of "
             f"{result['repeats']} runs after a warm-up; torch {result['torch']}, {result['threads']} threads",
             f"{'B':>5} {'miner':<40} {'triplets':>9} {'median s':>9} {'CPU s':>8} {'+peak MB':>8} "
             f"{'time/alg1':>9} {'mem/alg1':>9}  status"]
    for batch_size, impls in by_size(result).items():
        for impl, measurement in impls.items():
            lines.append(row(batch_size, impl, measurement, None if impl == "alg1" else impls["alg1"]))
    budget = f"{result['budget_mb']:.0f} MB / {result['budget_s']:.0f} s"
    largest = result["largest_pml"] if result["largest_pml"] is not None else f"none of {result['sizes']}"
    lines.append(f"largest batch PML's semihard miner fits within {budget}: {largest}")
    lines.append("median s = wall clock; CPU s = process CPU time (all threads), steadier on a busy machine; +peak MB =\n"
                 "peak RSS growth above the embeddings; time/alg1, mem/alg1 = this row over Algorithm1Miner (one query\n"
                 "per class) at the same B, wall time. PML 2.9 builds the dense B^3 triplet mask only while B^3 < 2^31\n"
                 "(B <= 1290); above that it loops over anchors, so its peak follows the number of triplets instead.")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[2048, 1024, 512, 256])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-mb", type=float, default=8192)
    parser.add_argument("--budget-s", type=float, default=60)
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.dim, args.repeats, args.budget_mb, args.budget_s)
        return 0
    print(report(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
