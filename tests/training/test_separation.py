"""A short training run on real photos separates the classes: positives pulled together, negatives apart,
nothing collapsed (the failure this guards against: both distances shrinking to the margin together)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from msretrieval.models.retrieval_net import load_model
from msretrieval.training.config import resolve_config
from msretrieval.training.data import ImageBatches, load_training_set
from msretrieval.training.trainer import Trainer


def separation(model, images) -> tuple[float, float, float]:
    """Mean squared distance of all positive pairs and of all negative pairs, and the mean average precision
    of each image as a query against the others (unaugmented views)."""
    pre = model.preprocessing
    with torch.no_grad():
        x = model.eval()(ImageBatches(images, 96, pre.mean, pre.std, torch.device("cpu")).load(range(len(images))))
    d = torch.cdist(x, x).pow(2)
    labels = torch.as_tensor(images.labels)
    others = ~torch.eye(len(labels), dtype=torch.bool)
    same = labels[:, None] == labels[None, :]
    precisions = []
    for q in range(len(labels)):  # AP = mean over the positives of the precision at each positive's rank
        relevant = same[q][others[q]][d[q][others[q]].argsort()].float()
        precisions.append((relevant.cumsum(0) / torch.arange(1, len(relevant) + 1))[relevant.bool()].mean())
    return float(d[same & others].mean()), float(d[~same].mean()), float(torch.stack(precisions).mean())


@pytest.mark.slow
@pytest.mark.parametrize("miner", ["batch", "algorithm1"])
def test_training_pulls_positives_together_and_pushes_negatives_apart(tmp_path, flowers_subset, miner):
    manifest = flowers_subset({"train": [3, 5, 12, 23, 37, 44]}, per_class=8)
    config = {"run_dir": str(tmp_path / "run"),
              "data": {"train": f"csv:{manifest}", "train_size": 96, "workers": 1, "val_classes": 0},
              "model": {"architecture": "msnetvlad", "head": {"num_clusters": 4}, "init_images": 48},
              "mining": {"miner": miner, "classes_per_batch": 3, "images_per_class": 4, "classes": 6, "per_class": 8,
                         "refresh_every": 4},
              "optim": {"lr": 0.0002, "head_lr": 0.001},
              "train": {"steps": 16, "triplets_per_step": 8, "log_every": 1, "triplet_grid_every": 0,
                        "checkpoint_every": 16, "eval_every": 0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert train.main(["--config", str(tmp_path / "config.yaml"), "--skip-final-eval"]) == 0
    images = load_training_set(f"csv:{manifest}", tmp_path)
    set_seed(0)  # the run's initial network: same seed, same head set-up
    start = Trainer(resolve_config(tmp_path / "config.yaml"), tmp_path / "init", tmp_path, Accelerator(cpu=True))
    start.setup(None)
    before = separation(start.unwrapped, images)
    after = separation(load_model(tmp_path / "run" / "last.pth"), images)
    print(f"{miner}: positive / negative mean squared distance, mAP {before} -> {after}")
    assert after[1] > after[0]  # negatives farther than positives
    assert after[1] / after[0] > 1.1 * before[1] / before[0]  # relatively farther than before training
    assert after[2] > before[2] + 0.05  # and ranked better (3 seeds: +0.06 to +0.19 mAP from ~0.76)
    assert after[1] > 0.5 * before[1]  # no collapse: negatives were not pulled in
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    pos = [e.value for e in events.Scalars("batch/mean_pos_distance")]
    neg = [e.value for e in events.Scalars("batch/mean_neg_distance")]
    assert np.mean(neg[-4:]) > np.mean(pos[-4:])


def hamming_separation(model, images) -> tuple[float, float]:
    """Mean AP of each image against the others ranked by Hamming distance of the packed codes, ties counted
    as their expectation over orders (the harness's rule), and the mean Hamming gap negative - positive."""
    from msretrieval.retrieval.search.binary import HammingScores, pack_bits
    from msretrieval.retrieval.evaluation.metrics import labelled_metrics

    pre = model.preprocessing
    batch = ImageBatches(images, 96, pre.mean, pre.std, torch.device("cpu")).load(range(len(images)))
    codes = pack_bits(model.eval().codes(batch).numpy())
    labels = np.asarray(images.labels)
    scores = HammingScores(codes, codes)
    distances = -scores.rows(0, len(codes)).numpy()
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    metrics = labelled_metrics(scores, labels, labels, exclude_self=True)
    return metrics["mAP"], float(distances[~same].mean() - distances[same & off].mean())


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["triplet", "csq"])
def test_hash_training_separates_the_codes(tmp_path, flowers_subset, loss):
    """16-bit codes from the ITQ start: training widens the Hamming gap and ranks the classes better."""
    steps = 16 if loss == "triplet" else 40  # CSQ first moves every code to its class's centre
    manifest = flowers_subset({"train": [3, 5, 12, 23, 37, 44]}, per_class=8)
    config = {"run_dir": str(tmp_path / "run"),
              "data": {"train": f"csv:{manifest}", "train_size": 96, "workers": 1, "val_classes": 0},
              "model": {"architecture": "msnetvlad", "head": {"num_clusters": 4, "hash_bits": 16},
                        "init_images": 48, "hash_beta": {"beta0": 1.0, "gamma": 0.2, "power": 0.5, "step_size": 1}},
              "loss": {"name": loss, **({"quantization_weight": 0.1, "balance_weight": 0.1} if loss == "triplet" else {})},
              "mining": {"miner": "batch", "classes_per_batch": 3, "images_per_class": 4},
              "optim": {"lr": 0.0002, "head_lr": 0.001},
              "train": {"steps": steps, "log_every": 1, "triplet_grid_every": 0, "checkpoint_every": steps,
                        "eval_every": 0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert train.main(["--config", str(tmp_path / "config.yaml"), "--skip-final-eval"]) == 0
    images = load_training_set(f"csv:{manifest}", tmp_path)
    set_seed(0)
    start = Trainer(resolve_config(tmp_path / "config.yaml"), tmp_path / "init", tmp_path, Accelerator(cpu=True))
    start.setup(None)
    before = hamming_separation(start.unwrapped, images)
    trained = load_model(tmp_path / "run" / "last.pth")
    after = hamming_separation(trained, images)
    print(f"{loss}: Hamming mAP, gap {before} -> {after}")
    assert trained.hash_bits == 16 and after[1] > 0
    assert after[0] > before[0] + 0.03 and after[1] > before[1]
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    betas = [e.value for e in events.Scalars("hash/beta")]
    assert betas[0] == 1.0 and betas[-1] == pytest.approx((1 + 0.2 * (steps - 1)) ** 0.5)  # HashNet's continuation
    assert "loss/quantization" in events.Tags()["scalars"]
