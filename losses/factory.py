"""Losses and reducers by name, for configs and command lines."""
from __future__ import annotations

from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import AvgNonZeroReducer, BaseReducer, MeanReducer, SumReducer

from .contrastive import CirtorchContrastiveLoss
from .triplet import SquaredEuclideanTripletLoss

LOSSES = {"triplet": SquaredEuclideanTripletLoss, "contrastive": CirtorchContrastiveLoss}
LOSS_NAMES = tuple(LOSSES)
# avg_nonzero: mean of the terms > 0 (PML's triplet default); mean: mean of all terms; sum: cirtorch.
REDUCERS = {"avg_nonzero": AvgNonZeroReducer, "mean": MeanReducer, "sum": SumReducer}
REDUCER_NAMES = tuple(REDUCERS)


def create_reducer(reducer: str | BaseReducer) -> BaseReducer:
    """A PML reducer from its name (a reducer instance is returned unchanged)."""
    if isinstance(reducer, BaseReducer):
        return reducer
    if reducer not in REDUCERS:
        raise ValueError(f"unknown reducer {reducer!r}; choose one of {REDUCER_NAMES} or pass a PML reducer")
    return REDUCERS[reducer]()


def create_loss(name: str, margin: float | None = None, reducer: str | BaseReducer | None = None
                ) -> BaseMetricLossFunction:
    """``triplet`` (squared L2, margin 0.1) or ``contrastive`` (cirtorch, margin 0.7); None keeps defaults."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {LOSS_NAMES}")
    kwargs = {}
    if margin is not None:
        kwargs["margin"] = margin
    if reducer is not None:
        kwargs["reducer"] = create_reducer(reducer)
    return LOSSES[name](**kwargs)
