#!/usr/bin/env python
"""Export a training run as a release that downstream code loads without the training code.

    python scripts/export.py runs/flowers102 releases/flowers102          # best.pth, else last.pth
    python scripts/export.py runs/flowers102 releases/flowers102-last --checkpoint last

Writes OUT_DIR/model.safetensors, config.json (network, input, descriptor, training data and classes,
evaluation table from the run's results.json, code version, weights SHA-256), README.md (model card) and
model.pt2 (a torch.export graph; ``--no-graph`` skips it). Load it with ``release.load_release(OUT_DIR)`` or
``torch.hub.load(REPO_DIR, "retriever", source="local", release=OUT_DIR)``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np  # noqa: E402

from msretrieval.data.roots import resolve_data_root
from msretrieval.models.retrieval_net import load_model
from msretrieval.release.export import export_release
from msretrieval.retrieval.descriptors.trained import resolve_checkpoint
from msretrieval.utils.cli import run_cli
from msretrieval.utils.config import load_yaml

log = logging.getLogger("export")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a train.py run directory")
    parser.add_argument("out_dir", help="the release directory to create (must be new or empty)")
    parser.add_argument("--checkpoint", choices=["best", "last"], default=None,
                        help="default: best.pth if the run has one (validation-selected), else last.pth")
    parser.add_argument("--no-graph", dest="graph", action="store_false",
                        help="skip model.pt2, the torch.export graph (dynamic batch and image size; a few seconds)")
    parser.add_argument("--data-root", default=None, help="to list the training classes (default: the run's)")
    return parser.parse_args(argv)


def training_record(run_dir: Path, config: dict, data_root: str | None) -> dict:
    """What the network was trained on: data, classes (validation classes apart), steps, selection."""
    from msretrieval.training.data import load_training_set, split_validation_classes

    data, results = config["data"], run_dir / "results.json"
    record = {"run": run_dir.name, "data": data["train"], "seed": config["seed"], "steps": config["train"]["steps"],
              "miner": config["mining"]["miner"], "loss": config["loss"]["name"],
              "train_size": data["train_size"], "init_from": config["model"]["init_from"]}
    if results.is_file():
        training = json.loads(results.read_text()).get("training", {})
        record["best_validation_mAP"] = training.get("best_validation_mAP")
    try:
        images = load_training_set(data["train"], resolve_data_root(data_root or data["root"]))
    except (OSError, ValueError) as error:
        log.warning("training classes not recorded: %s", error)
        return record
    fit, held_out = split_validation_classes(images, data["val_classes"], int(config["seed"]))
    record.update({"images": len(fit), "classes": sorted(int(c) for c in np.unique(fit.labels)),
                   "validation_classes": [] if held_out is None else sorted(int(c) for c in np.unique(held_out.labels))})
    return record


def evaluation_record(run_dir: Path) -> dict:
    """The run's final table (results.json): the trained row and the baselines evaluated alongside."""
    path = run_dir / "results.json"
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())
    table = [{"method": row["method"], "metrics": row["metrics"]} for row in results["results"]]
    return {"benchmark": results["benchmark"], "method": table[-1]["method"], "metrics": table[-1]["metrics"],
            "table": table}


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'} not found: give a train.py run directory")
    config = load_yaml(run_dir / "config.yaml")
    checkpoint = run_dir / f"{args.checkpoint}.pth" if args.checkpoint else resolve_checkpoint(f"run:{run_dir}")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} not found")
    evaluated = resolve_checkpoint(f"run:{run_dir}")  # the checkpoint the run's final table measured
    evaluation = evaluation_record(run_dir) if checkpoint.resolve() == evaluated.resolve() else {}
    if not evaluation:
        log.warning("the release carries no evaluation: the run's table measured %s", evaluated.name)
    # the benchmark's resize convention: revisitop resizes the longer side, labelled sets the shorter one
    resize = "longer" if config["eval"]["benchmark"].startswith("revisitop") else "shorter"
    out = export_release(load_model(checkpoint), args.out_dir, image_size=config["eval"]["image_size"],
                         resize=resize, evaluation=evaluation, graph=args.graph,
                         training={**training_record(run_dir, config, args.data_root), "checkpoint": checkpoint.name})
    print(f"release: {out} ({checkpoint})")
    return 0


def cli() -> int:
    """Console entry point."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
