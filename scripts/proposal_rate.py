#!/usr/bin/env python
"""How often a landmark detector proposes regions on a set of images, as the regional methods would use it.

    python scripts/proposal_rate.py --detector runs/detector/best.pth                  # Flowers-102 test photos
    python scripts/proposal_rate.py --detector runs/detector/best.pth --images flowers102:train --limit 500
    python scripts/proposal_rate.py --detector det.pth --images csv:my/labels.csv:test --out rate.json

Every image goes through the evaluation's own path: resized as the benchmark resizes it (``--image-size``,
``--resize-mode``; default: shorter side 224, Flowers-102's), normalised, then handed to
``retrieval.aggregation.regional.RegionProposer`` with the evaluation's settings (``--max-regions`` 4, the checkpoint's
score threshold 0.3, NMS 0.5 and ``min_box_side``, unless overridden). The full-image region every method keeps
is not a proposal. Prints one table line and optionally writes the numbers as JSON:

- ``with_proposals``: share of images with at least one proposal (on an uncluttered photo a detector that
  learned objects, not paste edges, should box the flower);
- ``proposals_per_image``: mean number of proposals;
- ``coverage``: mean fraction of the image covered by the union of its proposals (0 for an image without
  any), and ``coverage_when_proposed`` the same over the images with proposals only;
- ``box_area``: mean area of one proposal, as a fraction of the image.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from msretrieval.data.images import load_image
from msretrieval.data.manifest import LabelledImageSet, flowers102, read_csv_manifest
from msretrieval.data.roots import resolve_data_root
from msretrieval.data.transforms import RESIZE_MODES, EvalTransform
from msretrieval.models.backbones import Preprocessing
from msretrieval.models.boxes import box_area, union_area
from msretrieval.retrieval.aggregation.regional import RegionProposer
from msretrieval.utils.cli import non_negative_int, positive_int, run_cli
from msretrieval.utils.errors import UserError

log = logging.getLogger("proposal_rate")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True, help="detector checkpoint (scripts/train_detector.py)")
    parser.add_argument("--images", default="flowers102:test",
                        help="flowers102:SPLIT (test = the 4,696 photos of classes 52-102, train = 1-51) or "
                             "csv:PATH[:SPLIT] (default flowers102:test)")
    parser.add_argument("--data-root", default=None, help="data sets root (default: $DATA_ROOT, else ./data)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="N images spread evenly over the list (recipe selection on a subset)")
    parser.add_argument("--image-size", type=positive_int, default=224, help="default 224 (Flowers-102's)")
    parser.add_argument("--resize-mode", default="shorter", choices=RESIZE_MODES, help="default shorter")
    parser.add_argument("--max-regions", type=non_negative_int, default=4, help="proposals kept (default 4)")
    parser.add_argument("--score-threshold", type=float, default=None, help="default: the detector's (0.3)")
    parser.add_argument("--nms-threshold", type=float, default=None, help="default: the detector's (0.5)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write the numbers (and per-image counts) as JSON")
    return parser.parse_args(argv)


def image_list(spec: str, data_root: Path) -> LabelledImageSet:
    if spec.startswith("flowers102:"):
        return flowers102(data_root, spec.split(":", 1)[1])
    if spec.startswith("csv:"):
        path, _, split = spec[4:].partition(":")
        return read_csv_manifest(path, split=split or None)
    raise UserError(f"--images {spec!r}: use flowers102:SPLIT or csv:PATH[:SPLIT]")


def evenly_spread(count: int, limit: int | None) -> np.ndarray:
    """``limit`` indices spread evenly over ``range(count)`` (all of them without a limit)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.unique(np.round(np.linspace(0, count - 1, limit)).astype(np.int64))


def proposal_statistics(regions: list[np.ndarray]) -> dict:
    """The summary of :func:`RegionProposer`'s output, per image an (n + 1, 4) array, the full image first."""
    proposals = [boxes[1:] for boxes in regions]
    counts = np.asarray([len(boxes) for boxes in proposals])
    coverage = np.asarray([union_area(boxes) for boxes in proposals])
    areas = np.concatenate([box_area(boxes) for boxes in proposals]) if counts.sum() else np.zeros(0)
    proposed = counts > 0
    return {"images": int(len(counts)), "with_proposals": float(proposed.mean()) if len(counts) else float("nan"),
            "images_with_proposals": int(proposed.sum()),
            "proposals_per_image": float(counts.mean()) if len(counts) else float("nan"),
            "coverage": float(coverage.mean()) if len(counts) else float("nan"),
            "coverage_when_proposed": float(coverage[proposed].mean()) if proposed.any() else float("nan"),
            "box_area": float(areas.mean()) if len(areas) else float("nan")}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = image_list(args.images, resolve_data_root(args.data_root))
    chosen = evenly_spread(len(images), args.limit)
    proposer = RegionProposer(args.detector, max_regions=args.max_regions, score_threshold=args.score_threshold,
                              nms_threshold=args.nms_threshold)
    # the proposer un-normalises what it is given: any mean / std round-trips to the same pixels
    preprocessing = Preprocessing()
    transform = EvalTransform(size=args.image_size, mode=args.resize_mode, mean=preprocessing.mean,
                              std=preprocessing.std)
    start = time.perf_counter()
    regions = []
    for index in tqdm(chosen, desc="proposals", unit="img", dynamic_ncols=True, disable=None):
        tensor = transform(load_image(images.paths[index]))
        regions += proposer(tensor[None], preprocessing)
    seconds = time.perf_counter() - start
    stats = proposal_statistics(regions)
    print(f"{args.images}{f' ({len(chosen)} of {len(images)})' if len(chosen) < len(images) else ''}: "
          f"{stats['images_with_proposals']} of {stats['images']} images with a proposal "
          f"({100 * stats['with_proposals']:.1f} %), {stats['proposals_per_image']:.2f} proposals per image, "
          f"coverage {stats['coverage']:.3f} ({stats['coverage_when_proposed']:.3f} where proposed), "
          f"box area {stats['box_area']:.3f}; {seconds:.0f} s")
    if args.out:
        record = {**stats, "images_spec": args.images, "limit": args.limit, "seconds": round(seconds, 1),
                  "image_size": args.image_size, "resize_mode": args.resize_mode, **proposer.config(),
                  "proposals": [int(len(r) - 1) for r in regions],
                  "files": [str(images.paths[i]) for i in chosen]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        log.info("written to %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
