#!/usr/bin/env python
"""Benchmark: local features, PCA, codebooks and aggregated match kernels on real Flowers-102 photos.

Fits the local-feature PCA and the codebooks on ``--train`` images of the ``train`` split, then aggregates
``--database`` images of the ``test`` split with every kernel, times one query against the whole database
(median over ``--queries`` queries) and reports bytes per image. Optionally (``--metrics``) every database
image is a query against the others (leave-one-out mAP / R@1 on that subset: a sanity check, not the
benchmark's protocol). Regions for the regional kernels are a fixed centred box (0.2, 0.2, 0.8, 0.8) after
the full image - no detector yet, so those rows time the machinery only.

    python scripts/bench_aggregation.py                        # 200 train, 1000 database images, C = 256, 1024
    python scripts/bench_aggregation.py --database 300 --words 256 --json out.json
    python scripts/bench_aggregation.py --metrics --features-cache /tmp/features.npz   # reruns skip the network
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from msretrieval.data.datasets import ImageDataset
from msretrieval.data.transforms import EvalTransform
from msretrieval.models.backbones import create_backbone
from msretrieval.retrieval.aggregation import vlad_asmk as agg
from msretrieval.retrieval.aggregation.codebook import fit_or_load_codebook
from msretrieval.retrieval.descriptors.extract import SizeBucketBatchSampler, output_sizes
from msretrieval.retrieval.aggregation.local_features import LocalFeatureExtractor, LocalFeatures
from msretrieval.retrieval.evaluation.metrics import labelled_metrics
from msretrieval.utils.cli import run_cli

BOXES = [agg.FULL_IMAGE, (0.2, 0.2, 0.8, 0.8)]


def manifest(root: Path, split: str, count: int) -> tuple[list[Path], np.ndarray]:
    rows = [r for r in csv.DictReader((root / "flowers102" / "labels.csv").open()) if r["split"] == split]
    step = max(1, len(rows) // count)  # spread over the classes
    rows = rows[::step][:count]
    return [root / "flowers102" / r["file"] for r in rows], np.array([int(r["class_id"]) for r in rows])


def reduced(extractor: LocalFeatureExtractor, features: LocalFeatures) -> LocalFeatures:
    return LocalFeatures(extractor.reduce_descriptors(features.descriptors), features.positions, features.scores,
                         features.scales)


def save_features(path: Path, train, database, stats: dict) -> None:
    """PCA-reduced features of both sets and the extraction statistics, one npz."""
    arrays = {"stats": np.array(json.dumps(stats))}
    for name, features in (("train", train), ("db", database)):
        arrays[f"{name}_counts"] = np.array([len(f) for f in features])
        for field in ("descriptors", "positions", "scores", "scales"):
            arrays[f"{name}_{field}"] = np.concatenate([getattr(f, field) for f in features])
    np.savez(path, **arrays)


def load_features(path: Path):
    with np.load(path) as data:
        out = []
        for name in ("train", "db"):
            bounds = np.concatenate([[0], np.cumsum(data[f"{name}_counts"])])
            fields = [data[f"{name}_{field}"] for field in ("descriptors", "positions", "scores", "scales")]
            out.append([LocalFeatures(*(a[s:e] for a in fields)) for s, e in zip(bounds[:-1], bounds[1:])])
        return out[0], out[1], json.loads(str(data["stats"]))


def extract(extractor: LocalFeatureExtractor, paths, size: int, batch: int):
    """Raw (pre-PCA) local features of every image, and images per second (forward + selection)."""
    preprocessing = extractor.backbone.preprocessing
    transform = EvalTransform(size, mean=preprocessing.mean, std=preprocessing.std)
    dataset = ImageDataset(paths, transform)
    loader = DataLoader(dataset, batch_sampler=SizeBucketBatchSampler(output_sizes(dataset), batch))
    out = [None] * len(paths)
    start = time.perf_counter()
    with torch.no_grad():
        for images, indices in loader:
            images = images.contiguous(memory_format=torch.channels_last)
            for i, features in zip(indices.tolist(), extractor.raw(images)):
                out[i] = features
    return out, len(paths) / (time.perf_counter() - start)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--database", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--words", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dims", type=int, default=128)
    parser.add_argument("--max-features", type=int, default=300)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--metrics", action="store_true", help="leave-one-out mAP / R@1 on the database subset")
    parser.add_argument("--cache-dir", default=None, help="codebook cache (default: none, always fit)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--features-cache", default=None,
                        help="npz of the extracted (PCA-reduced) features and their statistics; reused when present")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(args.data_root)
    report: dict = {"args": vars(args)}

    backbone = create_backbone("tf_efficientnet_lite0", pretrained=True).eval()
    backbone.to(memory_format=torch.channels_last)
    extractor = LocalFeatureExtractor(backbone, max_features=args.max_features, scales=args.scales, dims=args.dims)
    train_paths, _ = manifest(root, "train", args.train)
    db_paths, db_labels = manifest(root, "test", args.database)
    cache = Path(args.features_cache) if args.features_cache else None
    if cache is not None and cache.is_file():
        train_features, db_features, stats = load_features(cache)
    else:
        raw_train, train_speed = extract(extractor, train_paths, args.size, args.batch)
        raw = np.concatenate([f.descriptors for f in raw_train])
        counts = [len(f) for f in raw_train]
        _, pca_time = timed(extractor.fit_pca, raw)
        train_features = [reduced(extractor, f) for f in raw_train]
        del raw, raw_train
        raw_db, db_speed = extract(extractor, db_paths, args.size, args.batch)
        start = time.perf_counter()
        db_features = [reduced(extractor, f) for f in raw_db]
        pca_apply = 1000 * (time.perf_counter() - start) / len(raw_db)
        stats = {"tap": extractor.tap, "channels": int(raw_db[0].descriptors.shape[1]),
                 "per_image_mean": float(np.mean(counts)), "per_image_min": int(min(counts)),
                 "per_image_max": int(max(counts)), "train_images_per_second": train_speed,
                 "database_images_per_second": db_speed, "pca_fit_seconds": pca_time,
                 "pca_training_descriptors": int(sum(counts)), "pca_apply_ms_per_image": pca_apply}
        del raw_db
        if cache is not None:
            save_features(cache, train_features, db_features, stats)
    train = np.concatenate([f.descriptors for f in train_features])
    db_counts = [len(f) for f in db_features]
    stats.update(database_per_image_mean=float(np.mean(db_counts)), database_per_image_min=int(min(db_counts)),
                 database_per_image_max=int(max(db_counts)))
    report["local_features"] = stats
    print(json.dumps(stats, indent=1), flush=True)
    source = {"bench": "flowers102 train", "extractor": extractor.config(), "train": len(train_paths)}
    report["kernels"] = {}
    for words in args.words:
        codebook, fit_time = timed(fit_or_load_codebook, train, words, args.cache_dir, source)
        assignments, assign_time = timed(lambda: [codebook.assign(f.descriptors)[0] for f in db_features])
        builders = {
            "vlad": (lambda f, w: agg.vlad(f.descriptors, codebook, words=w), agg.IDENTITY),
            "asmk": (lambda f, w: agg.asmk(f.descriptors, codebook, words=w), agg.ASMK_SELECTIVITY),
            "asmk*": (lambda f, w: agg.asmk_star(f.descriptors, codebook, words=w), agg.ASMK_SELECTIVITY),
            "r-vlad": (lambda f, w: agg.rvlad(f.descriptors, f.positions, BOXES, codebook, words=w), agg.IDENTITY),
            "naive-r-asmk": (lambda f, w: agg.naive_rasmk(f.descriptors, f.positions, BOXES, codebook, words=w),
                             agg.ASMK_SELECTIVITY),
            "r-asmk": (lambda f, w: agg.rasmk(f.descriptors, f.positions, BOXES, codebook, words=w),
                       agg.ASMK_SELECTIVITY),
            "r-asmk*": (lambda f, w: agg.rasmk(f.descriptors, f.positions, BOXES, codebook, words=w, binary=True),
                        agg.ASMK_SELECTIVITY),
        }
        # queries of the regional kernels are the plain representation (regions on the database side only)
        query_kind = {"r-vlad": "vlad", "naive-r-asmk": "asmk", "r-asmk": "asmk", "r-asmk*": "asmk*"}
        plain: dict[str, list] = {}
        rows = {"codebook_fit_seconds": fit_time, "assign_ms_per_image": 1000 * assign_time / len(db_features)}
        print(f"C={words}: codebook {fit_time:.1f} s, assignment {rows['assign_ms_per_image']:.2f} ms/image")
        for name, (build, sigma) in builders.items():
            start = time.perf_counter()
            items = [build(f, w) for f, w in zip(db_features, assignments)]
            aggregate_ms = 1000 * (time.perf_counter() - start) / len(items)
            plain[name] = items
            queries = plain[query_kind.get(name, name)]
            database, build_time = timed(agg.AggregatedDatabase.build, items, words)
            times = []
            for q in queries[:args.queries]:
                start = time.perf_counter()
                database.scores(q, sigma)
                times.append(time.perf_counter() - start)
            entry = {"aggregate_ms_per_image": aggregate_ms, "database_build_seconds": build_time,
                     "query_ms_vs_database": 1000 * statistics.median(times),
                     "words_per_image_mean": float(np.mean([len(i) for i in items])),
                     "words_per_image_max": int(max(len(i) for i in items)),
                     "bytes_per_image_mean": float(database.descriptor_bytes().mean())}
            if name in ("vlad", "r-vlad"):
                dense = np.stack([agg.to_dense(i, words) for i in items])
                dense_q = np.stack([agg.to_dense(i, words) for i in queries[:args.queries]])
                start = time.perf_counter()
                for q in dense_q:
                    dense @ q
                entry["dense_query_ms_vs_database"] = 1000 * (time.perf_counter() - start) / len(dense_q)
                entry["dense_bytes_per_image"] = agg.dense_vlad_bytes(words, args.dims)
            if args.metrics:
                scores = agg.AggregatedScores(queries, database, sigma)
                start = time.perf_counter()
                metrics = labelled_metrics(scores, db_labels, db_labels)
                entry["metrics_seconds"] = time.perf_counter() - start
                entry.update({k: metrics[k] for k in ("mAP", "R@1")})
            rows[name] = entry
            print(f"C={words} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in entry.items()), flush=True)
        report["kernels"][str(words)] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(run_cli(main))
