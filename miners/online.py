"""In-batch (online) miners by name, straight from pytorch-metric-learning."""
from __future__ import annotations

from pytorch_metric_learning.miners import BaseMiner, BatchHardMiner, TripletMarginMiner

ONLINE_MINERS = ("semihard", "hard", "all", "batch_hard")


def create_online_miner(name: str, margin: float = 0.1) -> BaseMiner:
    """``semihard``/``hard``/``all``: TripletMarginMiner with that type and ``margin``; ``batch_hard``:
    BatchHardMiner (hardest positive and negative per anchor; ``margin`` unused)."""
    if name == "batch_hard":
        return BatchHardMiner()
    if name in ("semihard", "hard", "all"):
        return TripletMarginMiner(margin=margin, type_of_triplets=name)
    raise ValueError(f"unknown online miner {name!r}; expected one of {', '.join(ONLINE_MINERS)}")
