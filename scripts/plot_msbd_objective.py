#!/usr/bin/env python
"""Plot the objective of MSBD's binary learning (Algorithm 1) over its iterations, as the paper's Fig. 2.

    # from saved msbd_float descriptors (an (N, D) .npy, e.g. a descriptor-cache entry):
    python scripts/plot_msbd_objective.py --descriptors cache/descriptors/flowers102/msbd_float-....npy
    # or extract them from the benchmark's training split first (slow: runs the three branches):
    python scripts/plot_msbd_objective.py --benchmark flowers102 --data-root /work/shared/data

Writes a PNG (objective per iteration relative to the first, one curve per code length; ITQ's own loss for reference)
and, with --save-descriptors, the training descriptors for later runs. Settings: $MSBD_CONFIG.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from msretrieval.baselines.msbd.binary import learn_msbd
from msretrieval.baselines.msbd.settings import MSBDSettings
from msretrieval.utils.cli import run_cli
from msretrieval.utils.errors import UserError

log = logging.getLogger("plot_msbd_objective")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--descriptors", help="(N, D) msbd_float descriptors (.npy)")
    source.add_argument("--benchmark", help="extract msbd_float of this benchmark's training split")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--bits", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--save-descriptors", default=None, help="also save the extracted descriptors (.npy)")
    parser.add_argument("--out", default="msbd_objective.png")
    return parser.parse_args(argv)


def training_descriptors(args, settings: MSBDSettings) -> np.ndarray:
    from msretrieval.data.datasets import ImageDataset
    from msretrieval.data.roots import resolve_data_root
    from msretrieval.retrieval.evaluation.benchmarks import create_benchmark
    from msretrieval.retrieval.evaluation.harness import EvalSettings, _transform
    from msretrieval.retrieval.descriptors.methods import MethodContext

    from msretrieval.baselines.msbd.methods import shared_pipeline
    benchmark = create_benchmark(args.benchmark, resolve_data_root(args.data_root))
    train = benchmark.train_set()
    if train is None:
        raise UserError(f"{args.benchmark} has no training split")
    pipeline = shared_pipeline(MethodContext(backbone=args.backbone), settings)
    pipeline.fit(ImageDataset(train.paths, _transform(pipeline, benchmark, EvalSettings())), train.labels)
    return pipeline.train_float


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = MSBDSettings.from_env()
    if args.descriptors:
        x = np.load(args.descriptors)
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
            raise UserError(f"{args.descriptors}: expected (N, D) float descriptors, got {x.dtype} {x.shape}")
    else:
        x = training_descriptors(args, settings)
        if args.save_descriptors:
            np.save(args.save_descriptors, x)
            log.info("descriptors saved to %s", args.save_descriptors)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for bits in args.bits:
        model = learn_msbd(x, bits, density=settings.density, iterations=settings.iterations,
                           itq_iterations=settings.itq_iterations, sparsify=settings.sparsify,
                           trials=settings.trials, alpha=settings.alpha, monotone=settings.monotone,
                           seed=settings.seed)
        log.info("%d bits: objective %.6g -> %.6g", bits, model.objective[0], model.objective[-1])
        # relative to the first iteration: the absolute loss is dominated by a constant (the code's ones)
        for ax, history in zip(axes, (model.objective, model.itq_objective)):
            ax.plot(np.arange(1, len(history) + 1), np.asarray(history) / history[0], label=f"{bits} bits")
    axes[0].set(title=f"MSBD binary learning (k/L = {settings.density}, {settings.sparsify} sparsification)",
                xlabel="iteration", ylabel="(||RX - B||^2 + alpha ||B||_1) / first")
    axes[1].set(title="ITQ initialisation", xlabel="iteration", ylabel="||B - VR||^2 / first")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    figure.suptitle(f"{len(x)} descriptors, {x.shape[1]} dims")
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    log.info("objective plot written to %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
