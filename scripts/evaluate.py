#!/usr/bin/env python
"""Evaluate frozen retrieval methods side by side on one benchmark.

    python scripts/evaluate.py --benchmark flowers102 --method gem --method gap \\
        --backbone tf_efficientnet_lite0 --out results.json
    python scripts/evaluate.py --benchmark revisitop:roxford5k --method gem --image-size 1024
    python scripts/evaluate.py --benchmark revisitop:roxford5k --method asmk --method gem --whiten lw \
        --fit-on revisitop:rparis6k
    accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py --benchmark flowers102 --method gem

Prints a table and writes the results JSON ({"benchmark", "results": [{"method", "metrics",
"descriptor_bytes", "images_per_second"}]}). Under ``accelerate launch`` the processes share the extraction
(each on its own device: ``--device cuda`` for GPUs) and the main process prints and writes the results.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch
from accelerate import PartialState

from msretrieval.data.roots import resolve_data_root
from msretrieval.data.transforms import RESIZE_MODES
from msretrieval.utils.cli import (command_line, full_disk_stops_the_run, non_negative_float, non_negative_int,
                                   positive_int, run_cli)
from msretrieval.retrieval.evaluation.harness import EvalSettings, evaluate_methods, format_table, report, write_report
from msretrieval.retrieval.evaluation.benchmarks import create_benchmark
from msretrieval.retrieval.evaluation.catalogue import MethodContext, available_methods, create_method
from msretrieval.retrieval.aggregation.match_kernels import GAMMAS, KernelSettings
from msretrieval.retrieval.aggregation.regional import parse_region_size
from msretrieval.utils.errors import UserError
from msretrieval.retrieval.evaluation.processes import Processes
from msretrieval.retrieval.aggregation.whitening import WHITENINGS

log = logging.getLogger("evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True,
                        help="flowers102 | flowers102-clutter (clean queries vs cluttered composites, built "
                             "into DATA_ROOT/flowers102-clutter on first use; native image sizes) | "
                             "revisitop:NAME (roxford5k, rparis6k, ...) | csv:PATH[:SPLIT]")
    parser.add_argument("--method", action="append", required=True,
                        help=f"repeatable; one of: {', '.join(available_methods())}, "
                             "run:RUN_DIR (a trained run's best/last checkpoint) or model:FILE; "
                             "itq@BITS[sSEED]:run:RUN_DIR / pca@DIMS:run:RUN_DIR (its descriptors binarised by "
                             "ITQ / PCA-projected, fitted on the training split)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm architecture name")
    parser.add_argument("--weights", default=None, help="local weights file for the backbone (else pretrained)")
    parser.add_argument("--random-init", action="store_true", help="random backbone weights (for smoke tests)")
    parser.add_argument("--data-root", default=None, help="data sets root (default: $DATA_ROOT, else the first of "
                        "../shared/data, ./data, ./datasets that holds the set)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="labelled sets: shorter side (default 224); revisitop: longer side at most N "
                             "(default 1024; shrink only); "
                             "flowers102-clutter: images keep their size unless --resize-mode is given")
    parser.add_argument("--resize-mode", default=None, choices=list(RESIZE_MODES),
                        help="override the benchmark's convention; shorter_max / longer_max only shrink (SCDA: "
                             "shorter_max 700; revisitop's default is longer_max, PIL thumbnail); a query cropped "
                             "to its box keeps the scale of its full image in every mode (docs/evaluation.md)")
    parser.add_argument("--interpolation", default=None, choices=["bilinear", "bicubic", "lanczos", "nearest"],
                        help="resize filter (default: the benchmark's; bilinear, revisitop lanczos as the "
                             "reference code)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (grouped by size)")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="DataLoader worker processes (default 0: on a 2-core CPU a worker slows the network down)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default="cache/descriptors", help="descriptor cache ('' disables it)")
    parser.add_argument("--shard-rows", type=positive_int, default=4096,
                        help="images per descriptor shard: memory holds one shard, an interrupted extraction "
                             "resumes after its last finished shard (default 4096)")
    parser.add_argument("--top-k", type=non_negative_int, default=0,
                        help="also save each query's top-k neighbours, ranked by the method's own scores")
    parser.add_argument("--map-at-k", type=positive_int, default=None,
                        help="labelled benchmarks: also report mAP@K, AP over the top K (deep hashing's mAP@K)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="first N images of a labelled set only (smoke tests; not for reported numbers)")
    parser.add_argument("--together", action="store_true",
                        help="extract all methods in one pass (shared decoding and backbone forward; faster, "
                             "but images/s is then the whole pass's)")
    parser.add_argument("--detector", default=None,
                        help="landmark detector checkpoint (scripts/train_detector.py) for the regional methods")
    parser.add_argument("--max-regions", type=non_negative_int, default=4,
                        help="regional methods: detected boxes per database image, besides the full image")
    parser.add_argument("--region-size", type=_region_size, default=224,
                        help="regional methods: shorter side a detected region's crop is resized to before it is "
                             "described (default 224); 'native': the crop as it is in the evaluated image (its own "
                             "scale, no resizing; sides under 32 px are stretched to 32); 0 (regional kernels "
                             "only): no crop, the whole image's local features inside the box")
    parser.add_argument("--word-budget", type=non_negative_float, default=0.0,
                        help="r_asmk / r_asmk_star, and asmk / asmk_star with several --scales: keep at most this "
                             "many times the word count of the image's scale-1 features per database image (1.2: "
                             "at most 1.2x single-scale ASMK's memory), the strongest ones; 0: no cap")
    # match kernels (vlad, asmk, asmk_star, r_*): docs/aggregation.md; every setting is in the cache key
    kernels, defaults = parser.add_argument_group("match kernels"), KernelSettings()
    kernels.add_argument("--words", type=positive_int, default=None,
                         help=f"codebook size (default {defaults.words})")
    kernels.add_argument("--max-features", type=positive_int, default=None,
                         help=f"local features kept per image at each scale, the strongest by feature norm (default "
                              f"{defaults.max_features}; each region's crop gets as many)")
    kernels.add_argument("--scales", type=_scales, default=None,
                         help="image scales the local features are extracted at, comma-separated, e.g. "
                              "1,0.707,1.414 (default 1); fit, queries and database alike")
    kernels.add_argument("--database-scales", type=_scales, default=None,
                         help="the database side's scales instead (e.g. 1,2; default: --scales): queries and the fit "
                              "stay at --scales, as R-ASMK's crops enlarge database objects only")
    kernels.add_argument("--fit-images", type=positive_int, default=None,
                         help=f"training images whose local features fit the PCA and the codebook (default "
                              f"{defaults.fit_images})")
    kernels.add_argument("--kernel-gamma", choices=GAMMAS, default="default",
                         help="normaliser of asmk, asmk_star, r_asmk, r_asmk_star: default = each kernel's own "
                              "(ASMK (#words)^-1/2, R-ASMK 1 as DELF's regional index), words = (#words)^-1/2 for "
                              "all, one = 1 for all")
    parser.add_argument("--region-score-threshold", type=float, default=None,
                        help="regional methods: keep detections scoring above this (default: the detector's, 0.3)")
    parser.add_argument("--region-nms-threshold", type=float, default=None,
                        help="regional methods: NMS IoU threshold (default: the detector's, 0.5)")
    parser.add_argument("--qe", type=non_negative_int, default=0,
                        help="alpha query expansion over the top N database neighbours (0: off); float "
                             "inner-product methods only. Leave-one-out benchmarks: a query's own copy is not one")
    parser.add_argument("--qe-alpha", type=non_negative_float, default=3.0, help="QE weight exponent (default 3)")
    parser.add_argument("--dba", type=non_negative_int, default=0,
                        help="alpha database-side augmentation over the top N neighbours (0: off), before QE")
    parser.add_argument("--dba-alpha", type=non_negative_float, default=3.0, help="DBA weight exponent (default 3)")
    parser.add_argument("--fit-on", default=None, metavar="SPEC",
                        help="fit the fitted methods (vlad, asmk, r_*, msbd*, itq, itq@/pca@...:run:) and "
                             "--whiten on this set instead of the benchmark's training split (revisitop sets have "
                             "none): flowers102[:SPLIT], csv:PATH[:SPLIT], gldv2:PATH or revisitop:NAME (labels: "
                             "landmarks); refused if it shares an image with the benchmark (docs/evaluation.md)")
    parser.add_argument("--whiten", default=None, choices=list(WHITENINGS),
                        help="whiten float inner-product descriptors, learned on the fit set: pca "
                             "(PCA-whitening) or lw (cirtorch's learned whitening, from same-label pairs)")
    parser.add_argument("--whiten-dims", type=positive_int, default=None,
                        help="keep the first N whitened dimensions (default: all)")
    parser.add_argument("--descriptor-scales", type=_scales, default=(1.0,),
                        help="trained float networks (run:, model:): sum the descriptors of the image resized by "
                             "these factors, comma-separated (cirtorch's multi-scale: 1,0.707,1.414; default 1)")
    parser.add_argument("--out", default=None, help="results JSON path")
    return parser.parse_args(argv)


def _region_size(text: str):
    try:
        return parse_region_size(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,0.707,1.414, got {text!r}") \
            from None
    if any(not 0 < scale < float("inf") for scale in scales) or len(set(scales)) != len(scales):
        raise argparse.ArgumentTypeError(f"scales must be distinct positive numbers, got {text!r}")
    return scales


def continue_after_full_disk(args: argparse.Namespace, argv: list[str] | None) -> str:
    """The same command continues: extraction resumes after the last finished shard of the descriptor cache."""
    again = command_line("scripts/evaluate.py", argv)
    if not args.cache_dir:
        return f"free space, then run again (without a cache it starts over): {again}"
    return f"the finished shards in {args.cache_dir} are kept: free space, then resume with the same command: {again}"


def main(argv=None) -> int:
    args = parse_args(argv)
    # under accelerate launch: one process per device of the chosen kind; alone: just this process
    state = PartialState(cpu=not args.device.startswith("cuda"))
    processes = Processes(state)
    device = str(state.device) if processes.count > 1 else args.device
    if args.random_init:  # the same random network in every process and every run (the cache key says "random")
        torch.manual_seed(0)
    benchmark = create_benchmark(args.benchmark, resolve_data_root(args.data_root), limit=args.limit,
                                 fit_on=args.fit_on)
    context = MethodContext(backbone=args.backbone, pretrained=not args.random_init, weights=args.weights,
                            device=device, share_backbone=args.together, detector=args.detector,
                            max_regions=args.max_regions, region_size=args.region_size,
                            word_budget=args.word_budget, kernel_words=args.words,
                            kernel_max_features=args.max_features, kernel_scales=args.scales,
                            kernel_database_scales=args.database_scales, descriptor_scales=args.descriptor_scales,
                            kernel_fit_images=args.fit_images, kernel_gamma=args.kernel_gamma,
                            region_score_threshold=args.region_score_threshold,
                            region_nms_threshold=args.region_nms_threshold, cache_dir=args.cache_dir or None)
    settings = EvalSettings(image_size=args.image_size, resize_mode=args.resize_mode, batch_size=args.batch_size,
                            num_workers=args.workers, device=device, cache_dir=args.cache_dir or None,
                            top_k=args.top_k, interpolation=args.interpolation, map_at_k=args.map_at_k,
                            shard_rows=args.shard_rows, query_expansion=args.qe, qe_alpha=args.qe_alpha,
                            dba=args.dba, dba_alpha=args.dba_alpha, whiten=args.whiten,
                            whiten_dims=args.whiten_dims)
    methods = [create_method(name, context) for name in args.method]
    with full_disk_stops_the_run("extracting and evaluating", lambda: continue_after_full_disk(args, argv)):
        results = evaluate_methods(methods, benchmark, settings, together=args.together, processes=processes)
    # Leave the process group together and close it: a process that exits with it open (the others returning
    # early below) can abort in the collective backend's threads ("terminate called without an active exception")
    state.wait_for_everyone()
    state.destroy_process_group()
    if not processes.is_main:  # the main process computes the metrics and reports them
        return 0
    for result in results:
        log.info("%s: %s", result.method, {k: round(v, 4) for k, v in result.metrics.items()})
    summary = report(benchmark, results, map_at_k=args.map_at_k)  # + the benchmark's reference rows
    print(format_table(summary))
    if args.out:
        write_report(summary, args.out)
        log.info("results written to %s", args.out)
    return 0


def cli() -> int:
    """Console entry point."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
