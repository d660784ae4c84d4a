"""Miners by name, built to agree with the loss they feed (same distance, same margin)."""
from __future__ import annotations

from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.miners import BaseMiner

from msretrieval.utils.errors import UserError

from .algorithm1 import Algorithm1Miner
from .batch import BatchTripletMiner

#: algorithm1: the paper's miner over a mining batch (training draws triplet batches from its pool);
#: batch: in-batch semi-hard/hard per anchor on P x K batches; semihard / hard: the same with the semi-hard
#: probability pinned to 1 / 0. The schedule's semi_hard_probability drives algorithm1 and batch.
MINER_NAMES = ("algorithm1", "batch", "semihard", "hard")
PINNED_PROBABILITY = {"semihard": 1.0, "hard": 0.0}


def create_miner(name: str, loss: BaseMetricLossFunction, seed: int, one_per_class: bool = True,
                 loss_band: tuple[float, float] | None = None) -> BaseMiner:
    """A miner for ``loss``: in-batch miners use the loss's distance object and margin."""
    if name == "algorithm1":
        return Algorithm1Miner(one_per_class=one_per_class, margin=loss.margin, loss_band=loss_band, seed=seed)
    if name in ("batch", *PINNED_PROBABILITY):
        return BatchTripletMiner(loss.distance, loss.margin, PINNED_PROBABILITY.get(name, 1.0), seed=seed)
    raise UserError(f"unknown miner {name!r}; choose one of {', '.join(MINER_NAMES)}")


def follows_schedule(name: str) -> bool:
    return name not in PINNED_PROBABILITY
