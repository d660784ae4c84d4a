#!/usr/bin/env python
"""Build the Flowers-102 clutter retrieval set (:mod:`data.clutter`).

    python scripts/build_clutter.py DATA_ROOT/flowers102 DATA_ROOT/flowers102-clutter [--seed S] [--test N]

``--benchmark flowers102-clutter`` builds the same set on first use; this builds it ahead, or with other
parameters.
"""
from __future__ import annotations

import argparse
import sys

from msretrieval.data.clutter import ClutterParams, build_clutter_set
from msretrieval.utils.cli import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("flowers_root", help="folder with labels.csv and images/ (DATA_ROOT/flowers102)")
    parser.add_argument("out_dir", help="output folder (default layout: DATA_ROOT/flowers102-clutter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", type=int, default=ClutterParams.test_composites, help="test composites")
    parser.add_argument("--train", type=int, default=ClutterParams.train_composites, help="train composites")
    parser.add_argument("--canvas", type=int, default=ClutterParams.canvas, help="composite side, pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace a set built with other parameters")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    params = ClutterParams(canvas=args.canvas, test_composites=args.test, train_composites=args.train)
    build_clutter_set(args.flowers_root, args.out_dir, seed=args.seed, params=params, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
