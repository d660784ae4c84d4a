#!/usr/bin/env python
"""Why does (or doesn't) SCDA beat whole-image pooling? One forward pass per image, many variants.

Extracts the SCDA layers of a labelled benchmark once, then scores variants that differ only in the
selection step, so the comparison isolates what selection buys:

    whole_avgmax   [avg, max] of the whole last map (SCDA with every position selected)
    scda           mean threshold + largest connected component (the paper)
    mask_only      mean threshold, no connected-component step
    thr_x{f}       threshold at f x mean, largest component
    scda_plus      + the earlier layer (0.5 weight), as the paper
    whole_plus     scda_plus without any selection

    python scripts/scda_ablation.py --benchmark flowers102 --image-size 224
"""
from __future__ import annotations

import argparse
import logging
import sys

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from msretrieval.baselines.scda import largest_component, scda_layers, select_and_pool, upsample_mask
from msretrieval.data.roots import resolve_data_root
from msretrieval.data.transforms import EvalTransform
from msretrieval.models.backbones import create_backbone
from msretrieval.models.pooling import l2n
from msretrieval.retrieval.evaluation.benchmarks import LabelledBenchmark, create_benchmark
from msretrieval.retrieval.evaluation.harness import format_table
from msretrieval.retrieval.search.scores import InnerProductScores
from msretrieval.utils.cli import run_cli
from msretrieval.utils.errors import UserError

log = logging.getLogger("scda_ablation")


def selection(fmap: torch.Tensor, factor: float | None, component: bool) -> torch.Tensor:
    """(1, C, h, w) -> (1, 1, h, w) mask: A > factor * mean(A) (None = all), optionally largest component."""
    if factor is None:
        return torch.ones(1, 1, *fmap.shape[-2:], dtype=torch.bool)
    activation = fmap.sum(1)[0]
    mask = (activation > factor * activation.mean()).numpy()
    if component:
        mask = largest_component(mask)
    elif not mask.any():
        mask = np.ones_like(mask)
    return torch.from_numpy(mask)[None, None]


def variants(last: torch.Tensor, earlier: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"gap": l2n(last.mean((-2, -1))), "whole_avgmax": l2n(select_and_pool(last, selection(last, None, False)))}
    for name, factor, component in [("scda", 1.0, True), ("mask_only", 1.0, False), ("thr_x0.5", 0.5, True),
                                    ("thr_x1.5", 1.5, True)]:
        out[name] = l2n(select_and_pool(last, selection(last, factor, component)))
    comp = selection(last, 1.0, True)
    early_own = earlier.sum(1, keepdim=True) > earlier.sum(1, keepdim=True).mean()
    early_mask = early_own & upsample_mask(comp, earlier.shape[-2:])
    out["scda_plus"] = l2n(torch.cat([select_and_pool(last, comp), 0.5 * select_and_pool(earlier, early_mask)], 1))
    full_early = torch.ones_like(early_mask)
    out["whole_plus"] = l2n(torch.cat([select_and_pool(last, selection(last, None, False)),
                                       0.5 * select_and_pool(earlier, full_early)], 1))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="flowers102")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--earlier", default=None, help="earlier tap (default: the SCDA pair of the backbone)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    benchmark = create_benchmark(args.benchmark, resolve_data_root(args.data_root), limit=args.limit)
    if not isinstance(benchmark, LabelledBenchmark):
        raise UserError("the ablation runs on labelled benchmarks (flowers102, csv:...)")
    backbone = create_backbone(args.backbone, pretrained=True).eval()
    last_tap, earlier_tap = scda_layers(args.backbone)
    earlier_tap = args.earlier or earlier_tap
    transform = EvalTransform(args.image_size, "shorter", backbone.preprocessing.mean, backbone.preprocessing.std)
    loader = DataLoader(benchmark.database_dataset(transform), batch_size=1, num_workers=args.workers)
    descriptors: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for images, _ in tqdm(loader, desc="features", unit="img", disable=None):
            maps = backbone.forward_taps(images, [last_tap, earlier_tap])
            for name, vector in variants(maps[last_tap], maps[earlier_tap]).items():
                descriptors.setdefault(name, []).append(vector[0].numpy())
    results = []
    for name, rows in descriptors.items():
        d = np.stack(rows)
        metrics = benchmark.evaluate(InnerProductScores(d, d))
        results.append({"method": name, "metrics": metrics, "descriptor_bytes": d.shape[1] * 4,
                        "images_per_second": float("nan")})
    print(format_table({"benchmark": f"{benchmark.name} {args.backbone} {args.image_size}px "
                                     f"layers {last_tap}+{earlier_tap}", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
