#!/usr/bin/env python
"""Training throughput: the trainer (training/trainer.py) against a bare PyTorch loop doing the same work.

Both train the config's network (same trainable split, BatchNorm frozen, channels-last) on P x K batches of
``data.train_size`` crops with the same in-batch miner, triplet loss and AdamW; the bare loop loads images
with a plain DataLoader. Printed: images/s of both over the same number of steps (two warm-up steps
excluded from the bare loop; the trainer's own timing counts its optimisation steps).

    python scripts/bench_train.py --steps 30
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from msretrieval.data.roots import resolve_data_root
from msretrieval.data.samplers import ClassBalancedBatchSampler
from msretrieval.data.train_transforms import TrainDataset, TrainTransform
from msretrieval.losses import create_loss
from msretrieval.miners import create_miner
from msretrieval.models.retrieval_net import create_model
from msretrieval.training.config import DEFAULT_CONFIG, resolve_config
from msretrieval.training.data import load_training_set
from msretrieval.training.optimization import freeze, set_train_mode
from msretrieval.training.trainer import Trainer
from msretrieval.utils.cli import run_cli

log = logging.getLogger("bench_train")


def bare_loop(config: dict, data_root: Path, steps: int) -> float:
    torch.manual_seed(0)
    m, mining = config["model"], config["mining"]
    model = create_model(m["architecture"], backbone=m["backbone"], pretrained=m["pretrained"], **m["head"])
    freeze(model, m["trainable"])
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["optim"]["lr"])
    loss_fn = create_loss(config["loss"]["name"], margin=config["loss"]["margin"])
    miner = create_miner("semihard", loss_fn, seed=0)
    images = load_training_set(config["data"]["train"], data_root)
    pre = model.preprocessing
    transform = TrainTransform(config["data"]["train_size"], pre.mean, pre.std)
    sampler = ClassBalancedBatchSampler(images.labels, mining["classes_per_batch"], mining["images_per_class"])
    loader = DataLoader(TrainDataset(images, transform), batch_sampler=sampler, num_workers=config["data"]["workers"])
    seen, elapsed = 0, 0.0
    for step, (batch, labels, _) in enumerate(loader):
        if step == steps + 2:
            break
        tick = time.perf_counter()
        set_train_mode(model)
        embeddings = model(batch.contiguous(memory_format=torch.channels_last))
        loss = loss_fn(embeddings, labels, miner(embeddings.detach(), labels))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:  # warm-up steps excluded
            elapsed += time.perf_counter() - tick
            seen += len(batch)
    return seen / elapsed


def trainer_loop(config: dict, data_root: Path, steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        config = {**config, "train": {**config["train"], "steps": steps, "checkpoint_every": 10**6,
                                      "eval_every": 0}, "data": {**config["data"], "val_classes": 0}}
        trainer = Trainer(config, Path(run_dir), data_root, Accelerator(cpu=True))
        trainer.setup(None)
        trainer.fit()
        trainer.close()
    return trainer.timing["images"] / trainer.timing["train_seconds"]


def run(args: argparse.Namespace) -> dict:
    """Images/s of the bare loop and of the trainer on the same config, and their ratio."""
    config = resolve_config(args.config, [*args.overrides, "mining.miner=semihard"])
    data_root = resolve_data_root(args.data_root or config["data"]["root"])
    bare = bare_loop(config, data_root, args.steps)
    log.info("bare PyTorch loop: %.1f img/s", bare)
    ours = trainer_loop(config, data_root, args.steps)
    mining = config["mining"]
    return {"classes_per_batch": mining["classes_per_batch"], "images_per_class": mining["images_per_class"],
            "train_size": config["data"]["train_size"], "architecture": config["model"]["architecture"],
            "backbone": config["model"]["backbone"], "steps": args.steps, "bare_images_per_second": bare,
            "trainer_images_per_second": ours, "ratio": ours / bare}


def report(result: dict) -> str:
    return "\n".join([
        f"batch: {result['classes_per_batch']} x {result['images_per_class']} images at {result['train_size']} px, "
        f"{result['architecture']} on {result['backbone']}, {result['steps']} steps",
        f"bare PyTorch loop  {result['bare_images_per_second']:7.1f} img/s",
        f"trainer            {result['trainer_images_per_second']:7.1f} img/s  ({result['ratio']:.2f}x the bare loop)"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    print(report(run(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
