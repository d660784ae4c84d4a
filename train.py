#!/usr/bin/env python
"""Train a retrieval network end to end, then evaluate it frozen next to the unsupervised baselines.

    python train.py --config configs/main.yaml        # the main job (make main; configs/default.yaml: the defaults)
    python train.py --config configs/smoke.yaml train.steps=100 mining.miner=algorithm1
    python train.py --resume runs/flowers102          # continue a run exactly where its newest checkpoint left it
    accelerate launch --multi_gpu --num_processes 2 train.py --config configs/smoke.yaml

The command lives in ``training/cli.py`` (installed as ``msretrieval-train``); see its docstring.
"""
import sys

from msretrieval.training.cli import cli, main, parse_args, peak_memory_gb  # noqa: F401  (tests call train.main)

if __name__ == "__main__":
    sys.exit(cli())
