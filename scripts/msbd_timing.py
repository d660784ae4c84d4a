#!/usr/bin/env python
"""Time MSBD's branches on a few benchmark images and extrapolate to a full run.

    python scripts/msbd_timing.py --data-root /work/shared/data --images 100

Prints images/s per branch (global, object and its proposal step, salient) and the estimated wall time of
fitting (``fit_images`` training images) plus extracting the test split, with the current settings
(``$MSBD_CONFIG``) and thread count.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from msretrieval.baselines.msbd.pipeline import MSBDPipeline
from msretrieval.baselines.msbd.settings import MSBDSettings
from msretrieval.data.roots import resolve_data_root
from msretrieval.data.transforms import EvalTransform
from msretrieval.models.backbones import create_backbone
from msretrieval.retrieval.evaluation.benchmarks import create_benchmark
from msretrieval.utils.cli import run_cli

log = logging.getLogger("msbd.timing")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--benchmark", default="flowers102")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--images", type=int, default=100, help="test images to time (spread over classes)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    benchmark = create_benchmark(args.benchmark, resolve_data_root(args.data_root), limit=args.images)
    settings = MSBDSettings.from_env()
    pipeline = MSBDPipeline(create_backbone(args.backbone, pretrained=True), settings).eval()
    pre = pipeline.preprocessing
    transform = EvalTransform(size=args.image_size, mode=benchmark.resize_mode, mean=pre.mean, std=pre.std)
    pipeline._train_features(benchmark.database_dataset(transform))
    seconds = sum(s for name, s in pipeline.timer.seconds.items() if ":" not in name)
    per_image = seconds / args.images
    full = create_benchmark(args.benchmark, resolve_data_root(args.data_root))
    train = full.train_set()
    fit = min(len(train), settings.fit_images or len(train)) if train is not None else 0
    total = len(full.database_paths()) + fit
    print(f"branches: {pipeline.timer.summary()}")
    print(f"{1 / per_image:.2f} img/s over all branches (torch threads: {torch.get_num_threads()}); "
          f"{len(full.database_paths())} test + {fit} fit images -> about {total * per_image / 60:.0f} min")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
