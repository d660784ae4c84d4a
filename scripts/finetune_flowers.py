#!/usr/bin/env python
"""Fine-tuning a release on new classes, measured on Flowers-102 (the README's fine-tuning table).

    python scripts/finetune_flowers.py --data-root ../shared/data --out runs/finetune

1. train a base model on classes 1-25 (3 of them held out for checkpoint selection) and export it;
2. fine-tune the release (``train.py --init-from``) on the first 70 % of the images of each of classes 26-51;
3. evaluate the pretrained GeM baseline, the base release and the fine-tuned model on the other 30 % of
   classes 26-51 (each image a query against the rest) and on the test classes 52-102.
Prints one table (mAP and R@1 per set); everything lands under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import train  # noqa: E402
from msretrieval.data.manifest import flowers102
from msretrieval.data.roots import resolve_data_root
from msretrieval.models.retrieval_net import load_model
from msretrieval.release.export import export_release
from msretrieval.retrieval.evaluation.benchmarks import create_benchmark
from msretrieval.retrieval.evaluation.harness import EvalSettings, evaluate_methods
from msretrieval.retrieval.evaluation.catalogue import MethodContext, create_method
from msretrieval.retrieval.descriptors.trained import TrainedModelMethod, resolve_checkpoint
from msretrieval.utils.cli import run_cli

log = logging.getLogger("finetune")
BASE_CLASSES, NEW_CLASSES = range(1, 26), range(26, 52)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default="runs/finetune")
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--train-fraction", type=float, default=0.7, help="of each new class, for fine-tuning")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="evaluate on N images of each set (a quick check of the script; not for numbers)")
    return parser.parse_args(argv)


def write_manifests(data_root: Path, out: Path, train_fraction: float) -> tuple[Path, Path]:
    """base.csv: classes 1-25 (split train); new.csv: classes 26-51, the first ``train_fraction`` of each
    class's images split train, the rest split heldout. Absolute paths."""
    images = flowers102(data_root, "train")
    base_rows, new_rows = [], []
    for label in sorted(set(images.labels.tolist())):
        paths = [p for p, l in zip(images.paths, images.labels) if l == label]
        if label in BASE_CLASSES:
            base_rows += [(p, label, "train") for p in paths]
        elif label in NEW_CLASSES:
            cut = round(train_fraction * len(paths))
            new_rows += [(p, label, "train" if i < cut else "heldout") for i, p in enumerate(paths)]
    out.mkdir(parents=True, exist_ok=True)
    manifests = []
    for name, rows in (("base.csv", base_rows), ("new.csv", new_rows)):
        with (out / name).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "class_id", "split"])
            writer.writerows((str(Path(p).resolve()), label, split) for p, label, split in rows)
        manifests.append(out / name)
    return manifests[0], manifests[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    data_root = resolve_data_root(args.data_root)
    out = Path(args.out)
    base_csv, new_csv = write_manifests(data_root, out, args.train_fraction)
    common = ["--data-root", str(data_root), "--skip-final-eval", "data.val_classes=3", "eval.baselines=[]"]
    if train.main(["--run-dir", str(out / "base"), f"data.train=csv:{base_csv}:train",
                   f"train.steps={args.base_steps}", *common]) != 0:
        return 1
    release = export_release(load_model(resolve_checkpoint(f"run:{out / 'base'}")), out / "release-base",
                             image_size=224, training={"data": f"csv:{base_csv}:train",
                                                       "classes": list(BASE_CLASSES)}, graph=False)
    if train.main(["--run-dir", str(out / "finetuned"), "--init-from", str(release),
                   f"data.train=csv:{new_csv}:train", f"train.steps={args.finetune_steps}", *common]) != 0:
        return 1
    settings = EvalSettings(image_size=224, batch_size=16, cache_dir=None)
    table = {}
    for title, spec in (("classes 26-51, held-out images", f"csv:{new_csv}:heldout"),
                        ("test classes 52-102", "flowers102")):
        benchmark = create_benchmark(spec, data_root, limit=args.eval_limit)
        methods = [create_method("gem", MethodContext(backbone="tf_efficientnet_lite0", pretrained=True)),
                   TrainedModelMethod.from_spec(f"run:{out / 'base'}"),
                   TrainedModelMethod.from_spec(f"run:{out / 'finetuned'}")]
        methods[1].name, methods[2].name = "base release (classes 1-25)", "fine-tuned on classes 26-51"
        for result in evaluate_methods(methods, benchmark, settings):
            table.setdefault(result.method, {})[title] = result.metrics
    titles = ["classes 26-51, held-out images", "test classes 52-102"]
    lines = ["| model | " + " | ".join(f"{t}: mAP | R@1" for t in titles) + " |", "|---" * 5 + "|"]
    for method, metrics in table.items():
        lines.append(f"| {method} | " + " | ".join(f"{metrics[t]['mAP']:.4f} | {metrics[t]['R@1']:.4f}"
                                                    for t in titles) + " |")
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
