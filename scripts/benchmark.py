#!/usr/bin/env python
"""Every speed benchmark of the repository in one run, written to BENCHMARKS.md with the machine described.

Runs, one after the other, each comparing two implementations side by side in the same run:
metrics (scripts/bench_metrics.py), the miner (bench_miner.py), the training loop (bench_train.py),
extraction (bench_extract.py), Hamming vs float search (bench_binary_search.py) and IVF-PQ vs flat search
(bench_ivf_pq.py). Each script keeps its own command line; this one calls their ``run`` functions.

    python scripts/benchmark.py                  # full size (tens of minutes on 2 cores)
    python scripts/benchmark.py --quick          # a few minutes
    python scripts/benchmark.py --quick --threads 1 --out /tmp/BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
import faiss  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import bench_binary_search  # noqa: E402  (scripts/ is on sys.path: this file's folder)
import bench_extract  # noqa: E402
import bench_ivf_pq  # noqa: E402
import bench_metrics  # noqa: E402
import bench_miner  # noqa: E402
import bench_train  # noqa: E402
from msretrieval.data.roots import resolve_data_root
from msretrieval.utils.cli import run_cli

log = logging.getLogger("benchmark")

#: Command-line arguments of each benchmark per size. "tiny" exists for the test: seconds, numbers meaningless.
SIZES = {
    "full": {
        "metrics": ["70x5000", "1000x100000", "70x1000000"],
        "miner": ["--sizes", "2048", "1024", "512", "256"],
        "train": ["--steps", "30"],
        "extract": ["--images", "1000"],
        "binary": ["--database", "1000000", "--queries", "1000"],
        "ivf_pq": ["--database", "200000", "--dim", "512", "--factory", "IVF1024,PQ64", "--nprobe", "16"],
    },
    "quick": {
        "metrics": ["70x5000", "200x100000"],
        "miner": ["--sizes", "512", "256", "--dim", "1024", "--repeats", "3"],
        # fewer steps, and no full scan of the training images / smaller head set-up before them (not timed)
        "train": ["--steps", "6", "data.scan_images=false", "model.init_images=64"],
        "extract": ["--images", "48"],
        "binary": ["--database", "100000", "--queries", "200"],
        "ivf_pq": ["--database", "20000", "--dim", "128", "--clusters", "200", "--queries", "200", "--factory",
                   "IVF128,PQ32", "--nprobe", "16"],
    },
    "tiny": {
        "metrics": ["10x500"],
        "miner": ["--sizes", "32", "--dim", "32", "--repeats", "1"],
        "train": ["--config", str(REPO / "configs" / "smoke.yaml"), "--steps", "1", "model.architecture=gem",
                  "model.backbone=resnet18", "model.pretrained=false", "model.init_images=4", "data.train_size=32",
                  "data.scan_images=false", "data.keep_decoded=false", "data.workers=0"],
        "extract": ["--images", "4", "--size", "32", "--backbone", "resnet18", "--repeats", "1"],
        "binary": ["--database", "2000", "--queries", "20", "--repeats", "1"],
        "ivf_pq": ["--database", "2000", "--dim", "16", "--clusters", "20", "--queries", "20", "--factory",
                   "IVF16,PQ4x4", "--nprobe", "4", "--repeats", "1"],
    },
}

SECTIONS = ("Metrics", "Miner", "Training loop", "Extraction", "Hamming vs float search", "IVF-PQ vs flat search")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gb() -> str:
    try:
        kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")).split()[1])
        return f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        return "unknown"


def machine() -> list[tuple[str, str]]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        load = "unknown"
    return [("CPU", cpu_model()), ("cores", str(os.cpu_count())),
            ("threads used", f"torch {torch.get_num_threads()}, FAISS {faiss.omp_get_max_threads()}"),
            ("RAM", ram_gb()), ("GPU", gpu), ("load average at start (1 / 5 / 15 min)", load),
            ("Python", platform.python_version()),
            ("torch / faiss / timm", f"{torch.__version__} / {faiss.__version__} / {timm.__version__}"),
            ("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds"))]


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def seconds(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def megabytes(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def metrics_section(rows: list[dict]) -> list[str]:
    return [*table(["query x database", "matrix MB", "reference s (revisitop code's steps)", "ours s",
                    "speed-up", "reference +peak MB", "ours +peak MB", "max metric diff"],
                   [[r["shape"], f"{r['matrix_mb']:.0f}", seconds(r["reference_seconds"]), seconds(r["fast_seconds"]),
                     ratio(r["speedup_vs_reference"]), f"{r['reference_extra_peak_mb']:.0f}",
                     f"{r['fast_extra_peak_mb']:.0f}", f"{r['max_abs_diff']:.1e}"] for r in rows]),
            "", "`retrieval.evaluation.metrics.revisitop_metrics` (Easy/Medium/Hard mAP, mP@1/5/10) against the "
                "steps of the revisitop evaluation code in `retrieval.evaluation.reference_metrics` (one default-kind "
                "argsort of the database x queries similarity along the database axis, then membership tests and "
                "its trapezoid AP per query and protocol); each in its own process; +peak MB = peak RSS above the "
                "similarity matrix."]


def miner_section(result: dict) -> list[str]:
    rows = []
    for batch_size, impls in bench_miner.by_size(result).items():
        alg1, pml = impls["alg1"], impls["pml"]
        both = bench_miner.fits(alg1) and bench_miner.fits(pml)
        rows.append([batch_size, seconds(alg1["seconds"]), seconds(pml["seconds"]),
                     ratio(pml["seconds"] / alg1["seconds"]) if both else pml["status"],
                     megabytes(alg1["extra_peak_mb"]), megabytes(pml["extra_peak_mb"]),
                     seconds(impls["alg1_every"]["seconds"])])
    return [*table(["B (4 per class)", "Algorithm1Miner s", "PML semihard s", "PML / ours", "ours +peak MB",
                    "PML +peak MB", "ours, every sample a query, s"], rows),
            "", f"Embeddings B x {result['dim']}, median of {result['repeats']} runs after a warm-up, each miner in "
                f"its own process within {result['budget_mb']:.0f} MB / {result['budget_s']:.0f} s. Largest B at "
                f"which PML's miner fits: {result['largest_pml']}."]


def train_section(result: dict) -> list[str]:
    return [*table(["batch", "bare PyTorch loop img/s", "trainer img/s", "trainer / bare"],
                   [[f"{result['classes_per_batch']} x {result['images_per_class']} at {result['train_size']} px",
                     f"{result['bare_images_per_second']:.1f}", f"{result['trainer_images_per_second']:.1f}",
                     ratio(result["ratio"])]]),
            "", f"{result['architecture']} on {result['backbone']}, {result['steps']} optimisation steps each; same "
                f"network, miner, loss and optimiser (scripts/bench_train.py)."]


def extract_section(result: dict) -> list[str]:
    n = result["images"]
    ms = lambda value: f"{1000 * value / n:.1f}"  # noqa: E731
    return [*table(["images (batches)", "bare encode loop s (img/s)", "harness extract() s (img/s)",
                    "harness / bare"],
                   [[f"{n} ({result['batches']})",
                     f"{result['bare_seconds']:.2f} ({result['bare_images_per_second']:.1f})",
                     f"{result['harness_seconds']:.2f} ({result['harness_images_per_second']:.1f})",
                     ratio(result["ratio"])]]),
            "", *table(["harness work measured alone, ms/img", "header reads", "JPEG decoding",
                        "resize to uint8 pixels", "stack + normalise the batch", "harness - bare",
                        "decoding in JPEG draft mode (not used)"],
                       [["", ms(result["header_seconds"]), ms(result["load_seconds"]),
                         ms(result["transform_seconds"]), ms(result["collate_seconds"]),
                         ms(result["harness_seconds"] - result["bare_seconds"]),
                         ms(result["draft_load_seconds"])]]),
            "", f"{result['method']} on {result['backbone']} ({'ImageNet' if result['pretrained'] else 'random'} "
                f"weights), Flowers-102 test images at shorter side {result['size']}, batches of <= "
                f"{result['batch_size']} of one size ({result['distinct_sizes']} distinct sizes), "
                f"{result['workers']} loader workers, {result['threads']} torch thread(s); best of "
                f"{result['repeats']} alternating passes. Harness = the whole "
                "`retrieval.descriptors.extract.extract` call (header reads, DataLoader, decoding, resizing, batch "
                "normalisation, network); bare = the same "
                "batches decoded beforehand, `method.encode(x)` only. Target: harness >= 0.85x bare."]


def binary_section(result: dict) -> list[str]:
    binary, floats = result["binary"], result["float"]
    return [*table(["queries x items", f"{result['bits']}-bit codes search s", f"{result['dim']}-D float32 search s",
                    "float / binary time", "float / binary CPU time", "codes MB", "floats MB", "memory ratio"],
                   [[f"{result['queries']:,} x {result['database']:,}", seconds(binary["search_seconds"]),
                     seconds(floats["search_seconds"]), ratio(result["time_ratio"]), ratio(result["cpu_time_ratio"]),
                     megabytes(binary["database_bytes"] / 2**20), megabytes(floats["database_bytes"] / 2**20),
                     f"{result['memory_ratio']:.0f}x"]]),
            "", f"Exact top-{result['k']} search with FAISS: {binary['index']} against {floats['index']}, search "
                "alone (index built beforehand), median of the runs."]


def ivf_pq_section(result: dict) -> list[str]:
    return [*table(["index", "build s", "search s", "bytes/item", f"recall@{result['k']}", "speed-up"],
                   [["Flat (exact)", seconds(result["flat_build_seconds"]), seconds(result["flat_seconds"]),
                     result["flat_bytes_per_item"], "1.000", "1.00x"],
                    [f"{result['factory']}, nprobe {result['nprobe']}", seconds(result["approximate_build_seconds"]),
                     seconds(result["approximate_seconds"]), result["approximate_bytes_per_item"],
                     f"{result['recall']:.3f}", ratio(result["speedup"])]]),
            "", f"{result['queries']:,} queries x {result['database']:,} synthetic clustered L2-normalised vectors "
                f"of {result['dim']} dimensions ({result['clusters']} centres), inner product via "
                "`retrieval.search.index.SearchIndex`; recall = share of the exact top k the IVF-PQ index also "
                "returns."]


def run_all(size: str, data_root: str | None, threads: int | None) -> dict:
    """Every benchmark at ``size``; {section: (what its run returned, seconds it took)}."""
    arguments = SIZES[size]
    common = ["--threads", str(threads)] if threads is not None else []
    root = ["--data-root", str(resolve_data_root(data_root))]
    steps = {
        "Metrics": lambda: bench_metrics.run(arguments["metrics"]),
        "Miner": lambda: bench_miner.run(bench_miner.parse_args(arguments["miner"])),
        "Training loop": lambda: bench_train.run(bench_train.parse_args([*root, *arguments["train"]])),
        "Extraction": lambda: bench_extract.run(bench_extract.parse_args([*root, *common, *arguments["extract"]])),
        "Hamming vs float search": lambda: bench_binary_search.run(
            bench_binary_search.parse_args([*common, *arguments["binary"]])),
        "IVF-PQ vs flat search": lambda: bench_ivf_pq.run(bench_ivf_pq.parse_args([*common, *arguments["ivf_pq"]])),
    }
    results = {}
    for section, step in steps.items():
        log.info("running: %s", section)
        start = time.perf_counter()
        results[section] = (step(), time.perf_counter() - start)
        log.info("%s done in %.0f s", section, results[section][1])
    return results


WRITERS = {"Metrics": metrics_section, "Miner": miner_section, "Training loop": train_section,
           "Extraction": extract_section, "Hamming vs float search": binary_section,
           "IVF-PQ vs flat search": ivf_pq_section}
SCRIPTS = {"Metrics": "bench_metrics.py", "Miner": "bench_miner.py", "Training loop": "bench_train.py",
           "Extraction": "bench_extract.py", "Hamming vs float search": "bench_binary_search.py",
           "IVF-PQ vs flat search": "bench_ivf_pq.py"}


def markdown(results: dict, command: str, size: str, machine_rows: list[tuple[str, str]]) -> str:
    lines = ["# Benchmarks", "", f"Produced by `{command}` ({size} size"
             + ("; the full size is `python scripts/benchmark.py`" if size != "full" else "") + ").", "",
             "Every ratio compares two implementations measured side by side in this one run, on the same machine "
             "and data. On a machine shared with other jobs the absolute times are noisy (and inflated); the "
             "ratios are what these tables are for.", "", "## Machine", "",
             *table(["", ""], [list(row) for row in machine_rows]), ""]
    for section in SECTIONS:
        result, took = results[section]
        lines += [f"## {section}", "", *WRITERS[section](result), "",
                  f"`scripts/{SCRIPTS[section]}`; this section took {took:.0f} s.", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="size", help="a few minutes")
    size.add_argument("--tiny", action="store_const", const="tiny", dest="size",
                      help="seconds; for the test (numbers meaningless)")
    parser.set_defaults(size="full")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and FAISS threads, also in the benchmarks' subprocesses (default: all cores)")
    parser.add_argument("--data-root", default=None, help="holds flowers102/ (default: $DATA_ROOT, ./data)")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the metric and miner benchmarks' subprocesses
    machine_rows = machine()
    results = run_all(args.size, args.data_root, args.threads)
    command = shlex.join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    Path(args.out).write_text(markdown(results, command, args.size, machine_rows))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
