#!/usr/bin/env python
"""Training throughput: train.py's loop against a bare PyTorch loop with the same model, batch and loss.

Both train the same network (the config's model, same frozen/trainable split, BatchNorm frozen) on batches
of the same size (3 x triplets_per_step images at train_size) with the same triplet loss and AdamW; the bare
loop draws random triplets and loads them with a plain DataLoader, train.py mines them with Algorithm 1.
Printed: images/s of the optimisation steps alone (the like-for-like number), and of train.py including its
mining rounds.

    python scripts/bench_train.py --steps 40
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import train  # noqa: E402
from data.images import load_image  # noqa: E402
from data.roots import resolve_data_root  # noqa: E402
from data.train_transforms import TrainTransform  # noqa: E402
from losses import create_loss  # noqa: E402
from miners.pool import MiningPool  # noqa: E402
from models.retrieval_net import create_model  # noqa: E402
from training.data import load_training_set  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.config import apply_overrides, load_yaml  # noqa: E402

log = logging.getLogger("bench_train")


class TripletImages(Dataset):
    """Random (anchor, positive, negative) image triples, loaded and augmented like train.py does."""

    def __init__(self, images, transform, count: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        labels = np.asarray(images.labels)
        self.triplets = []
        for _ in range(count):
            anchor = int(rng.integers(len(labels)))
            positives = np.flatnonzero(labels == labels[anchor])
            negatives = np.flatnonzero(labels != labels[anchor])
            self.triplets.append((anchor, int(rng.choice(positives)), int(rng.choice(negatives))))
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, i):
        return torch.stack([self.transform(load_image(self.images.paths[j])) for j in self.triplets[i]])


def bare_loop(config: dict, data_root: Path, steps: int) -> float:
    torch.manual_seed(0)
    m = config["model"]
    model = create_model(m["architecture"], backbone=m["backbone"], pretrained=m["pretrained"], **m["head"])
    train.freeze(model, m["trainable"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["optim"]["lr"])
    loss_fn = create_loss(config["loss"]["name"], margin=config["loss"]["margin"])
    images = load_training_set(config["data"]["train"], data_root)
    pre = model.preprocessing
    t = config["train"]["triplets_per_step"]
    dataset = TripletImages(images, TrainTransform(config["data"]["train_size"], pre.mean, pre.std), (steps + 2) * t)
    loader = DataLoader(dataset, batch_size=t, num_workers=config["data"].get("workers", 2))
    indices = MiningPool.indices_tuple(3 * t)
    seen, elapsed = 0, 0.0
    for step, batch in enumerate(loader):
        if step == steps + 2:
            break
        tick = time.perf_counter()
        batch = batch.transpose(0, 1).reshape(-1, *batch.shape[2:])  # [anchors, positives, negatives]
        train.set_train_mode(model)
        loss = loss_fn(model(batch), torch.arange(len(batch)), indices)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:  # warm-up steps excluded
            elapsed += time.perf_counter() - tick
            seen += len(batch)
    return seen / elapsed


def train_py(config: dict, data_root: Path, steps: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as run_dir:
        config = apply_overrides(config, [f"train.steps={steps}", "train.checkpoint_every=1000000"])
        trainer = train.Trainer(config, Path(run_dir), data_root, Accelerator(cpu=True))
        trainer.setup(None)
        start = time.perf_counter()
        trainer.fit()
        total = time.perf_counter() - start
        timing = trainer.timing
    return timing["images"] / timing["step_seconds"], timing["images"] / total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(train.DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = apply_overrides(load_yaml(args.config), args.overrides)
    data_root = resolve_data_root(args.data_root)
    bare = bare_loop(config, data_root, args.steps)
    steps_only, overall = train_py(config, data_root, args.steps)
    print(f"batch: {3 * config['train']['triplets_per_step']} images at {config['data']['train_size']} px, "
          f"{config['model']['architecture']} on {config['model']['backbone']}, {args.steps} steps")
    print(f"bare PyTorch loop            {bare:7.1f} img/s")
    print(f"train.py, optimisation steps {steps_only:7.1f} img/s  ({steps_only / bare:.2f}x the bare loop)")
    print(f"train.py, with mining rounds {overall:7.1f} img/s  ({overall / bare:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
