#!/usr/bin/env python
"""Train the landmark detector (class-agnostic Faster R-CNN, ``models.detector``) on a box CSV.

    python scripts/train_detector.py --boxes data/composites/boxes.csv --out runs/detector
    python scripts/train_detector.py --boxes boxes.csv --out runs/det --steps 600 --eval-split test
    python scripts/train_detector.py --boxes boxes_split1.csv --test-boxes boxes_split2.csv \\
        --image-root gld/train --skip-missing --out runs/det-gld        # Google-Landmarks boxes layout
    python scripts/train_detector.py --resume runs/detector --steps 900   # continue (and extend) a run

Box CSV layouts (``data/boxes.py``): ``file,x1,y1,x2,y2[,class_id][,split]`` (one row per box, normalised
coordinates, files relative to the CSV's folder) or Google-Landmarks' ``id,box`` (box = normalised
``ymin xmin ymax xmax`` groups; images ``ROOT/<id>.jpg`` or ``ROOT/a/b/c/<id>.jpg``).
Rows of split ``train`` train, ``--val-fraction`` of those images validate (``best.pth`` = best validation
AP@0.5), split ``test`` is evaluated once at the end with ``--eval-split test``.

Writes RUN_DIR/options.json, last.pth (every evaluation, atomic; ``--resume``), best.pth, tb/ (TensorBoard)
and results.json. Checkpoints load with ``models.detector.load_detector(path)`` (``weights_only``).
Default optimiser: AdamW, lr 2e-4, weight decay 1e-4, 20 warm-up steps, cosine decay.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch  # noqa: E402

from msretrieval.training.detection import DEFAULTS, DetectorTrainer
from msretrieval.utils.cli import run_cli

log = logging.getLogger("train_detector")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--boxes", help="box CSV (either layout)")
    data.add_argument("--image-root", help="folder the CSV's files / ids are relative to (default: the CSV's)")
    data.add_argument("--test-boxes", help="a second box CSV whose images are all split 'test'")
    data.add_argument("--skip-missing", action="store_true", help="drop listed images that do not exist")
    data.add_argument("--val-fraction", type=float, help=f"train images held out (default {DEFAULTS['val_fraction']})")
    run = parser.add_argument_group("run")
    run.add_argument("--out", help="new run directory")
    run.add_argument("--resume", help="run directory (or its last.pth) to continue")
    run.add_argument("--steps", type=int, help=f"optimiser steps (default {DEFAULTS['steps']})")
    run.add_argument("--batch-size", type=int, help=f"images per step (default {DEFAULTS['batch_size']})")
    run.add_argument("--optimizer", choices=["adamw", "sgd"], help="default adamw")
    run.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULTS['lr']})")
    run.add_argument("--weight-decay", type=float, help=f"default {DEFAULTS['weight_decay']}")
    run.add_argument("--warmup", type=int, help=f"linear warm-up steps (default {DEFAULTS['warmup']})")
    run.add_argument("--eval-every", type=int, help=f"validate + checkpoint every N steps (default "
                     f"{DEFAULTS['eval_every']}; 0: at the end only)")
    run.add_argument("--eval-split", choices=["test"], help="evaluate best.pth on split 'test' at the end")
    run.add_argument("--seed", type=int, help="default 0")
    run.add_argument("--workers", type=int, help="DataLoader worker processes (default 0)")
    run.add_argument("--log-every", type=int, help="TensorBoard loss scalars every N steps (default 10)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: torch's; 1 is often faster on a busy shared machine)")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", help=f"timm name (default {DEFAULTS['backbone']})")
    model.add_argument("--random-init", dest="pretrained", action="store_const", const=False,
                       help="no ImageNet weights (tests)")
    model.add_argument("--weights", help="local backbone weights file")
    model.add_argument("--tap", help="backbone feature map (default blocks4: stride 16)")
    model.add_argument("--min-size", type=int, help=f"default {DEFAULTS['min_size']}")
    model.add_argument("--max-size", type=int, help=f"default {DEFAULTS['max_size']}")
    model.add_argument("--frozen-blocks", type=int, help=f"default {DEFAULTS['frozen_blocks']}")
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.resume):
        parser.error("give exactly one of --out (a new run) and --resume (an existing one)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    for key in ("boxes", "image_root", "test_boxes", "weights"):
        if key in given:
            given[key] = str(Path(given[key]).resolve())
    if not args.skip_missing:
        given.pop("skip_missing", None)
    if args.resume:
        trainer = DetectorTrainer.resume(args.resume, given)
    else:
        trainer = DetectorTrainer.start(args.out, given)
    trainer.fit()
    results = trainer.finish()
    line = (f"{results['steps']} steps, {results['steps_per_second']:.3f} steps/s; best validation AP@0.5 "
            f"{results['best_val_ap50']} (step {results['best_step']})")
    if "test" in results:
        line += f"; test AP@0.5 {results['test']['ap50']:.4f}, recall {results['test']['recall50']:.4f}"
    log.info("%s -> %s", line, trainer.run_dir / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
