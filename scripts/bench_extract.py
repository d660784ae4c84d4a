#!/usr/bin/env python
"""Extraction throughput: the harness's ``retrieval.descriptors.extract.extract`` against a bare ``encode(x)`` loop.

Harness: ``extract(method, ImageDataset(...), batch_size, num_workers)`` on real Flowers-102 test images
with the evaluation transform (shorter side ``--size``, the method's mean/std), i.e. header reads for the
size buckets, the DataLoader, JPEG decoding, resizing, batching the uint8 pixels, normalising the batch (which
comes out channels-last) and the network.
Bare: the very same batches (same SizeBucketBatchSampler, same order), decoded and stacked beforehand,
channels-last, ``method.encode(x)`` under ``no_grad``. Same method object, same torch threads. The two
alternate ``--repeats`` times and the best time of each counts (the first pass also warms oneDNN's
per-shape kernels; the best is the least disturbed by other jobs on a shared machine).

The harness's extra work is also timed on its own, once: header reads (``output_sizes``), decoding
(``load_image``), resizing to uint8 pixels, stacking + normalising the batch, and - a variation, not what
the harness does - decoding with PIL's JPEG draft mode (DCT-domain downscaling to at least the output size).

    python scripts/bench_extract.py                           # 1,000 images, gem on tf_efficientnet_lite0
    python scripts/bench_extract.py --images 200 --threads 2
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from msretrieval.data.datasets import ImageDataset
from msretrieval.data.images import load_image
from msretrieval.data.manifest import flowers102
from msretrieval.data.roots import resolve_data_root
from msretrieval.data.transforms import EvalTransform
from msretrieval.models.backbones import offline_weights_path
from msretrieval.retrieval.descriptors.extract import SizeBucketBatchSampler, extract, output_sizes
from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method
from msretrieval.utils.cli import benchmark_main, run_cli

log = logging.getLogger("bench_extract")


def spread_paths(data_root: Path, count: int) -> list[Path]:
    """``count`` test images spread over the classes (every n-th of the manifest)."""
    paths = flowers102(data_root, "test").paths
    step = max(1, len(paths) // count)
    return list(paths[::step][:count])


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def decoded_batches(dataset: ImageDataset, batches: list[list[int]]) -> tuple[list[torch.Tensor], dict]:
    """The batches as the harness makes them (resized uint8 pixels, stacked, normalised: channels-last float
    tensors), and the seconds spent on each step of making them."""
    load_seconds = transform_seconds = collate_seconds = 0.0
    tensors = []
    for batch in batches:
        items = []
        for index in batch:
            image, seconds = timed(load_image, dataset.paths[index])
            load_seconds += seconds
            item, seconds = timed(dataset.transform.pixels, image)
            transform_seconds += seconds
            items.append(item)
        start = time.perf_counter()
        tensors.append(dataset.transform.normalize(torch.stack(items)).contiguous(memory_format=torch.channels_last))
        collate_seconds += time.perf_counter() - start
    return tensors, {"load_seconds": load_seconds, "transform_seconds": transform_seconds,
                     "collate_seconds": collate_seconds}


def draft_load_seconds(dataset: ImageDataset, sizes: list[tuple[int, int]]) -> float:
    """Decoding time with JPEG draft mode: libjpeg scales by 1/2, 1/4 or 1/8 while decoding, to the smallest
    scale still at least the output size (a candidate fix; not what the harness does)."""
    start = time.perf_counter()
    for path, size in zip(dataset.paths, sizes):
        with Image.open(path) as image:
            image.draft("RGB", size)
            image.convert("RGB")
    return time.perf_counter() - start


@torch.no_grad()
def bare_loop(method, tensors: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for images in tensors:
        method.encode(images)
    return time.perf_counter() - start


def harness_pass(method, dataset: ImageDataset, batch_size: int, num_workers: int) -> tuple[float, float]:
    """Wall seconds of the whole ``extract`` call (header reads included) and the images/s it reports."""
    extraction, seconds = timed(lambda: extract(method, dataset, batch_size=batch_size, num_workers=num_workers,
                                                description="bench"))
    return seconds, extraction.images_per_second


def run(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    paths = spread_paths(resolve_data_root(args.data_root), args.images)
    # The offline ImageNet weights when installed; random weights time the same.
    pretrained = offline_weights_path(args.backbone) is not None
    method = create_method(args.method, MethodContext(backbone=args.backbone, pretrained=pretrained))
    method.eval().to(memory_format=torch.channels_last)
    pre = method.preprocessing
    dataset = ImageDataset(paths, EvalTransform(args.size, mean=tuple(pre.mean), std=tuple(pre.std)))
    sizes, header_seconds = timed(output_sizes, dataset)
    batches = SizeBucketBatchSampler(sizes, args.batch_size).batches  # what extract() batches, in its order
    tensors, breakdown = decoded_batches(dataset, batches)
    bare_times, harness_times, reported = [], [], []
    for repeat in range(args.repeats):
        bare_times.append(bare_loop(method, tensors))
        seconds, images_per_second = harness_pass(method, dataset, args.batch_size, args.workers)
        harness_times.append(seconds)
        reported.append(images_per_second)
        log.info("pass %d: bare %.2f s, harness %.2f s", repeat + 1, bare_times[-1], seconds)
    bare, harness = min(bare_times), min(harness_times)
    return {"images": len(paths), "batches": len(batches), "distinct_sizes": len(set(sizes)),
            "batch_size": args.batch_size, "workers": args.workers, "size": args.size, "method": args.method,
            "backbone": args.backbone, "pretrained": pretrained, "threads": torch.get_num_threads(),
            "repeats": args.repeats, "bare_seconds": bare, "harness_seconds": harness,
            "bare_images_per_second": len(paths) / bare, "harness_images_per_second": len(paths) / harness,
            "harness_reported_images_per_second": max(reported), "ratio": bare / harness,
            "all_bare_seconds": bare_times, "all_harness_seconds": harness_times,
            "header_seconds": header_seconds, **breakdown,
            "draft_load_seconds": draft_load_seconds(dataset, sizes)}


def report(result: dict) -> str:
    n = result["images"]
    ms = lambda seconds: f"{1000 * seconds / n:.2f} ms/img"  # noqa: E731
    extra = result["harness_seconds"] - result["bare_seconds"]
    return "\n".join([
        f"{n} Flowers-102 test images, shorter side {result['size']}, {result['batches']} batches of <= "
        f"{result['batch_size']} ({result['distinct_sizes']} distinct sizes), {result['method']} on "
        f"{result['backbone']}, {result['threads']} torch thread(s), {result['workers']} loader worker(s); "
        f"best of {result['repeats']}",
        f"bare encode loop (decoded tensors)  {result['bare_images_per_second']:7.1f} img/s  "
        f"({result['bare_seconds']:.2f} s)",
        f"harness extract()                   {result['harness_images_per_second']:7.1f} img/s  "
        f"({result['harness_seconds']:.2f} s; it reports {result['harness_reported_images_per_second']:.1f} img/s)"
        f"  = {result['ratio']:.2f}x the bare loop",
        f"harness minus bare: {ms(extra)}; measured alone: header reads {ms(result['header_seconds'])}, decoding "
        f"{ms(result['load_seconds'])}, resize to uint8 pixels {ms(result['transform_seconds'])}, stack + normalise "
        f"{ms(result['collate_seconds'])}; decoding in JPEG draft mode {ms(result['draft_load_seconds'])}"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="holds flowers102/ (default: $DATA_ROOT, ./data)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224, help="shorter side, as the flowers102 benchmark")
    parser.add_argument("--batch-size", type=int, default=16, help="the harness's default")
    parser.add_argument("--workers", type=int, default=0, help="the harness's default")
    parser.add_argument("--method", default="gem")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes of each; the best counts")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return benchmark_main(parse_args, run, report, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
