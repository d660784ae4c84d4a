"""Tiny generated training sets (small JPEGs, optionally with unreadable files) and a tiny train.py config that
runs a few steps on the CPU in about a second (ResNet-18 + GeM at 64 px, random weights)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

#: How a file is made unreadable: a JPEG cut in the middle, a text file named .jpg, a file that is not there.
BREAKERS = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "not_an_image": lambda path: path.write_text("this is not a JPEG\n"),
    "missing": lambda path: path.unlink(),
}


def write_set(root: Path, num_classes: int = 3, per_class: int = 4, broken: dict[str, str] | None = None,
              size=(48, 40), seed: int = 0) -> tuple[Path, list[Path]]:
    """A labelled set under ``root`` (classes differ in colour) with a manifest; ``broken`` maps file names
    (``c{class}_{i}.jpg``) to a key of :data:`BREAKERS`. Returns (manifest, paths of the broken files)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, damaged = [], []
    for c in range(num_classes):
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            name = f"c{c}_{i}.jpg"
            path = root / "images" / name
            pixels = np.clip(base + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            if broken and name in broken:
                BREAKERS[broken[name]](path)
                damaged.append(path)
            rows.append({"file": str(path), "class_id": c + 1, "split": "train"})
    manifest = root / "labels.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "class_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest, damaged


def tiny_config(run_dir: Path, manifest: Path, steps: int = 4, **train) -> dict:
    """P = 3 classes x K = 2 images a step, GeM head, no validation, no final baselines."""
    return {
        "run_dir": str(run_dir),
        "data": {"train": f"csv:{manifest}", "train_size": 64, "workers": 1, "val_classes": 0},
        "model": {"architecture": "gem", "backbone": "resnet18", "pretrained": False, "init_images": 4},
        "mining": {"miner": "batch", "schedule": [{"semi_hard_probability": 0.5, "hard_threshold": 20}],
                   "classes_per_batch": 3, "images_per_class": 2},
        "optim": {"lr": 0.001, "head_lr": 0.001},
        "train": {"steps": steps, "checkpoint_every": 2, "log_every": 1, "triplet_grid_every": 0,
                  "eval_every": 0, **train},
        "eval": {"benchmark": f"csv:{manifest}", "image_size": 64, "batch_size": 4, "baselines": [],
                 "cache_dir": ""},
    }


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def start_trainer(tmp_path: Path, config: dict):
    """A set-up single-process CPU Trainer for ``config`` (written to ``tmp_path/c.yaml``)."""
    from accelerate import Accelerator

    from msretrieval.training.config import resolve_config
    from msretrieval.training.trainer import Trainer

    trainer = Trainer(resolve_config(write_config(tmp_path / "c.yaml", config)), Path(config["run_dir"]), tmp_path,
                      Accelerator(cpu=True))
    trainer.setup(None)
    return trainer


def run_steps(trainer, steps: int) -> None:
    """``steps`` optimiser steps, then the trainer closed."""
    try:
        for _ in range(steps):
            trainer.train_step()
            trainer.step += 1
    finally:
        trainer.close()
